r"""Zero-shot measures of one pre-training run's last checkpoint (``compare/zero_shot.py``).

    python benchmarks/zero_shot.py --out /tmp/zero_shot.json \
      --gin_file=quickstart_headless_causal_lm_then_lm_tuning.gin --gin.MODEL_DIR=/tmp/run \
      [--gin.NAME=VALUE ...] [--stride 8] [--batch 32]

Give the run's own gin files and bindings (as ``spactor_jax.generate`` takes
them). By the run's model family:

* decoder-only with a vocabulary head: next-token accuracy and loss at every
  position of the task's held-out (validation) documents;
* encoder-decoder with a vocabulary head: one-token span filling of every
  held-out token (``--stride`` passes per window);
* encoder-only: a linear probe of frozen mean-pooled features on
  ``--probe_task`` (train / validation / test splits).

Writes one JSON object (``compare/zero_shot.py``'s record, ``step`` added) and
prints one summary line; a headless checkpoint of a decoder gets one
``error:`` line (LM-tune it first).
"""

import argparse
import json
import os
import sys
from typing import Callable, Dict, List, Sequence

import common  # pylint: disable=g-bad-import-order  # puts the repository on sys.path
from spactor_jax import console

console.quiet()  # before TensorFlow is imported or a jax backend starts
# pylint: disable=g-import-not-at-top
import jax
import numpy as np
import seqio

from compare import zero_shot
from spactor_jax import errors
from spactor_jax import generate
from spactor_jax import gin_utils
from spactor_jax import model_families
from spactor_jax import model_dir as model_dir_lib
from spactor_jax import network
from spactor_jax import runtime
from spactor_jax import training
from spactor_jax.data import pipeline

PROBE_TASK = 'pdtext_continuation_cls'
STRIDE = 8  # span filling's passes per window (every 8th token hidden in a pass)


def parse_args(rest: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='the JSON file written')
  parser.add_argument('--stride', type=int, default=STRIDE,
                      help='span filling: passes per window (every stride-th token hidden)')
  parser.add_argument('--batch', type=int, default=32, help='rows per forward pass')
  parser.add_argument('--probe_task', default=PROBE_TASK,
                      help='encoder-only: the classification task of the linear probe')
  args = parser.parse_args(rest)
  if min(args.stride, args.batch) < 1:
    parser.error('--stride and --batch must be positive')
  return args


def held_out_documents(run: training.RunConfig, vocabulary: seqio.Vocabulary) -> List[List[int]]:
  """Token ids of every document of the run's task's validation split, in file order."""
  task = seqio.get_mixture_or_task(run.data.mixture_or_task_name)
  if not isinstance(task, seqio.Task):
    raise errors.ConfigError(f'{task.name} is a mixture; zero-shot measures read one task\'s '
                             'validation documents')
  dataset = task.source.get_dataset('validation', shuffle=False)
  return [list(vocabulary.encode(example['text'].decode('utf-8')))
          for example in dataset.as_numpy_iterator()]


def score(batch: zero_shot.Batch, log_probs: Callable[..., jax.Array], size: int
          ) -> Dict[str, np.ndarray]:
  """Per-item correctness and loss of ``batch``, ``size`` rows per call of ``log_probs``."""
  parts = []
  for start in range(0, batch.inputs.shape[0], size):
    rows = slice(start, start + size)
    out = np.asarray(log_probs(batch.inputs[rows], batch.decoder_inputs[rows]))
    parts.append(zero_shot.item_scores(out, batch.targets[rows], batch.scored[rows]))
  return {key: np.concatenate([p[key] for p in parts]) for key in ('correct', 'nll')}


def next_token(run, params, scale, documents, vocabulary, args) -> dict:
  model = network.DecoderOnly(run.model)
  length = run.data.task_feature_lengths['targets']

  @jax.jit
  def log_probs(tokens, _):
    hidden = model.apply({'params': params}, tokens)
    logits = model.apply({'params': params}, hidden, method=network.DecoderOnly.logits)
    return jax.nn.log_softmax(logits * scale)

  batch = zero_shot.next_token_batch(documents, length, vocabulary.eos_id)
  items = score(batch, log_probs, args.batch)
  return zero_shot.summary('next_token', batch, items['correct'], items['nll'])


def span_filling(run, params, scale, documents, vocabulary, args) -> dict:
  model = network.EncoderDecoder(run.model)
  batch = zero_shot.span_filling_batch(documents, run.data.task_feature_lengths['inputs'],
                                       args.stride, vocabulary.vocab_size, vocabulary.eos_id)

  @jax.jit
  def log_probs(inputs, decoder_inputs):
    return jax.nn.log_softmax(model.apply({'params': params}, inputs, decoder_inputs) * scale)

  items = score(batch, log_probs, args.batch)
  return {**zero_shot.summary('span_filling', batch, items['correct'], items['nll']),
          'stride': args.stride}


def probe_split(task: seqio.Task, split: str, length: int) -> Dict[str, np.ndarray]:
  """``inputs`` ``[rows, length]`` (cut, zero-padded) and ``label`` ``[rows]`` of a split."""
  rows = list(task.get_dataset({'inputs': length}, split=split, shuffle=False)
              .as_numpy_iterator())
  inputs = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    ids = row['inputs'][:length]
    inputs[i, :len(ids)] = ids
  return {'inputs': inputs, 'label': np.asarray([int(row['label']) for row in rows])}


def linear_probe(run, params, args) -> dict:
  model = network.EncoderOnly(run.model)
  length = run.data.task_feature_lengths['inputs']
  encode = jax.jit(lambda tokens: model.apply({'params': params}, tokens))
  task = seqio.get_mixture_or_task(args.probe_task)
  splits = {}
  for split in ('train', 'validation', 'test'):
    data = probe_split(task, split, length)
    features = np.concatenate([
        zero_shot.mean_pool(encode(data['inputs'][i:i + args.batch]),
                            data['inputs'][i:i + args.batch])
        for i in range(0, len(data['label']), args.batch)])
    splits[split] = (features, data['label'])
  return {**zero_shot.linear_probe(*splits['train'], *splits['validation'], *splits['test']),
          'task': args.probe_task}


# How each kind of model is measured, by its family's ``prediction`` (model_families.py).
MEASURES = {'continue': next_token, 'fill': span_filling}


def measure(run: training.RunConfig, args: argparse.Namespace) -> dict:
  """The record of the run's last checkpoint."""
  run = model_dir_lib.as_recorded(run)
  vocabulary = pipeline.task_vocabulary(run.data, run.model_family)
  vocab = pipeline.vocab_info(vocabulary)
  prediction = model_families.get(run.model_family).prediction
  restored = generate.restore_params(run, None, vocab, need_head=prediction is not None)
  params = restored['params']['model']
  if prediction is None:  # encoder-only: no text out, a probe of its features.
    record = linear_probe(run, params, args)
  else:
    documents = held_out_documents(run, vocabulary)
    scale = float(getattr(restored['objective'], 'logit_scale', 1.0))
    record = {**MEASURES[prediction](run, params, scale, documents, vocabulary, args),
              'documents': len(documents)}
  return {**record, 'step': restored['step'], 'model_dir': run.model_dir}


def _main(flags: gin_utils.GinFlags, rest: List[str]) -> None:
  args = parse_args(rest)
  gin_utils.parse_with_tasks(flags)
  runtime.initialize()
  record = measure(gin_utils.call(training.RunConfig), args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write('\n')
  loss = f', loss {record["loss"]:.4f} nats' if 'loss' in record else ''
  print(f'{record["measure"]}: accuracy {record["accuracy"]:.2f}% over {record["items"]} items'
        f'{loss} (step {record["step"]})', flush=True)


if __name__ == '__main__':
  sys.exit(gin_utils.run_main(_main, None, __doc__))
