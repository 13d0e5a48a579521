"""Errors for bad user input, and the one place that turns failures into one line.

Every message names the field or path, the bad value, and what would be valid. Every entry
point (``python -m peftjax.main``, ``predict``, ``export``, ``quant.convert``,
``compress.deep``, ``experiments.sweep``) runs its ``main`` through :func:`run`, which prints
a known failure as one line on stderr and exits non-zero; the traceback is shown only with
``--verbose`` or ``PEFTJAX_VERBOSE=1``.

>>> from peftjax import errors
>>> errors.describe(errors.ConfigError('train.steps=0 must be >= 1'))
'train.steps=0 must be >= 1'
"""
from __future__ import annotations

import errno
import os
import sys

VERBOSE_ENV = 'PEFTJAX_VERBOSE'
# Exit codes: 1 for a failure, 130 (128 + SIGINT) for Ctrl-C, as shells report it.
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class UserInputError(ValueError):
  """Base class of input mistakes a user can fix; entry points print them without a traceback."""


class ConfigError(UserInputError):
  """An invalid config value."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C (or SIGTERM) in a long job, carrying where it stopped and how to continue.

  The loop raises it after it has closed its files; :func:`run` prints its message.
  """


def verbose(argv=None) -> bool:
  """Whether tracebacks are wanted: ``--verbose`` on the command line or ``PEFTJAX_VERBOSE``."""
  if os.environ.get(VERBOSE_ENV, '').strip().lower() not in ('', '0', 'false', 'no'):
    return True
  argv = sys.argv if argv is None else argv
  return any(a in ('--verbose', '--verbose=true', '--verbose=1') for a in argv)


def describe(e: BaseException) -> str | None:
  """The one-line message for a known failure, or None for an unexpected one (a bug).

  Known: input mistakes (:class:`UserInputError` and its kin), a non-finite loss, missing or
  unreadable files, a full disk, files that are not text. The message never spans lines.
  """
  msg = None
  if isinstance(e, (UserInputError, FloatingPointError)) or _is_usage_error(e):
    msg = str(e)
  elif isinstance(e, OSError) and e.errno == errno.ENOSPC:
    where = f' writing {e.filename}' if e.filename else ''
    msg = (f'no space left on the device{where}; files that were being written were not '
           'completed and earlier checkpoints are intact; free some space and rerun to resume')
  elif isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError,
                      NotADirectoryError)):
    msg = f'{e.strerror or type(e).__name__}: {e.filename!r}' if e.filename else str(e)
  elif isinstance(e, UnicodeDecodeError):
    msg = (f'input is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset '
           f'{e.start}); convert the file to UTF-8')
  if msg is None:
    return None
  return ' '.join(str(msg).split()) or type(e).__name__


def _is_usage_error(e: BaseException) -> bool:
  """absl's ``app.UsageError`` (stray arguments, a missing required flag), without importing
  absl here."""
  return any(c.__name__ == 'UsageError' and c.__module__.startswith('absl')
             for c in type(e).__mro__)


def guard(fn):
  """Wraps an entry point's ``main(argv)``: known failures become one line and exit 1;
  Ctrl-C exits 130 with one line; an unexpected exception also prints one line (naming its
  type and how to see the traceback) unless tracebacks are asked for."""
  def wrapped(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except SystemExit:
      raise
    except KeyboardInterrupt as e:
      if verbose():
        raise
      print(f'interrupted: {e}' if str(e) else 'interrupted', file=sys.stderr)
      sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # pylint: disable=broad-except
      if verbose():
        raise
      msg = describe(e)
      if msg is None:
        detail = ' '.join(str(e).split())[:300]
        msg = (f'unexpected {type(e).__name__}: {detail} (this is a bug in peftjax or a case '
               f'it does not check yet; rerun with --verbose or {VERBOSE_ENV}=1 for the '
               'traceback)')
      print(f'error: {msg}', file=sys.stderr)
      sys.exit(EXIT_FAILURE)
  wrapped.__name__ = getattr(fn, '__name__', 'main')
  wrapped.__doc__ = getattr(fn, '__doc__', None)
  return wrapped


def run(main, flags_parser=None) -> None:
  """``absl.app.run(main)`` with :func:`guard` around both flag parsing and ``main``.

  >>> if __name__ == '__main__':            # doctest: +SKIP
  ...   errors.run(main)
  """
  from absl import app  # pylint: disable=g-import-not-at-top
  if flags_parser is None:
    from peftjax import cli  # pylint: disable=g-import-not-at-top
    flags_parser = cli.parse_flags
  app.run(guard(main), flags_parser=guard(flags_parser))
