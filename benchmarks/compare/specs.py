"""The objectives of the comparison: gin files, curricula, baselines, claims.

Every objective is pre-trained with its quickstart gin file as shipped (the
tiny model of its family, its quickstart's batch and lengths, Adafactor at the
quickstart's constant rate); only the steps differ, derived from the FLOPs
budget. A curriculum's non-final stages take a fixed share of the run's steps
(``stage_fractions``), bound through the gin macro that sets them
(``stage_macros``). Claims are quoted from the papers; ``baseline`` names the
objective the claim is measured against.
"""

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

ENCODER_DECODER, ENCODER, DECODER = 'encoder_decoder', 'encoder', 'decoder'

# Downstream routes (tasks/downstream.py) by model family; the first is the
# family's primary score in the table's verdicts.
DOWNSTREAM_TASKS: Dict[str, Tuple[str, ...]] = {
    ENCODER_DECODER: ('pdtext_continuation', 'pdtext_last_word'),
    ENCODER: ('pdtext_continuation_cls',),
    DECODER: ('pdtext_last_word_choices',),
}


@dataclasses.dataclass(frozen=True)
class ObjectiveSpec:
  """One row of the comparison.

  Attributes:
    name: the key used by ``--objectives`` and in the results.
    label: what the table and plots print.
    gin_file: the pre-training gin file (under ``gin_configs/``).
    family: ``'encoder_decoder'``, ``'encoder'`` or ``'decoder'``.
    stage_macros: the gin macro setting the steps of each non-final stage.
    stage_fractions: each non-final stage's share of the run's steps.
    baseline: the objective the claim compares with (``None``: none here).
    claim: the paper's claim, as the table quotes it.
    heldout_metric: the held-out metric plotted against FLOPs
      (``heldout_sc_loss``, the shared currency of the encoder-decoder
      family; otherwise the objective's own ``loss``, not comparable across
      objectives).
    bindings: ``NAME=VALUE`` gin bindings on top of the gin file.
    finetune_headless: the checkpoint has no vocabulary head; fine-tuning
      routes that need one make it from the embedding.
    pretrained: ``False`` for a reference row: no pre-training (no gin file,
      no FLOPs), fine-tuning from a fresh initialisation.
  """
  name: str
  label: str
  gin_file: str
  family: str
  stage_macros: Tuple[str, ...] = ()
  stage_fractions: Tuple[float, ...] = ()
  baseline: Optional[str] = None
  claim: str = ''
  heldout_metric: str = 'loss'
  bindings: Tuple[str, ...] = ()
  finetune_headless: bool = False
  pretrained: bool = True

  @property
  def num_stages(self) -> int:
    return len(self.stage_fractions) + 1

  @property
  def downstream_tasks(self) -> Tuple[str, ...]:
    return DOWNSTREAM_TASKS[self.family]

  @property
  def zero_shot(self) -> Optional[str]:
    """The zero-shot measure of the row's checkpoint (``benchmarks/zero_shot.py``):
    ``next_token`` (decoders), ``span_filling`` (encoder-decoders with a vocabulary
    head), ``linear_probe`` (encoders); ``None`` for a reference row or a headless T5."""
    if not self.pretrained or (self.family == ENCODER_DECODER and self.finetune_headless):
      return None
    return {DECODER: 'next_token', ENCODER_DECODER: 'span_filling',
            ENCODER: 'linear_probe'}[self.family]


_SPACTOR_CLAIM = ('same downstream quality as SC with 50% of the steps and 60% of the FLOPs '
                  '(so at least SC\'s at equal FLOPs)')
_LIGHT_CLAIM = 'pre-training time -20 to -45% at about MLM\'s accuracy'

SPECS: Tuple[ObjectiveSpec, ...] = (
    ObjectiveSpec('span_corruption', 'span corruption (T5.1.1)', 'quickstart.gin',
                  ENCODER_DECODER, claim='baseline', heldout_metric='heldout_sc_loss'),
    # τ = 12% and 25% of the run: 120k and 250k of 1M steps, the paper's range.
    ObjectiveSpec('spactor_tau12', 'SpacTor, τ = 12% of steps', 'quickstart_spactor.gin',
                  ENCODER_DECODER, ('TAU',), (0.12,), 'span_corruption', _SPACTOR_CLAIM,
                  'heldout_sc_loss'),
    ObjectiveSpec('spactor_tau25', 'SpacTor, τ = 25% of steps', 'quickstart_spactor.gin',
                  ENCODER_DECODER, ('TAU',), (0.25,), 'span_corruption', _SPACTOR_CLAIM,
                  'heldout_sc_loss'),
    ObjectiveSpec('light_spactor', 'SpacTor with C-RTS, τ = 25%', 'quickstart_spactor_crts.gin',
                  ENCODER_DECODER, ('TAU',), (0.25,), 'span_corruption',
                  'none published (this project\'s mix)', 'heldout_sc_loss'),
    ObjectiveSpec('headless_t5', 'headless T5 (CWT decoder)', 'quickstart_headless_t5.gin',
                  ENCODER_DECODER, baseline='span_corruption',
                  claim='none published (this project\'s mix)', finetune_headless=True),
    ObjectiveSpec('mlm', 'MLM (BERT)', 'quickstart_mlm.gin', ENCODER, claim='baseline'),
    ObjectiveSpec('electra', 'ELECTRA', 'quickstart_electra.gin', ENCODER, baseline='mlm',
                  claim='baseline of COCO-LM'),
    ObjectiveSpec('coco_lm', 'COCO-LM', 'quickstart_coco_lm.gin', ENCODER, baseline='electra',
                  claim='ELECTRA\'s MNLI accuracy with 50% of its GPU hours; +1 GLUE at '
                  'equal steps'),
    ObjectiveSpec('rts', 'RTS', 'quickstart_rts.gin', ENCODER, baseline='mlm',
                  claim=_LIGHT_CLAIM),
    ObjectiveSpec('crts', 'C-RTS', 'quickstart_crts.gin', ENCODER, baseline='mlm',
                  claim=_LIGHT_CLAIM),
    ObjectiveSpec('slm', 'SLM', 'quickstart_slm.gin', ENCODER, baseline='mlm',
                  claim='beats MLM at equal compute'),
    ObjectiveSpec('headless_mlm', 'headless MLM (CWT)', 'quickstart_headless_mlm.gin', ENCODER,
                  baseline='mlm', claim='+1.6 GLUE (84.08 vs 82.43) over MLM at similar '
                  'compute'),
    # The vanilla decoder the headless claim compares with: next-token cross-entropy through
    # an untied head (LMTuning's loss) from the start, the headless quickstart's settings.
    ObjectiveSpec('causal_lm', 'causal LM (cross-entropy)', 'quickstart_headless_causal_lm.gin',
                  DECODER, claim='baseline', bindings=('headless/Stage.objective=@LMTuning',)),
    # LM-tuning: 10% of the run's steps (the paper: < 2% of the pre-training tokens).
    # The control of the headless arm: cross-entropy from the start, then the same final
    # stage (a fresh AdamW at LM-tuning's rate for the last 10%), so that the headless arm's
    # difference is contrastive weight tying's, not the optimizer switch's. The head the
    # first stage trained is kept (no re-initialisation from the embedding).
    ObjectiveSpec('causal_lm_then_lm_tuning', 'causal LM, then the same LM-tuning stage '
                  '(control)', 'quickstart_headless_causal_lm_then_lm_tuning.gin', DECODER,
                  ('PRETRAIN_STEPS',), (0.9,), 'causal_lm', 'control of the headless arm',
                  bindings=('headless/Stage.objective=@LMTuning', 'lm_tuning/Stage.init_from={}')),
    ObjectiveSpec('headless_causal_lm', 'headless causal LM, then LM-tuning (last 10%)',
                  'quickstart_headless_causal_lm_then_lm_tuning.gin', DECODER,
                  ('PRETRAIN_STEPS',), (0.9,), 'causal_lm_then_lm_tuning',
                  'LAMBADA accuracy 22.2 vs 19.52 of a vanilla causal LM after LM-tuning'),
    # Reference rows: the family's fine-tuning recipe from a fresh initialisation.
    ObjectiveSpec('scratch_t5', 'no pre-training (T5)', '', ENCODER_DECODER,
                  claim='reference', pretrained=False),
    ObjectiveSpec('scratch_encoder', 'no pre-training (encoder)', '', ENCODER,
                  claim='reference', pretrained=False),
    ObjectiveSpec('scratch_decoder', 'no pre-training (decoder)', '', DECODER,
                  claim='reference', pretrained=False),
)

BY_NAME: Dict[str, ObjectiveSpec] = {spec.name: spec for spec in SPECS}


def select(names: Optional[Sequence[str]]) -> Tuple[ObjectiveSpec, ...]:
  """The specs named (all when ``names`` is empty), in the table's order.

  Raises:
    ValueError: a name is not an objective of the comparison.
  """
  if not names:
    return SPECS
  unknown = [name for name in names if name not in BY_NAME]
  if unknown:
    raise ValueError(f'unknown objective(s) {", ".join(unknown)}; choose among '
                     f'{", ".join(BY_NAME)}')
  return tuple(spec for spec in SPECS if spec.name in names)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A rung of the comparison: a FLOPs budget and which objectives run with how many seeds.

  Attributes:
    budget: training FLOPs per cell.
    groups: ``((objective names, seeds), ...)``: each group's objectives run
      seeds ``0 .. seeds - 1``.
    note: what the rung is for.
  """
  budget: float
  groups: Tuple[Tuple[Tuple[str, ...], int], ...]
  note: str = ''

  def plan(self) -> Tuple[Tuple[ObjectiveSpec, Tuple[int, ...]], ...]:
    """``((spec, seeds), ...)`` in the table's order."""
    seeds = {name: tuple(range(count)) for names, count in self.groups for name in names}
    return tuple((spec, seeds[spec.name]) for spec in SPECS if spec.name in seeds)


# The no-pre-training reference row of each model family.
REFERENCE_ROW: Dict[str, str] = {ENCODER_DECODER: 'scratch_t5', ENCODER: 'scratch_encoder',
                                 DECODER: 'scratch_decoder'}
_REFERENCES = tuple(REFERENCE_ROW.values())
# The core comparisons: each paper's objective against its baseline at equal FLOPs.
_CORE = (('span_corruption', 'spactor_tau25'), ('mlm', 'electra', 'rts', 'slm'))
_DECODERS = ('causal_lm', 'headless_causal_lm', 'causal_lm_then_lm_tuning')

_RUNG = ((_CORE[0], 3), (_CORE[1], 3), (_DECODERS, 5), (_REFERENCES, 3))
PRESETS: Dict[str, Preset] = {
    'rung_2e12': Preset(2e12, _RUNG, 'the core comparisons at the default budget'),
    'rung_2e13': Preset(2e13, _RUNG, 'the core comparisons at 10 times the default budget'),
    'rung_6e13': Preset(6e13, _RUNG, 'the next rung: smoke-tested on a tiny budget, not run'),
}
