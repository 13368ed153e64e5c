r"""Pre-training entry point.

    python -m spactor_jax.train \
      --gin_file=gin_configs/quickstart.gin \
      --gin.MODEL_DIR=/tmp/spactor_quickstart

Parses T5X-style gin flags, starts the multi-host runtime and runs
``training.train``. Configuration mistakes end with one ``error:`` line and
exit status 2.
"""

import sys
from typing import List, Optional, Sequence

from spactor_jax import errors
from spactor_jax import gin_utils
from spactor_jax import runtime
from spactor_jax import training


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Console entry point; returns the process exit status."""
  return gin_utils.run_main(_train, argv)


def _train(flags: gin_utils.GinFlags, rest: List[str]) -> None:
  if rest:
    raise errors.ConfigError(
        f'unknown arguments {rest}; use --gin_file=F and --gin.NAME=VALUE')
  gin_utils.parse_with_tasks(flags)
  runtime.initialize()
  training.train(gin_utils.call(training.RunConfig))


if __name__ == '__main__':
  sys.exit(main())
