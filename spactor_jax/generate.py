r"""Text from a checkpoint: continuation for decoder-only models, span filling for T5.

    python -m spactor_jax.generate \
      --gin_file=gin_configs/quickstart_headless_causal_lm_then_lm_tuning.gin \
      --gin.MODEL_DIR=/tmp/headless_lm \
      --gin.GenerateConfig.prompts="['And God said', 'A bore is']" \
      --gin.GenerateConfig.temperature=0.7 --gin.GenerateConfig.top_k=40

Takes the run's own gin files (the model, the curriculum, the task and its
vocabulary) plus ``GenerateConfig``; loads the latest checkpoint (or
``GenerateConfig.step``) and prints one line per prompt. A decoder-only model
continues its prompts (KV-cached; greedy at ``temperature = 0``, else sampled
with optional top-k and top-p); an encoder-decoder model fills the ``<extra_id_k>``
sentinels of its inputs. With ``perplexity_batches`` it first prints the
perplexity of the task's validation split. A headless checkpoint has no
vocabulary head and is refused: LM-tune it first. The run's stages are read
from its own record (``run_identity.json``), so a shortened run is judged by
where its stages really switched. Temperature, top-k and top-p apply to the
model's logits as its objective computed them in training (an LM-tuned head's
``LMTuning.logit_scale`` included), on both kinds of model.
"""

import dataclasses
import logging
import math
import sys
from typing import Any, Dict, List, Optional, Sequence

from spactor_jax import console

console.quiet()  # before TensorFlow is imported or a jax backend starts
# pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from spactor_jax import decoding
from spactor_jax import errors
from spactor_jax import gin_utils
from spactor_jax import model_dir as model_dir_lib
from spactor_jax import network
from spactor_jax import param_loading
from spactor_jax import partitioning
from spactor_jax import runtime
from spactor_jax import training
from spactor_jax import model_families
from spactor_jax.data import pipeline
from spactor_jax.objectives import base

log = logging.getLogger('spactor_jax')

USAGE = """
usage: python -m spactor_jax.generate --gin_file=FILE [--gin_file=FILE ...] --gin.MODEL_DIR=DIR
         --gin.GenerateConfig.prompts="['text', ...]" [--gin.GenerateConfig.NAME=VALUE ...]

Text from a run's checkpoint: a decoder-only model continues each prompt, an
encoder-decoder fills the <extra_id_k> sentinels of each prompt. Give the run's own gin
files. Flags as in spactor_jax.train.

Macros: MODEL_DIR (required). GenerateConfig: prompts or prompt_file (required), step
(default: the latest), temperature (0: greedy), top_k (0: all), top_p (1: all), seed,
decode_length, input_length, perplexity_batches.

examples:
  python -m spactor_jax.generate --gin_file=gin_configs/quickstart_headless_causal_lm_then_lm_tuning.gin \\
    --gin.MODEL_DIR=/tmp/headless_lm --gin.GenerateConfig.prompts="['And God said']" \\
    --gin.GenerateConfig.temperature=0.8 --gin.GenerateConfig.top_k=40
  python -m spactor_jax.generate --gin_file=gin_configs/quickstart.gin --gin.MODEL_DIR=/tmp/spactor_quickstart \\
    --gin.GenerateConfig.prompts="['In the beginning God created the <extra_id_0> and the earth.']"
"""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """What to generate.

  Attributes:
    prompts: texts to continue (decoder-only) or with ``<extra_id_k>``
      sentinels to fill (encoder-decoder).
    prompt_file: more prompts, one per line.
    step: the checkpoint's step (``None``: the latest).
    decode_length: decoder-only: prompt plus continuation, in tokens;
      encoder-decoder: the filled spans, in tokens.
    input_length: encoder-decoder: encoder input tokens.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_k: sample among this many most likely ids (0: all).
    top_p: sample among the fewest most likely ids whose probabilities sum
      to at least this (nucleus sampling; 1: all).
    seed: sampling seed.
    perplexity_batches: decoder-only: first evaluate the perplexity of this
      many batches of the task's validation split (0: skip).
  """
  prompts: Sequence[str] = ()
  prompt_file: Optional[str] = None
  step: Optional[int] = None
  decode_length: int = 64
  input_length: int = 128
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  perplexity_batches: int = 0

  def all_prompts(self) -> List[str]:
    prompts = list(self.prompts)
    if self.prompt_file:
      prompts += [line.rstrip('\n') for line in epath.Path(self.prompt_file).read_text().splitlines()
                  if line.strip()]
    if not prompts:
      raise errors.ConfigError(
          "no prompts; set --gin.GenerateConfig.prompts=\"['text', ...]\" or "
          'GenerateConfig.prompt_file')
    return prompts


def restore_params(run: training.RunConfig, step: Optional[int], vocab: base.VocabInfo, *,
                   need_head: bool = True) -> Dict[str, Any]:
  """The parameters of a checkpoint, and the objective of its stage.

  Returns:
    ``{'params', 'objective', 'step'}``; the network's parameters are
    ``params['model']``.

  Raises:
    ConfigError: no checkpoint, or (``need_head``) one without a vocabulary head.
  """
  step_dir = param_loading.ParamSource(run.model_dir, step=step).checkpoint_directory()
  step = int(step_dir.name)
  stage = run.curriculum.index_of_state(step)
  mesh = partitioning.make_mesh(run.mesh)
  spec = pipeline.batch_spec(run.data, run.model_family, run.batch_size)
  trainer = run.make_trainer(stage, mesh, spec, vocab)
  if need_head:
    check_has_head(trainer.abstract_state.params, run, type(trainer.objective).__name__, step)
  params = param_loading.restore_params(step_dir, trainer.sharded_abstract_state().params)
  log.info('restored step %d (stage %s) from %s', step, run.curriculum.stages[stage].name,
           step_dir)
  return {'params': params, 'objective': trainer.objective, 'step': step}


def check_has_head(params: Dict[str, Any], run: training.RunConfig, objective_name: str,
                   step: int) -> None:
  """A one-line error for encoder-only or headless checkpoints."""
  if model_families.get(run.model_family).prediction is None:
    raise errors.ConfigError(f'{run.model_family} models do not generate text; use a decoder-only '
                             'or encoder-decoder run')
  if run.model.logits_via_embedding or 'logits_dense' in params['model']['decoder']:
    return
  raise errors.ConfigError(
      f'the checkpoint at step {step} ({objective_name}) is headless: it has no vocabulary '
      'head to generate with; LM-tune it first (gin_configs/objectives/'
      'headless_causal_lm_then_lm_tuning.gin adds the LMTuning stage)')


def perplexity(objective: base.Objective, params: Any, batches: Any) -> float:
  """``exp`` of the objective's ``perplexity_metric`` over the target tokens of
  ``batches`` (sums, not batch means)."""
  apply = jax.jit(lambda params, batch: objective.apply(
      {'params': params}, batch, objective.denominators(batch), enable_dropout=False)[1])
  total, count = 0.0, 0.0
  for batch in batches:
    loss_sum, tokens = apply(params, dict(batch))[objective.perplexity_metric]
    total += float(loss_sum)
    count += float(tokens)
  return math.exp(total / max(count, 1.0))


def sampling(config: GenerateConfig, objective: base.Objective) -> Dict[str, Any]:
  """The choice settings of ``decoding``: ``config``'s, on the objective's logits.

  Raises:
    ConfigError: a setting out of range.
  """
  if config.temperature < 0 or config.top_k < 0 or not 0 < config.top_p <= 1:
    raise errors.ConfigError(
        f'GenerateConfig temperature = {config.temperature}, top_k = {config.top_k}, '
        f'top_p = {config.top_p}: use temperature >= 0 (0: greedy), top_k >= 0 (0: all) '
        'and 0 < top_p <= 1 (1: all)')
  return dict(temperature=float(config.temperature), top_k=int(config.top_k),
              top_p=float(config.top_p),
              logit_scale=float(getattr(objective, 'logit_scale', 1.0)))


def continue_prompts(run: training.RunConfig, config: GenerateConfig, params: Any,
                     objective: base.Objective, vocabulary: seqio.Vocabulary,
                     prompts: List[str]) -> List[str]:
  """Decoder-only continuations of ``prompts`` (KV cache, scanned or not)."""
  model_params = params['model']
  model = network.DecoderOnly(run.model, decode_length=config.decode_length)
  ids = [list(vocabulary.encode(p)) for p in prompts]
  tokens, lengths = decoding.pad_prompts(ids, config.decode_length)
  out = np.asarray(decoding.generate(
      model, model_params, tokens, lengths, jax.random.key(config.seed),
      eos_id=vocabulary.eos_id, **sampling(config, objective)))
  return [vocabulary.decode(decoding.generated_part(row, len(prompt), vocabulary.eos_id))
          for row, prompt in zip(out, ids)]


def fill_prompts(run: training.RunConfig, config: GenerateConfig, params: Any,
                 objective: base.Objective, vocabulary: seqio.Vocabulary,
                 vocab: base.VocabInfo, prompts: List[str]) -> List[str]:
  """Encoder-decoder span filling: each prompt with its sentinels replaced."""
  inputs = decoding.encode_inputs(prompts, vocabulary.encode, config.input_length,
                                  vocabulary.eos_id)
  targets = np.asarray(decoding.decode_targets(
      network.EncoderDecoder(run.model), params['model'], jnp.asarray(inputs),
      config.decode_length, jax.random.key(config.seed), eos_id=vocabulary.eos_id,
      **sampling(config, objective)))
  return [decoding.fill_spans(prompt, {k: vocabulary.decode(ids) for k, ids in
                                       decoding.spans_from_ids(row, vocab).items()})
          for prompt, row in zip(prompts, targets)]


def generate(run: training.RunConfig, config: GenerateConfig) -> List[str]:
  """Loads the checkpoint, prints and returns one output per prompt."""
  prompts = config.all_prompts()
  run = model_dir_lib.as_recorded(run)
  vocabulary = pipeline.task_vocabulary(run.data, run.model_family)
  vocab = pipeline.vocab_info(vocabulary)
  restored = restore_params(run, config.step, vocab)
  params, objective = restored['params'], restored['objective']
  prediction = model_families.get(run.model_family).prediction
  if config.perplexity_batches:
    if prediction != 'continue' or objective.perplexity_metric is None:
      raise errors.ConfigError('perplexity_batches needs a decoder-only checkpoint of an '
                               'LMTuning stage')
    data = dataclasses.replace(run.data, split='validation', shuffle=False)
    batches = pipeline.make_iterator(data, run.model_family, run.batch_size,
                                     seqio.ShardInfo(0, 1), run.model.vocab_size)
    value = perplexity(objective, params, (b for _, b in zip(range(config.perplexity_batches),
                                                             batches)))
    print(f'perplexity {value:.2f} on {config.perplexity_batches} validation batches')
  if prediction == 'continue':
    outputs = continue_prompts(run, config, params, objective, vocabulary, prompts)
  else:
    outputs = fill_prompts(run, config, params, objective, vocabulary, vocab, prompts)
  for prompt, output in zip(prompts, outputs):
    print(f'{prompt} => {output}')
  return outputs


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Console entry point; returns the process exit status."""
  return gin_utils.run_main(_generate, argv, USAGE)


def _generate(flags: gin_utils.GinFlags, rest: List[str]) -> None:
  if rest:
    raise errors.ConfigError(f'unknown arguments {rest}; use --gin_file=F and --gin.NAME=VALUE '
                             '(--help lists them)')
  gin_utils.parse_with_tasks(flags)
  runtime.initialize()
  generate(gin_utils.call(training.RunConfig), gin_utils.call(GenerateConfig))


if __name__ == '__main__':
  sys.exit(main())
