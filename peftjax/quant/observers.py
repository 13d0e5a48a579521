"""Activation-range observers for calibration, as pure functions over a small state dict.

A state is a dict of float32 scalars (a jax pytree), so :func:`update` can run inside ``jit``
and states can be stored next to parameters. Every observer is per tensor: one ``(min, max)``
per observed activation. Kinds:

* ``'minmax'``: the running min/max over all batches seen.
* ``'moving_average'``: each batch's min/max averaged with momentum,
  ``m <- momentum * m + (1 - momentum) * batch``; the first batch initialises ``m`` directly.
* ``'percentile'``: each batch's ``(100 - p)``-th and ``p``-th percentile of ``x`` (low and high
  end), averaged over batches. Clips rare outliers that would otherwise stretch the grid.

>>> state = init_state('minmax')
>>> for x in batches:                        # doctest: +SKIP
...   state = update('minmax', state, x)
>>> x_min, x_max = finalize('minmax', state)  # doctest: +SKIP
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from peftjax.errors import ConfigError

KINDS = ('minmax', 'moving_average', 'percentile')


def _check_kind(kind) -> None:
  if kind not in KINDS:
    raise ConfigError(f'quant.observer={kind!r} is invalid; valid: {", ".join(KINDS)}')


def init_state(kind: str) -> dict[str, jax.Array]:
  """The empty state of an observer of ``kind`` (no batch seen).

  ``min``/``max`` hold the running statistic (for ``'percentile'``: running sums of the
  per-batch percentiles); ``count`` is the number of batches seen. Starting at 0 rather than
  +/-inf keeps every leaf finite; ``count`` tells the first batch apart.

  >>> sorted(init_state('minmax'))
  ['count', 'max', 'min']
  """
  _check_kind(kind)
  zero = jnp.zeros((), jnp.float32)
  return {'min': zero, 'max': zero, 'count': zero}


def update(kind: str, state: dict[str, jax.Array], x, *, momentum: float = 0.9,
           percentile: float = 99.99) -> dict[str, jax.Array]:
  """The state after observing the batch ``x`` (any shape; reduced to one min and one max).

  >>> s = update('moving_average', init_state('moving_average'), jnp.array([-1.0, 2.0]))
  >>> float(s['max'])
  2.0
  """
  _check_kind(kind)
  x = jnp.asarray(x, jnp.float32).reshape(-1)
  first = state['count'] == 0
  count = state['count'] + 1.0
  if kind == 'minmax':
    lo, hi = jnp.min(x), jnp.max(x)
    new_min = jnp.where(first, lo, jnp.minimum(state['min'], lo))
    new_max = jnp.where(first, hi, jnp.maximum(state['max'], hi))
  elif kind == 'moving_average':
    lo, hi = jnp.min(x), jnp.max(x)
    new_min = jnp.where(first, lo, momentum * state['min'] + (1.0 - momentum) * lo)
    new_max = jnp.where(first, hi, momentum * state['max'] + (1.0 - momentum) * hi)
  else:
    # Signed percentiles at both ends (not |x|): for a one-sided activation such as GELU's
    # output the low end stays near its true minimum instead of mirroring the high end.
    lo = jnp.percentile(x, 100.0 - percentile)
    hi = jnp.percentile(x, percentile)
    new_min = state['min'] + lo
    new_max = state['max'] + hi
  return {'min': new_min.astype(jnp.float32), 'max': new_max.astype(jnp.float32),
          'count': count.astype(jnp.float32)}


def finalize(kind: str, state: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``(x_min, x_max)`` as float32 scalars; feed them to :func:`peftjax.quant.ops.compute_scale`.

  Raises :class:`ConfigError` if no batch was observed. The check needs a concrete ``count``;
  under ``jit`` it is skipped (an empty state then gives ``(0, 0)``, which ``compute_scale``
  turns into the minimum scale rather than NaN).

  >>> finalize('minmax', update('minmax', init_state('minmax'), jnp.array([-1.0, 3.0])))
  (Array(-1., dtype=float32), Array(3., dtype=float32))
  """
  _check_kind(kind)
  count = state['count']
  if not isinstance(count, jax.core.Tracer) and float(count) < 1:
    raise ConfigError('no calibration batches observed; quant.calibration_batches must be >= 1')
  x_min = jnp.asarray(state['min'], jnp.float32)
  x_max = jnp.asarray(state['max'], jnp.float32)
  if kind == 'percentile':
    n = jnp.maximum(count, 1.0)
    x_min, x_max = x_min / n, x_max / n
  return x_min, x_max
