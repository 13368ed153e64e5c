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

  @property
  def num_stages(self) -> int:
    return len(self.stage_fractions) + 1

  @property
  def downstream_tasks(self) -> Tuple[str, ...]:
    return DOWNSTREAM_TASKS[self.family]


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
    ObjectiveSpec('headless_causal_lm', 'headless causal LM, then LM-tuning (last 10%)',
                  'quickstart_headless_causal_lm_then_lm_tuning.gin', DECODER,
                  ('PRETRAIN_STEPS',), (0.9,), 'causal_lm',
                  'LAMBADA accuracy 22.2 vs 19.52 of a vanilla causal LM after LM-tuning'),
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
