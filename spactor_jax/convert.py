r"""Models in and out: T5X and Hugging Face checkpoints (``spactor-convert``).

    python -m spactor_jax.convert import_t5x --checkpoint=DIR --gin_file=G --gin.MODEL_DIR=NEW
    python -m spactor_jax.convert import_hf --checkpoint=DIR --gin_file=G --gin.MODEL_DIR=NEW
    python -m spactor_jax.convert export_hf --gin_file=G --gin.MODEL_DIR=RUN --output=DIR
    python -m spactor_jax.convert export_t5x --gin_file=G --gin.MODEL_DIR=RUN --output=DIR

``G`` is the run's gin files, as for ``spactor_jax.train``.

* ``import_t5x`` reads a T5X checkpoint in T5X's native format
  (``t5x_checkpoint``: msgpack ``checkpoint`` file + tensorstore arrays) of a
  T5.1.1 model; ``import_hf`` a ``transformers`` T5 folder (safetensors).
  Both write a complete checkpoint of the gin run into ``MODEL_DIR``: the
  imported parameters under ``model/`` (merged loudly by
  ``param_loading.merge_params``: a model parameter with no source, of
  another shape, or a source left over is one ``error:`` line), every other
  parameter of the objective (a SpacTor generator, an RTD head) and the
  optimizer state freshly initialised. That ``MODEL_DIR`` is an
  ``INIT_CHECKPOINT`` for fine-tuning, and pre-training with it as its own
  ``MODEL_DIR`` continues from it. The checkpoint is at step 0, so the
  learning-rate schedule starts from its beginning; with ``--keep_step``
  (``import_t5x``) it is at the T5X checkpoint's step, the optimizer's step
  counts too, so continued pre-training goes on with T5X's step count and
  learning rate (its second-moment estimates start afresh).
* ``export_hf`` writes ``config.json``, ``model.safetensors`` (no torch
  needed) and the SentencePiece tokenizer files of a run's latest checkpoint
  (``--step=N`` for another): ``T5ForConditionalGeneration`` for the
  encoder-decoder objectives, ``T5EncoderModel`` for the encoder ones.
  Parameters the HF class has no place for (RTD, CLS and copy-gate heads,
  generators) go to ``spactor_params.safetensors``, keyed by their project
  paths; ``import_hf`` reads them back where the model has them.
* ``export_t5x`` writes ``<output>/checkpoint_<step>/`` in T5X's format
  (``t5x.checkpoints.load_t5x_checkpoint`` reads it): the network's
  parameters (``model/...`` becomes T5X's ``target/...``).

Mistakes end with one ``error:`` line and exit status 2.
"""

import functools
import json
import logging
import re
import shutil
import sys
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from etils import epath
import jax
import numpy as np
import seqio

from spactor_jax import errors
from spactor_jax import gin_utils
from spactor_jax import hf_format
from spactor_jax import model_dir as model_dir_lib
from spactor_jax import param_loading
from spactor_jax import partitioning
from spactor_jax import t5x_checkpoint
from spactor_jax import train
from spactor_jax import train_state
from spactor_jax import training
from spactor_jax import validation
from spactor_jax.data import pipeline

log = logging.getLogger('spactor_jax')

MODEL = 'model/'
HEAD = 'decoder/logits_dense/kernel'  # T5.1.1's untied vocabulary head
# Options of each verb: {name: takes a value}.
OPTIONS = {
    'import_t5x': {'checkpoint': True, 'keep_step': False},
    'import_hf': {'checkpoint': True},
    'export_hf': {'output': True, 'step': True},
    'export_t5x': {'output': True, 'step': True},
}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Console entry point; returns the process exit status."""
  return train.main(argv, run=_convert)


def _parse(rest: List[str]) -> Tuple[str, Dict[str, str]]:
  """``(verb, {option: value})`` from the non-gin arguments."""
  verbs = ', '.join(OPTIONS)
  if not rest or rest[0] not in OPTIONS:
    raise errors.ConfigError(
        f'the first argument must be one of {verbs}, got {rest[0] if rest else "none"!r}')
  verb, options = rest[0], {}
  for arg in rest[1:]:
    name, has_value, value = arg.partition('=')
    name = name[2:] if name.startswith('--') else None
    if name not in OPTIONS[verb] or OPTIONS[verb][name] != bool(has_value):
      allowed = ' '.join(f'--{n}=...' if v else f'--{n}' for n, v in OPTIONS[verb].items())
      raise errors.ConfigError(f'{verb} does not take {arg!r}; it takes {allowed}')
    options[name] = value
  for name in ('checkpoint', 'output'):
    if name in OPTIONS[verb] and not options.get(name):
      raise errors.ConfigError(f'{verb} needs --{name}=DIR')
  return verb, options


def _convert(flags: gin_utils.GinFlags, rest: List[str]) -> None:
  verb, options = _parse(rest)
  train.prepare(flags, [])
  config = train.run_config()
  if verb.startswith('import'):
    VERBS[verb](config, options)
  else:
    step = _step_option(options.get('step'))
    VERBS[verb](config, epath.Path(options['output']), step)


def _step_option(value: Optional[str]) -> Optional[int]:
  if value is None:
    return None
  if not value.isdigit():
    raise errors.ConfigError(f'--step={value} must be a checkpoint step, e.g. --step=1000')
  return int(value)


# --- import ------------------------------------------------------------------


def _new_model_dir(config: training.RunConfig) -> None:
  directory = epath.Path(config.model_dir) / 'checkpoints'
  if directory.exists() and any(directory.iterdir()):
    raise errors.ConfigError(
        f'{config.model_dir} has checkpoints already; import into a new MODEL_DIR')


def _with_step(state, step: int, count: int):
  """``state`` at ``step``, every optimizer step count (an integer scalar) at ``count``."""
  def at_count(leaf):
    if leaf.ndim == 0 and np.issubdtype(leaf.dtype, np.integer):
      return jax.device_put(np.asarray(count, leaf.dtype), leaf.sharding)
    return leaf
  return state.replace(step=jax.device_put(np.asarray(step, state.step.dtype),
                                           state.step.sharding),
                       opt_state=jax.tree_util.tree_map(at_count, state.opt_state))


def _escaped(paths) -> List[str]:
  return [re.escape(p) for p in paths]


def import_params(config: training.RunConfig, network: Mapping[str, np.ndarray],
                  others: Mapping[str, np.ndarray], step: int, where: str) -> None:
  """Writes a checkpoint of the gin run at ``step`` holding imported parameters.

  Args:
    config: the run (its ``model_dir`` gets the checkpoint).
    network: ``{path below model: array}``; every one must land in the model
      (but the vocabulary head, when a headless objective has none) and
      every ``model/`` parameter must get one.
    others: ``{project path: array}`` of parameters outside ``model/``
      (``export_hf``'s side file), loaded where the objective has them.
    step: the checkpoint's step (and the optimizer's step counts, less the
      stage's start).
    where: names the source in messages.

  Raises:
    ConfigError: ``model_dir`` has checkpoints; a parameter missing, of
      another shape or left over.
  """
  _new_model_dir(config)
  validation.validate(config)
  model_dir_lib.check(config)
  device_mesh = partitioning.make_mesh(config.mesh)
  shard = seqio.ShardInfo(jax.process_index(), jax.process_count())
  iterator = pipeline.make_iterator(config.data, config.model_family, config.batch_size, shard,
                                    model_vocab_size=config.model.vocab_size)
  batch_spec = training.global_batch_spec(iterator, jax.process_count())
  stage = config.curriculum.index_of_state(step)
  trainer = config.make_trainer(stage, device_mesh, batch_spec,
                                pipeline.vocab_info(iterator.vocabulary))
  targets = set(train_state.by_path(trainer.abstract_state.params))
  if (HEAD in network and MODEL + HEAD not in targets
      and not config.model.logits_via_embedding):
    log.info('the objective has no vocabulary head (headless): %s of %s is not imported',
             HEAD, where)
    network = {path: value for path, value in network.items() if path != HEAD}
  loaded = {MODEL + path: value for path, value in network.items()}
  loaded.update({path: value for path, value in others.items() if path in targets})
  merge = functools.partial(
      param_loading.merge_params, loaded, where=where,
      dont_load=_escaped(t for t in targets if t not in loaded and not t.startswith(MODEL)))
  merge(trainer.abstract_state.params)  # a mismatch is reported before anything compiles
  state = trainer.init_state(jax.random.key(config.seed))
  merged = merge(state.params)
  params = jax.tree_util.tree_map(  # each host array onto its parameter's sharding and dtype
      lambda value, init: init if value is init else jax.device_put(
          np.asarray(value, init.dtype), init.sharding),
      merged.params, state.params)
  state = _with_step(state.replace(params=params), step,
                     step - config.curriculum.optimizer_start(stage))
  checkpointer = config.checkpointer(model_dir=config.model_dir)
  try:
    checkpointer.save(step, state, iterator, force=True)
  finally:
    checkpointer.close()
  model_dir_lib.record(config)
  log.info('parameters new (initialised): %s', ', '.join(merged.new) or 'none')
  print(f'imported {len(merged.loaded)} parameters from {where} into '
        f'{config.model_dir}/checkpoints/{step} ({len(merged.new)} initialised)')


def _import_t5x(config: training.RunConfig, options: Mapping[str, str]) -> None:
  _require_family(config, ('encoder_decoder',), 'import_t5x reads T5.1.1 encoder-decoders')
  step, params = t5x_checkpoint.read(options['checkpoint'])
  import_params(config, params, {}, step if 'keep_step' in options else 0,
                f'T5X checkpoint {t5x_checkpoint.find(options["checkpoint"]).parent}')


def _import_hf(config: training.RunConfig, options: Mapping[str, str]) -> None:
  family = _require_family(config, tuple(hf_format.CLASSES), _NO_HF_CLASS)
  directory = epath.Path(options['checkpoint'])
  if not (directory / hf_format.CONFIG_FILE).exists():
    raise errors.ConfigError(f'{directory} has no {hf_format.CONFIG_FILE}; is it a Hugging Face '
                             'model folder?')
  held = json.loads((directory / hf_format.CONFIG_FILE).read_text())
  hf_format.check_config(held, config.model, str(directory / hf_format.CONFIG_FILE))
  network = hf_format.from_hf(hf_format.read(directory), held, config.model, family)
  others = (hf_format.read_files(directory, [hf_format.SIDE_FILE])
            if (directory / hf_format.SIDE_FILE).exists() else {})
  import_params(config, network, others, 0, f'Hugging Face model {directory}')


# --- export ------------------------------------------------------------------

_NO_HF_CLASS = ('a decoder-only model here is a T5 decoder stack (relative position biases, '
                'no cross-attention), which no Hugging Face class computes; export_t5x keeps it')


def _require_family(config: training.RunConfig, families: Tuple[str, ...], why: str) -> str:
  family = config.model_family
  if family not in families:
    raise errors.ConfigError(f'the gin run trains a {family} model: {why}')
  return family


def _run_params(config: training.RunConfig, step: Optional[int]
                ) -> Tuple[int, Dict[str, np.ndarray], Dict[str, np.ndarray]]:
  """``(step, network params below model, other params)`` of the run's checkpoint."""
  step, params = param_loading.read_params(config.model_dir, step)
  network = {p[len(MODEL):]: v for p, v in params.items() if p.startswith(MODEL)}
  return step, network, {p: v for p, v in params.items() if not p.startswith(MODEL)}


def _new_output(output: epath.Path) -> None:
  if output.exists() and any(output.iterdir()):
    raise errors.ConfigError(f'{output} is not empty; choose a new --output folder')
  output.mkdir(parents=True, exist_ok=True)


def _tokenizer_files(config: training.RunConfig, output: epath.Path) -> None:
  """The run's SentencePiece model as HF's ``T5Tokenizer`` files (100 sentinels)."""
  vocabulary = seqio.get_mixture_or_task(
      config.data.mixture_or_task_name).output_features['targets'].vocabulary
  model_file = getattr(vocabulary, 'sentencepiece_model_file', None)
  if not model_file:
    log.warning('the task\'s vocabulary is not SentencePiece; no tokenizer files written')
    return
  shutil.copyfile(model_file, output / 'spiece.model')
  specials = {'eos_token': '</s>', 'unk_token': '<unk>', 'pad_token': '<pad>'}
  (output / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'T5Tokenizer', 'extra_ids': vocabulary.extra_ids,
       'model_max_length': 1_000_000_000, **specials}, indent=1) + '\n')
  (output / 'special_tokens_map.json').write_text(json.dumps(specials, indent=1) + '\n')


def _export_hf(config: training.RunConfig, output: epath.Path, step: Optional[int]) -> None:
  family = _require_family(config, tuple(hf_format.CLASSES), _NO_HF_CLASS)
  step, network, others = _run_params(config, step)
  needed = [ours for ours, _, _ in hf_format.name_pairs(config.model, family)]
  missing = [p for p in needed if p not in network]
  if missing:
    raise errors.ConfigError(
        f'the checkpoint of {config.model_dir} has no {MODEL}{missing[0]} (and '
        f'{len(missing) - 1} more) that {hf_format.CLASSES[family]} needs; a headless model '
        'has no vocabulary head: LM-tune it first')
  tensors, unused = hf_format.to_hf(network, config.model, family)
  others.update({MODEL + p: network[p] for p in unused})
  _new_output(output)
  hf_format.write(output, tensors, hf_format.WEIGHTS_FILE)
  if others:
    hf_format.write(output, others, hf_format.SIDE_FILE)
  (output / hf_format.CONFIG_FILE).write_text(
      json.dumps(hf_format.config_json(config.model, family), indent=1) + '\n')
  _tokenizer_files(config, output)
  side = f'; {len(others)} more in {hf_format.SIDE_FILE}' if others else ''
  print(f'wrote {hf_format.CLASSES[family]} of {config.model_dir} step {step} to {output} '
        f'({len(tensors)} tensors{side})')


def _export_t5x(config: training.RunConfig, output: epath.Path, step: Optional[int]) -> None:
  step, network, others = _run_params(config, step)
  written = t5x_checkpoint.write(str(output), step, network)
  if others:
    log.info('not exported (no place in T5X\'s network): %s', ', '.join(sorted(others)))
  print(f'wrote T5X checkpoint {written} ({len(network)} arrays)')


VERBS: Dict[str, Callable[..., None]] = {
    'import_t5x': _import_t5x, 'import_hf': _import_hf,
    'export_hf': _export_hf, 'export_t5x': _export_t5x}


if __name__ == '__main__':
  sys.exit(main())
