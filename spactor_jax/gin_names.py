"""Nearest valid names for a misspelled gin name, and the check of macro bindings.

Gin itself rejects an unknown configurable or parameter (with no hint) and
accepts a macro that nothing reads: ``--gin.TRAIN_STEP=40`` would bind a new
macro and leave ``TRAIN_STEPS`` as it was. ``hint`` adds the nearest valid
names to gin's message; ``check_macros`` refuses a bound macro that no
binding reads.
"""

import difflib
import inspect
import re
from typing import Iterable, List, Mapping, Optional, Set

import gin

from spactor_jax import errors

_UNKNOWN_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")
_UNKNOWN_CONFIGURABLE = re.compile(r"No configurable matching (?:reference )?'@?([^'(]+)")
# How much less similar than the best suggestion another may be and still be offered.
_NEAR_BEST = 0.1


def nearest(name: str, candidates: Iterable[str], count: int = 3) -> List[str]:
  """Up to ``count`` of ``candidates`` closest to ``name`` (case-insensitive), best first.

  Only names about as close as the closest one are offered: a typo of
  ``SpanCorruption`` suggests it alone, not also ``HeadlessSpanCorruption``.
  """
  by_lower = {}
  for candidate in candidates:
    by_lower.setdefault(candidate.lower(), candidate)
  matches = difflib.get_close_matches(name.lower(), by_lower, n=count, cutoff=0.6)
  if not matches:
    return []
  score = lambda match: difflib.SequenceMatcher(None, name.lower(), match).ratio()
  best = score(matches[0])
  return [by_lower[m] for m in matches if score(m) >= best - _NEAR_BEST]


def _did_you_mean(names: List[str]) -> str:
  if not names:
    return ''
  return f'; did you mean {" or ".join([", ".join(names[:-1])] * (len(names) > 1) + names[-1:])}?'


def configurable_names() -> Set[str]:
  """The short name of every registered configurable (``TransformerConfig``, ``SpacTor``)."""
  return {configurable.name for _, configurable in gin.config._REGISTRY.items()}  # pylint: disable=protected-access


def parameter_names(configurable_name: str) -> List[str]:
  """The parameters a configurable accepts (empty if unknown or not inspectable)."""
  configurable = gin.config._REGISTRY.get_match(configurable_name)  # pylint: disable=protected-access
  if configurable is None:
    return []
  try:
    return list(inspect.signature(configurable.wrapped).parameters)
  except (TypeError, ValueError):
    return []


def hint(message: str) -> str:
  """Gin's one-line ``message`` plus the nearest valid names, when it names an unknown one."""
  message = message.rstrip('.')
  match = _UNKNOWN_PARAMETER.search(message)
  if match:
    return message + _did_you_mean(nearest(match.group(2), parameter_names(match.group(1))))
  match = _UNKNOWN_CONFIGURABLE.search(message)
  if match:
    name = match.group(1).split('/')[-1].split('.')[-1]
    names = nearest(name, configurable_names())
    return message + (_did_you_mean(names) or
                      '; no configurable has a similar name (is the module that defines '
                      'it imported by a gin file?)')
  return message


def _macro_references(value, found: Set[str]) -> None:
  """Adds the macro names ``value`` reads (``%NAME``), looking inside containers."""
  if isinstance(value, gin.config.ConfigurableReference):
    if value.configurable.name == 'macro':
      found.add(value.scoped_selector.split('/')[0])
  elif isinstance(value, dict):
    for item in value.values():
      _macro_references(item, found)
  elif isinstance(value, (list, tuple, set)):
    for item in value:
      _macro_references(item, found)


def read_macros() -> Set[str]:
  """Every macro that some binding of the parsed configuration reads."""
  found: Set[str] = set()
  for parameters in gin.config._CONFIG.values():  # pylint: disable=protected-access
    for value in parameters.values():
      _macro_references(value, found)
  return found


def macro_name(binding: str) -> Optional[str]:
  """``'TRAIN_STEPS = 40'`` → ``'TRAIN_STEPS'``; None for a parameter binding."""
  target = binding.split('=', 1)[0].strip()
  return target if re.fullmatch(r'[A-Za-z_]\w*', target) else None


def check_macros(bindings: Mapping[str, str]) -> None:
  """Refuses a bound macro that no binding reads, naming the nearest that are read.

  Args:
    bindings: ``{gin binding: the flag it came from}``.

  Raises:
    ConfigError: one line naming the flag, the macro and the nearest read macros.
  """
  read = read_macros()
  for binding, flag in bindings.items():
    name = macro_name(binding)
    if name is not None and name not in read:
      raise errors.ConfigError(
          f'{flag}: no gin file reads the macro {name} (%{name}), so it would change '
          f'nothing{_did_you_mean(nearest(name, read))}')
