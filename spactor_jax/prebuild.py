r"""Pre-builds a run's input: the seqio pipeline's batches written to disk.

    python -m spactor_jax.prebuild --gin_file=gin_configs/quickstart.gin \
      --output=/data/quickstart_input --num_batches=400

Runs the pipeline the run's gin files configure (task, lengths, packing, the
feature converter and its extra features) and writes the first
``--num_batches`` global batches, exactly as ``DataIterator`` yields them,
with ``data.prebuilt.write``. A run then reads them without TensorFlow,
seqio or t5 by adding ``--gin_file=runs/prebuilt.gin
--gin.PREBUILT_INPUT=DIR`` to the same gin files.
"""

import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

from spactor_jax import console

console.quiet()  # before TensorFlow is imported or a jax backend starts
# pylint: disable=g-import-not-at-top,wrong-import-position
import gin
import numpy as np
import seqio

from spactor_jax import errors
from spactor_jax import gin_utils
from spactor_jax import train
from spactor_jax.data import pipeline
from spactor_jax.data import prebuilt

log = logging.getLogger('spactor_jax')

USAGE = """
usage: python -m spactor_jax.prebuild --gin_file=FILE [--gin.NAME=VALUE ...] --output=DIR
         --num_batches=N [--batches_per_shard=1000] [--pipeline_processes=1]

Writes the first N global batches of the run's input pipeline to DIR, for a run
without TensorFlow: add --gin_file=runs/prebuilt.gin --gin.PREBUILT_INPUT=DIR to the
same gin files. Flags as in spactor_jax.train (MODEL_DIR is not needed).

  --output=DIR               a new folder
  --num_batches=N            global batches to write (at least the run's TRAIN_STEPS)
  --batches_per_shard=K      batches per shard folder (default 1000)
  --pipeline_processes=P     each global batch joins what the P processes of a P-process
                             seqio run read (default 1); a run on P processes then reads
                             exactly the seqio path's batches

example:
  python -m spactor_jax.prebuild --gin_file=gin_configs/quickstart.gin \\
    --output=/data/quickstart_input --num_batches=400
"""

_OPTIONS = {'output': None, 'num_batches': None, 'batches_per_shard': '1000',
            'pipeline_processes': '1'}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Console entry point; returns the process exit status."""
  return train.main(argv, run=_prebuild, usage=USAGE)


def _options(rest: List[str]) -> Dict[str, object]:
  """``{option: value}`` of the non-gin arguments, numbers checked."""
  options = dict(_OPTIONS)
  for arg in rest:
    name, has_value, value = arg.partition('=')
    if not (name.startswith('--') and name[2:] in _OPTIONS and has_value and value):
      raise errors.ConfigError(f'unknown argument {arg!r}; use --output=DIR --num_batches=N '
                               '(--help lists the options)')
    options[name[2:]] = value
  for name, value in options.items():
    if value is None:
      raise errors.ConfigError(f'--{name} is required, e.g. --output=/data/input --num_batches=1000')
    if name != 'output':
      if not value.isdigit() or int(value) < 1:
        raise errors.ConfigError(f'--{name}={value} must be a positive integer')
      options[name] = int(value)
  return options


def _prebuild(flags: gin_utils.GinFlags, rest: List[str]) -> None:
  options = _options(rest)
  # The input does not depend on where a run writes: MODEL_DIR may stay unset.
  flags.bindings.insert(0, 'MODEL_DIR = None')
  train.prepare(flags, [])
  config = train.run_config()
  if config.data.prebuilt is not None:
    raise errors.ConfigError('DataConfig.prebuilt is set: build from the gin files of the '
                             'run without runs/prebuilt.gin')
  processes = options['pipeline_processes']
  if config.batch_size % processes:
    raise errors.ConfigError(f'BATCH_SIZE = {config.batch_size} is not divisible by '
                             f'--pipeline_processes={processes}')
  if options['num_batches'] < config.total_steps:
    log.warning('warning: --num_batches=%d is fewer than TRAIN_STEPS = %d; a run reading '
                'this input must train at most %d steps', options['num_batches'],
                config.total_steps, options['num_batches'])
  family = config.model_family
  parts = [pipeline.make_iterator(config.data, family, config.batch_size,
                                  seqio.ShardInfo(index, processes),
                                  model_vocab_size=config.model.vocab_size)
           for index in range(processes)]
  vocabulary = parts[0].vocabulary
  if not isinstance(vocabulary, seqio.SentencePieceVocabulary):
    raise errors.ConfigError(f'the task vocabulary is a {type(vocabulary).__name__}; a '
                             'pre-built input records a SentencePiece model')
  batches = ({k: np.concatenate([b[k] for b in step]) for k in step[0]}
             for step in zip(*parts))
  output = options['output']
  index = prebuilt.write(
      output, batches, options['num_batches'], options['batches_per_shard'],
      data=prebuilt.data_identity(config.data), model_family=family,
      pipeline_processes=processes, vocabulary_model=vocabulary.sp_model,
      extra_ids=vocabulary.extra_ids,
      vocabulary_source=vocabulary.sentencepiece_model_file,
      gin_config=gin.config_str())
  size = sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(output) for name in names)
  log.info('wrote %d batches of %d rows (%s) in %d shard(s), %.1f MiB, to %s',
           index['num_batches'], index['global_batch_size'],
           ', '.join(f'{k} {v["shape"][1:]} {v["dtype"]}'
                     for k, v in index['element_spec'].items()),
           len(index['shards']), size / 2**20, output)


if __name__ == '__main__':
  sys.exit(main())
