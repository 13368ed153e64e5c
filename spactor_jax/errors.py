"""Errors that the entry points report as one readable line."""


class ConfigError(ValueError):
  """A user mistake in configuration or input data.

  The message must say what is wrong and how to fix it, in one line. Entry
  points print it as ``error: <message>`` and exit with status 2, without a
  traceback.
  """
