"""XLA CPU workarounds that change speed, never values."""
from __future__ import annotations

import functools


@functools.cache
def use_unrolled_threefry() -> bool:
  """Lowers threefry (dropout masks) on CPU as straight-line code instead of a rolled loop.

  jax lowers ``threefry2x32`` on CPU as a 5-trip ``while`` loop to save compile time; every trip
  streams the whole counter array through memory (29 ms vs 1.7 ms for a (32, 64, 1536) mask here)
  and the loop state keeps six uint32 copies of each mask alive. GPU/TPU already use the unrolled
  lowering; the bits are identical. This touches jax internals, so it returns False and changes
  nothing if they moved.

  >>> use_unrolled_threefry()  # doctest: +SKIP
  True
  """
  try:
    from jax._src.random import threefry2x32 as threefry  # pylint: disable=g-import-not-at-top
    from jax.interpreters import mlir  # pylint: disable=g-import-not-at-top
    mlir.register_lowering(threefry.threefry2x32_p,
                           threefry._threefry2x32_lowering_rule,  # pylint: disable=protected-access
                           platform='cpu')
    return True
  except (ImportError, AttributeError, TypeError):
    return False
