r"""Pre-training entry point.

    python -m spactor_jax.train \
      --gin_file=gin_configs/quickstart.gin \
      --gin.MODEL_DIR=/tmp/spactor_quickstart

Parses T5X-style gin flags, starts the multi-host runtime and runs
``training.train``. Configuration mistakes end with one ``error:`` line and
exit status 2.
"""

import logging
import sys
from typing import Optional, Sequence

from spactor_jax import errors
from spactor_jax import gin_utils
from spactor_jax import runtime
from spactor_jax import training


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Console entry point; returns the process exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(message)s',
                      datefmt='%H:%M:%S', force=True)
  logging.getLogger('spactor_jax').setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_hide_gin_search_misses)
  try:
    flags, rest = gin_utils.split_flags(argv)
    if rest:
      raise errors.ConfigError(
          f'unknown arguments {rest}; use --gin_file=F and --gin.NAME=VALUE')
    if not flags.files:
      raise errors.ConfigError(
          'no --gin_file given; try --gin_file=gin_configs/quickstart.gin')
    _import_task_registry()
    gin_utils.parse(flags)
    runtime.initialize()
    training.train(gin_utils.call(training.RunConfig))
  except errors.ConfigError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  return 0


def _hide_gin_search_misses(record: logging.LogRecord) -> bool:
  """gin logs an error for every search path an include is not under."""
  return not str(record.msg).startswith('Path not found')


def _import_task_registry() -> None:
  """Imports ``tasks`` so that every task is registered with seqio."""
  import tasks  # pylint: disable=g-import-not-at-top,unused-import


if __name__ == '__main__':
  sys.exit(main())
