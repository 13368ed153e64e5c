"""T5X-style gin flags with one-line errors.

Flags: ``--gin_file=F`` (repeatable), ``--gin.NAME=VALUE`` (repeatable; a
bare word or path such as ``--gin.MODEL_DIR=/tmp/run`` needs no extra
quotes), T5X's ``--gin_bindings='NAME = VALUE'`` (repeatable, gin syntax),
``--gin_search_paths=a,b`` and T5X's ``--tfds_data_dir=DIR`` (where TFDS
data sets are read). A mistake in a file or a binding ends in
``ConfigError`` naming the file (or flag) and the binding, with the nearest
valid names for an unknown one (``gin_names``); a bound macro that no gin
file reads is refused the same way.
"""

import dataclasses
import logging
import os
import re
import sys
import tokenize
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import gin

from spactor_jax import errors
from spactor_jax import gin_names

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SEARCH_PATHS = (os.getcwd(), os.path.join(_PACKAGE_ROOT, 'gin_configs'),
                        _PACKAGE_ROOT)


@dataclasses.dataclass
class GinFlags:
  files: List[str] = dataclasses.field(default_factory=list)
  bindings: List[str] = dataclasses.field(default_factory=list)
  search_paths: List[str] = dataclasses.field(default_factory=list)
  tfds_data_dir: Optional[str] = None
  # The flag each binding came from, as typed (for error messages).
  origins: Dict[str, str] = dataclasses.field(default_factory=dict)

  def flag_of(self, binding: str) -> str:
    return self.origins.get(binding) or f'--gin.{binding.replace(" = ", "=", 1)}'


def split_flags(argv: Sequence[str]) -> Tuple[GinFlags, List[str]]:
  """Separates gin flags from the other arguments.

  Accepts ``--flag=value`` and ``--flag value`` forms.
  """
  flags, rest = GinFlags(), []
  args = list(argv)
  while args:
    arg = args.pop(0)
    name, has_value, value = arg.partition('=')
    is_gin = name in _VALUE_FLAGS or name.startswith('--gin.')
    if is_gin and not has_value:
      if not args:
        raise errors.ConfigError(f'flag {name} needs a value, e.g. {name}=...')
      value = args.pop(0)
    if name == '--gin_file':
      flags.files.append(value)
    elif name == '--gin_search_paths':
      flags.search_paths.extend(p for p in value.split(',') if p)
    elif name == '--gin_bindings':
      flags.bindings.append(value)
      flags.origins[value] = f'--gin_bindings={value}'
    elif name == '--tfds_data_dir':
      flags.tfds_data_dir = value
    elif name.startswith('--gin.'):
      flags.bindings.append(f'{name[len("--gin."):]} = {_literal(value)}')
    else:
      rest.append(arg)
  return flags, rest


_VALUE_FLAGS = ('--gin_file', '--gin_search_paths', '--gin_bindings', '--tfds_data_dir')
_GIN_VALUE_START = re.compile(r"""^\s*([-+\d.'"\[\(\{@%]|True$|False$|None$|inf$|nan$)""")


def _literal(value: str) -> str:
  """``/tmp/run`` → ``'/tmp/run'``; values that already look like gin stay."""
  if _GIN_VALUE_START.match(value):
    return value
  return repr(value)


def _location(exc: BaseException) -> str:
  """``file:line`` from a gin parse error, when gin gives one."""
  match = re.search(r'In file "([^"]+)", line (\d+)', str(exc))
  if match:
    return f'{match.group(1)}:{match.group(2)}'
  location = getattr(exc, 'location', None)
  if location is not None and getattr(location, 'filename', None):
    return f'{location.filename}:{location.line_num}'
  if isinstance(exc, SyntaxError) and exc.filename:
    return f'{exc.filename}:{exc.lineno}'
  return ''


def _resolve(path: str, search_paths: Sequence[str]) -> str:
  if os.path.isabs(path) or os.path.exists(path):
    return path
  for root in search_paths:
    candidate = os.path.join(root, path)
    if os.path.exists(candidate):
      return candidate
  raise errors.ConfigError(
      f'gin file {path!r} not found (searched {", ".join(search_paths)}); '
      'check the path or add its folder with --gin_search_paths')


def parse(flags: GinFlags) -> None:
  """Parses the files then the bindings; raises a one-line ``ConfigError``."""
  search_paths = list(dict.fromkeys(
      list(flags.search_paths) + list(DEFAULT_SEARCH_PATHS)))
  for root in search_paths:
    gin.add_config_file_search_path(root)
  for path in flags.files:
    resolved = _resolve(path, search_paths)
    try:
      gin.parse_config_file(resolved)
    except Exception as exc:  # gin raises many exception types.
      where = _location(exc) or resolved
      raise errors.ConfigError(
          f'{where}: {gin_names.hint(errors.first_line(exc))}') from None
  for binding in flags.bindings:
    try:
      gin.parse_config(binding)
    except Exception as exc:  # gin raises many exception types.
      flag = flags.flag_of(binding)
      if isinstance(exc, (SyntaxError, tokenize.TokenError)):
        raise errors.ConfigError(
            f'{flag}: the value is not valid gin (a Python literal, '
            '@configurable or %MACRO)') from None
      raise errors.ConfigError(f'{flag}: {gin_names.hint(errors.first_line(exc))}') from None
  gin_names.check_macros({b: flags.flag_of(b) for b in flags.bindings})
  try:
    gin.finalize()
  except ValueError as exc:
    missing = re.match(r'(\S+?)(/macro\.value)? set to `%gin.REQUIRED`', str(exc))
    if not missing:
      raise
    name = missing.group(1)
    raise errors.ConfigError(
        f'{name} is required but not set; add --gin.{name}=VALUE or bind it in '
        'a gin file') from None


def call(fn, *args, **kwargs):
  """Calls a gin-configured function, turning missing bindings into one line."""
  try:
    return fn(*args, **kwargs)
  except RuntimeError as exc:
    message = str(exc)
    if 'Required bindings' in message or 'gin.REQUIRED' in message:
      raise errors.ConfigError(
          f'{errors.first_line(exc)}; set it in a gin file or with --gin.NAME=VALUE'
      ) from None
    raise


def _hide_gin_search_misses(record: logging.LogRecord) -> bool:
  """gin logs an error for every search path an include is not under."""
  return not str(record.msg).startswith('Path not found')


def _hide_orbax_thread_tracebacks(record: logging.LogRecord) -> bool:
  """orbax logs a failed background save's whole traceback (800+ lines).

  The same exception reaches the run when it waits for the save, which reports
  it in its one ``error:`` line; the copy logged from the thread is dropped.
  """
  return not (record.exc_info and 'orbax' in record.pathname
              and 'raised an exception' in str(record.msg))


def _hide_orbax_step_metadata_misses(record: logging.LogRecord) -> bool:
  """orbax warns when a step's ``state/`` item, read on its own, has no metadata file of its
  own: that file lives in the step folder, one level up, so nothing is missing."""
  return not str(record.msg).startswith('Metadata file does not exist')


def setup_logging() -> None:
  """Timestamped INFO lines from ``spactor_jax``, warnings from the rest."""
  logging.basicConfig(level=logging.WARNING, format='%(asctime)s %(message)s',
                      datefmt='%H:%M:%S', force=True)
  logging.getLogger('spactor_jax').setLevel(logging.INFO)
  for handler in logging.getLogger().handlers:
    handler.addFilter(_hide_gin_search_misses)
    handler.addFilter(_hide_orbax_thread_tracebacks)
    handler.addFilter(_hide_orbax_step_metadata_misses)


def parse_with_tasks(flags: GinFlags) -> None:
  """Registers the seqio tasks (when seqio is installed), then parses the gin
  files and bindings.

  Raises:
    ConfigError: when no gin file is given or a file or binding is wrong.
  """
  if not flags.files:
    raise errors.ConfigError(
        'no --gin_file given; try --gin_file=gin_configs/quickstart.gin')
  try:
    import tasks  # pylint: disable=g-import-not-at-top,unused-import
  except ModuleNotFoundError as exc:
    if (exc.name or '').split('.')[0] not in ('tensorflow', 'seqio', 't5'):
      raise
    # Installed without them: no task is registered, a pre-built input is read.
  if flags.tfds_data_dir:
    import seqio  # pylint: disable=g-import-not-at-top
    seqio.set_tfds_data_dir_override(flags.tfds_data_dir)
  parse(flags)


def run_main(body: Callable[[GinFlags, List[str]], None],
             argv: Optional[Sequence[str]] = None, usage: Optional[str] = None) -> int:
  """The shared shape of the entry points' ``main``.

  Sets up logging, splits the gin flags from the other arguments and calls
  ``body(gin_flags, other_args)``; a ``ConfigError`` from anywhere inside
  becomes one ``error: ...`` line on stderr and exit status 2.

  Args:
    body: the entry point's work; it parses ``other_args`` itself.
    argv: arguments without the program name (default ``sys.argv[1:]``).
    usage: printed for ``--help`` / ``-h`` (then nothing else runs).

  Returns:
    The process exit status: 0, or 2 after a configuration error.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  if usage is not None and ('--help' in argv or '-h' in argv):
    print(usage.strip())
    return 0
  setup_logging()
  try:
    flags, rest = split_flags(argv)
    body(flags, rest)
  except errors.ConfigError as exc:
    print(f'error: {exc}', file=sys.stderr)
    return 2
  return 0
