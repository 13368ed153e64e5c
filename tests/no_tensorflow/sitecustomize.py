"""Makes ``tensorflow``, ``seqio`` and ``t5`` look uninstalled in a child process.

A child whose ``PYTHONPATH`` starts with this folder runs this file at start
up (Python imports ``sitecustomize`` by itself). Every import finder then
finds nothing for those packages or their submodules, as on a machine
without them: ``import tensorflow`` raises ``ModuleNotFoundError`` and
``importlib.util.find_spec('tensorflow')`` is ``None``. ``t5x`` and other
names that merely start alike are not hidden.
"""

import sys

HIDDEN = ('tensorflow', 'seqio', 't5')


class _Hiding:
  """A ``sys.meta_path`` finder that finds what ``finder`` finds, except ``HIDDEN``."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in HIDDEN:
      return None
    return self._finder.find_spec(name, path, target)

  def __getattr__(self, attribute):  # invalidate_caches, find_distributions, ...
    return getattr(self._finder, attribute)


sys.meta_path[:] = [_Hiding(finder) for finder in sys.meta_path]
