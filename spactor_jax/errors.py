"""Errors that the entry points report as one readable line."""


class ConfigError(ValueError):
  """A user mistake in configuration or input data.

  The message must say what is wrong and how to fix it, in one line. Entry
  points print it as ``error: <message>`` and exit with status 2, without a
  traceback.
  """


class RunError(RuntimeError):
  """A failure while training (a failed save, non-finite numerics, ...).

  Reported like ``ConfigError`` as one ``error: <message>`` line, with exit
  status 1: the configuration was valid but the run could not go on.
  """


def first_line(exc: BaseException) -> str:
  """The first non-empty line of an exception's message (or its type's name)."""
  lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
  return lines[0] if lines else type(exc).__name__
