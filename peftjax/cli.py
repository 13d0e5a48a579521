"""Shared command-line plumbing of the entry points (training, int8 conversion)."""
import pathlib

from absl import app
from absl import flags
from absl import logging

# Every entry point imports this module, so each has --verbose: full tracebacks instead of the
# one-line messages of peftjax.errors (PEFTJAX_VERBOSE=1 does the same).
flags.DEFINE_bool('verbose', False, 'Show the full traceback of a failure instead of one line '
                  '(also: PEFTJAX_VERBOSE=1).')


def parse_flags(argv):
  """absl flag parsing, with a misspelled ``--config.x.y`` reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    lines = str(e).encode().decode('unicode_escape').strip('\'"').splitlines()
    if isinstance(e, AttributeError):  # ml_collections: a key the locked config does not have
      lines[0] = f"unknown config field '{lines[0].strip(chr(39))}'."
    raise SystemExit(f'error: bad flag or config override: {" ".join(lines)}') from None


def quiet(argv) -> None:
  """No stray arguments; absl logs at WARNING unless ``--verbosity`` is given (orbax and the
  backend probe log at INFO)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def begin(argv, config) -> None:
  """The common start of an entry point: no stray arguments, quiet orbax, a validated config.

  A config error exits with its one-line message before any compute.
  """
  quiet(argv)
  from peftjax import validate  # pylint: disable=g-import-not-at-top
  from peftjax.errors import UserInputError  # pylint: disable=g-import-not-at-top
  try:
    validate.validate(config)
  except UserInputError as e:
    raise SystemExit(f'error: {e}') from None


def enable_compilation_cache(path: str):
  """Persists compiled executables under ``path``; the key is the program, not the run."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', str(pathlib.Path(path).expanduser()))
  # Cache everything worth a few hundred ms; train/eval steps take 5-30 s to compile here.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
