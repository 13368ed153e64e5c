"""Whether a cell has left its trivial phase: the gates a result must pass to be read.

A tiny model early in training sits at a trivial solution (RTD answering
"original" everywhere, a language model no better than token statistics); a
difference between two such cells says nothing about the objectives. Each
pre-trained cell is checked at its last held-out evaluation against the gate
of its objective:

* a vocabulary loss that a count model also reaches: the held-out loss per
  token below the trigram's (span corruption's targets for the
  encoder-decoder family, the causal LM's tokens for the decoders;
  ``baselines.json``), the masked-LM losses below the unigram's (token
  frequencies). A decoder whose cells have zero-shot next-token records is
  judged on those instead: its loss over every held-out token against the
  trigram's on the same items (``baselines.json``'s ``zero_shot``, matched by
  the items' digest), since the in-run evaluation reads only the split's
  first batches;
* replaced-token detection: recall of the replaced tokens ≥ 0.3;
* COCO-LM's copy head: accuracy above answering "original" everywhere
  (``1 − replaced_fraction``) by at least 0.3 of the replaced positions.

A row's downstream scores must beat the no-pre-training reference row of its
family (mean over seeds). An objective without a gate of its own (the
headless ones' contrastive losses) is judged downstream only. A row that fails
a gate reads "not yet informative", never as a result.
"""

import dataclasses
import statistics
from typing import Callable, Dict, List, Mapping, Optional, Sequence

RECALL = 0.3  # replaced tokens a detector must find


@dataclasses.dataclass(frozen=True)
class Gate:
  """One objective's pre-training gate.

  Attributes:
    what: the measure, as the table prints it.
    value: the measure from a cell's last held-out metrics (``None``: absent).
    threshold: the bound from ``baselines.json`` (``None``: not available).
    higher_is_better: pass when ``value`` ≥ the bound, else when it is below.
    bound: what the bound is (``'trigram'``: the trigram's loss), or ``''``
      for a constant.
  """
  what: str
  value: Callable[[Mapping[str, float]], Optional[float]]
  threshold: Callable[[Mapping[str, dict]], Optional[float]]
  higher_is_better: bool
  bound: str


@dataclasses.dataclass(frozen=True)
class Verdict:
  """``passed``: ``True`` / ``False``, ``None`` when it cannot be judged; ``text`` says why."""
  passed: Optional[bool]
  text: str


def _metric(name: str) -> Callable[[Mapping[str, float]], Optional[float]]:
  return lambda final: final.get(name)


def _ngram(stream: str, order: str) -> Callable[[Mapping[str, dict]], Optional[float]]:
  return lambda baselines: ((baselines.get('ngram') or {}).get(stream) or {}).get(order)


def _copy_gain(final: Mapping[str, float]) -> Optional[float]:
  """The copy head's accuracy over answering "original", in replaced positions."""
  if 'copy_accuracy' not in final or not final.get('replaced_fraction'):
    return None
  return (final['copy_accuracy'] - (1 - final['replaced_fraction'])) / final['replaced_fraction']


_SC = Gate('held-out SC loss', _metric('heldout_sc_loss'), _ngram('span_corruption', 'trigram'),
           False, 'trigram')
_LM = Gate('held-out LM loss', _metric('lm_loss'), _ngram('causal_lm', 'trigram'), False,
           'trigram')
_RTD = Gate('RTD recall', _metric('rtd_recall'), lambda _: RECALL, True, '')
GATES: Dict[str, Gate] = {
    'span_corruption': _SC, 'spactor_tau12': _SC, 'spactor_tau25': _SC, 'light_spactor': _SC,
    'mlm': Gate('masked-LM loss', _metric('mlm_loss'), _ngram('causal_lm', 'unigram'), False,
                'unigram'),
    'slm': Gate('swapped-LM loss', _metric('slm_loss'), _ngram('causal_lm', 'unigram'), False,
                'unigram'),
    'electra': _RTD, 'rts': _RTD, 'crts': _RTD,
    'coco_lm': Gate('copy-head gain over "original" (share of replaced)', _copy_gain,
                    lambda _: RECALL, True, ''),
    'causal_lm': _LM, 'causal_lm_then_lm_tuning': _LM, 'headless_causal_lm': _LM,
}


def _whole_split_trigram(records: Sequence[Mapping]) -> Callable[[Mapping[str, dict]],
                                                                   Optional[float]]:
  """The trigram's loss on the records' items, if ``baselines.json`` scored the same items."""
  def threshold(baselines: Mapping[str, dict]) -> Optional[float]:
    reference = ((baselines.get('zero_shot') or {}).get('next_token') or {}).get('trigram')
    if reference is None or {r.get('digest') for r in records} != {reference.get('digest')}:
      return None
    return reference['loss']
  return threshold


def pretraining(objective: str, finals: Sequence[Mapping[str, float]],
                baselines: Optional[Mapping[str, dict]],
                zero_shot_records: Sequence[Mapping] = ()) -> Optional[Verdict]:
  """The objective's gate over its cells' last held-out metrics; ``None``: no gate.

  ``zero_shot_records``: the cells' zero-shot records (``compare/zero_shot.py``);
  next-token ones replace the in-run loss of a decoder's gate.
  """
  gate = GATES.get(objective)
  if gate is None:
    return None
  next_token = [r for r in zero_shot_records if r.get('measure') == 'next_token']
  if gate is _LM and next_token:
    gate = Gate('next-token loss, whole split', _metric('loss'),
                _whole_split_trigram(next_token), False, 'trigram')
    finals = next_token
  values = [v for v in (gate.value(final) for final in finals) if v is not None]
  if not values:
    return Verdict(None, f'{gate.what}: not measured')
  bound = gate.threshold(baselines or {})
  if bound is None:
    return Verdict(None, f'{gate.what}: no {gate.bound} count model of these tokens '
                   '(run compare_baselines.py)')
  passing = sum((v >= bound) if gate.higher_is_better else (v < bound) for v in values)
  bound_text = f'{gate.bound} {bound:.3g}' if gate.bound else f'{bound:.3g}'
  mean = statistics.fmean(values)
  if passing == len(values):
    text = (f'{gate.what} {mean:.3g} {"≥" if gate.higher_is_better else "<"} {bound_text} '
            f'({passing}/{len(values)} seeds)')
  else:
    text = f'{gate.what} {mean:.3g}, {bound_text}: {passing}/{len(values)} seeds pass'
  return Verdict(passing == len(values), text)


def downstream(scores: List[float], reference: List[float], task: str) -> Verdict:
  """Whether the mean score on ``task`` beats the no-pre-training row's mean."""
  if not scores:
    return Verdict(None, f'{task}: no score')
  if not reference:
    return Verdict(None, f'{task}: no no-pre-training reference yet')
  mine, base = statistics.fmean(scores), statistics.fmean(reference)
  if mine > base:
    return Verdict(True, f'{task} {mine:.1f} > no pre-training {base:.1f}')
  return Verdict(False, f'{task} {mine:.1f} ≤ no pre-training {base:.1f}')

