"""Shared command-line plumbing of the entry points (training, int8 conversion)."""
from absl import flags


def parse_flags(argv):
  """absl flag parsing, with a misspelled ``--config.x.y`` reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    lines = str(e).encode().decode('unicode_escape').strip('\'"').splitlines()
    if isinstance(e, AttributeError):  # ml_collections: a key the locked config does not have
      lines[0] = f"unknown config field '{lines[0].strip(chr(39))}'."
    raise SystemExit(f'error: bad flag or config override: {" ".join(lines)}') from None
