"""Fake-quantization primitives: ranges, scales, quantize/dequantize, STE and LSQ.

Conventions used by every function here:

* Integers live in a signed ``int8`` container for 2..8 bits. Symmetric quantization uses the
  restricted (narrow) range ``[-(2^(b-1)-1), 2^(b-1)-1]`` (-127..127 for 8 bits), so that the
  grid is symmetric about 0 and int8 x int8 products cannot hit the lone ``-128``; asymmetric
  uses the full range ``[-2^(b-1), 2^(b-1)-1]`` (-128..127) with a zero point.
* Scales and zero points are float32 arrays that broadcast against ``x``: statistics are taken
  with ``keepdims=True``, so a per-tensor scale of a 2-D kernel has shape ``(1, 1)`` and a
  per-output-column one ``(1, out)``. Zero points are float32 holding integer values (0 for
  symmetric).
* Rounding is ``jnp.round``: round half to even (2.5 -> 2, 3.5 -> 4), as in XLA and numpy.
* Gradients follow the straight-through estimator, zero where the integer was clipped.

>>> x = jnp.array([[0.1, -2.0], [1.0, 0.5]])
>>> y = fake_quant_minmax(x, 8, channel_axes=-1)  # one scale per column  # doctest: +SKIP
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import ConfigError

# Smallest scale ever produced: an all-zero channel would otherwise give scale 0 and 0/0 = NaN.
# Any value > 0 works since such a channel's values all quantize to the zero point; 1e-8 is far
# above float32's subnormals, so 1/scale stays finite.
MIN_SCALE = 1e-8

MIN_BITS, MAX_BITS = 2, 8


def check_bits(bits, field: str = 'quant.bits') -> int:
  """Returns ``bits`` if it is an integer in 2..8, else raises :class:`ConfigError`.

  The upper bound is the int8 container; 1 bit has no symmetric grid besides {0}.

  >>> check_bits(4)
  4
  >>> check_bits(9)  # doctest: +SKIP
  ConfigError: quant.bits=9 is invalid; valid: an integer in 2..8
  """
  # bool is an int subclass; True as a bit width is a config mistake, not 1.
  ok = isinstance(bits, (int, np.integer)) and not isinstance(bits, (bool, np.bool_))
  if not ok or not MIN_BITS <= bits <= MAX_BITS:
    raise ConfigError(f'{field}={bits!r} is invalid; valid: an integer in {MIN_BITS}..{MAX_BITS}')
  return int(bits)


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
  """``(qmin, qmax)`` of the integer grid, as Python ints.

  >>> qrange(8, True), qrange(8, False), qrange(4, True)
  ((-127, 127), (-128, 127), (-7, 7))
  """
  bits = check_bits(bits)
  qmax = 2**(bits - 1) - 1
  return (-qmax if symmetric else -qmax - 1), qmax


def reduce_axes(ndim: int, channel_axes: int | Sequence[int] | None) -> tuple[int, ...]:
  """Axes to reduce over to get one statistic per channel (all axes when per-tensor).

  ``channel_axes`` may be an int, a tuple, negative, ``None`` or ``()`` (= per tensor).

  >>> reduce_axes(2, -1)          # Dense kernel (in, out): one scale per output column
  (0,)
  >>> reduce_axes(3, (1, 2))      # DenseGeneral kernel (in, heads, head_dim)
  (0,)
  >>> reduce_axes(3, None)
  (0, 1, 2)
  """
  if channel_axes is None:
    channel_axes = ()
  elif isinstance(channel_axes, (int, np.integer)):
    channel_axes = (channel_axes,)
  keep = set()
  for a in channel_axes:
    if not -ndim <= a < ndim:
      raise ValueError(f'channel axis {a} is out of range for an array of rank {ndim}')
    keep.add(int(a) % ndim)
  return tuple(a for a in range(ndim) if a not in keep)


def compute_scale(x_min, x_max, bits: int, symmetric: bool) -> tuple[jax.Array, jax.Array]:
  """``(scale, zero_point)`` (float32, shape of ``x_min``) mapping ``[x_min, x_max]`` on the grid.

  Symmetric: ``scale = max(|x_min|, |x_max|) / qmax``, zero point 0. Asymmetric: the range is
  first widened to include 0 (so 0, e.g. padding or ReLU zeros, is exactly representable), then
  ``scale = (x_max - x_min) / (qmax - qmin)`` and ``zero_point = round(qmin - x_min / scale)``
  clipped to the grid. Scales are floored at :data:`MIN_SCALE` so constant or all-zero inputs
  never give NaN/inf.

  >>> compute_scale(jnp.float32(-1.0), jnp.float32(2.54), 8, True)  # doctest: +SKIP
  (Array(0.02, dtype=float32), Array(0., dtype=float32))
  """
  qmin, qmax = qrange(bits, symmetric)
  x_min = jnp.asarray(x_min, jnp.float32)
  x_max = jnp.asarray(x_max, jnp.float32)
  if symmetric:
    amax = jnp.maximum(jnp.abs(x_min), jnp.abs(x_max))
    scale = jnp.maximum(amax / qmax, MIN_SCALE)
    return scale, jnp.zeros_like(scale)
  x_min = jnp.minimum(x_min, 0.0)
  x_max = jnp.maximum(x_max, 0.0)
  scale = jnp.maximum((x_max - x_min) / (qmax - qmin), MIN_SCALE)
  zero_point = jnp.clip(jnp.round(qmin - x_min / scale), qmin, qmax)
  return scale, zero_point


def minmax_params(x, bits: int, *, symmetric: bool = True,
                  channel_axes: int | Sequence[int] | None = None) -> tuple[jax.Array, jax.Array]:
  """``(scale, zero_point)`` from ``x``'s own min/max, per tensor or per channel (keepdims).

  >>> s, z = minmax_params(jnp.ones((4, 6)), 8, channel_axes=-1)
  >>> s.shape, z.shape
  ((1, 6), (1, 6))
  """
  axes = reduce_axes(x.ndim, channel_axes)
  x_min = jnp.min(x, axis=axes, keepdims=True)
  x_max = jnp.max(x, axis=axes, keepdims=True)
  return compute_scale(x_min, x_max, bits, symmetric)


def quantize(x, scale, zero_point, bits: int, symmetric: bool) -> jax.Array:
  """``clip(round(x / scale) + zero_point, qmin, qmax)`` as ``int8`` (round half to even).

  >>> quantize(jnp.array([0.5, -3.0]), 0.02, 0.0, 8, True)
  Array([  25, -127], dtype=int8)
  """
  qmin, qmax = qrange(bits, symmetric)
  q = jnp.round(jnp.asarray(x, jnp.float32) / scale) + zero_point
  return jnp.clip(q, qmin, qmax).astype(jnp.int8)


def dequantize(q, scale, zero_point) -> jax.Array:
  """``(q - zero_point) * scale`` as float32.

  >>> dequantize(jnp.array([25, -127], jnp.int8), 0.02, 0.0)  # doctest: +SKIP
  Array([ 0.5 , -2.54], dtype=float32)
  """
  return (q.astype(jnp.float32) - zero_point) * scale


# bits and symmetric are Python scalars fixing the grid: static (nondiff) arguments.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fake_quant(x, scale, zero_point, bits, symmetric):
  # Computed in float32 even for bf16 x: x / scale in bf16 would itself be off the grid.
  q = quantize(x, scale, zero_point, bits, symmetric)
  return dequantize(q, scale, zero_point).astype(x.dtype)


def _fake_quant_fwd(x, scale, zero_point, bits, symmetric):
  return _fake_quant(x, scale, zero_point, bits, symmetric), (x, scale, zero_point)


def _fake_quant_bwd(bits, symmetric, res, g):
  x, scale, zero_point = res
  qmin, qmax = qrange(bits, symmetric)
  # "Not clipped" is decided on the rounded integer, as in PyTorch's fake_quantize: comparing x
  # with (qmax - zp) * scale instead would drop the gradient of a channel's own max whenever
  # float32 gives (amax / qmax) * qmax < amax, i.e. for a sizeable share of channels.
  q = jnp.round(jnp.asarray(x, jnp.float32) / scale) + zero_point
  inside = (q >= qmin) & (q <= qmax)
  dx = jnp.where(inside, g, jnp.zeros_like(g)).astype(x.dtype)
  return dx, jnp.zeros_like(scale), jnp.zeros_like(zero_point)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x, scale, zero_point, bits: int, symmetric: bool) -> jax.Array:
  """``dequantize(quantize(x))`` in ``x``'s dtype, with a clipped straight-through gradient.

  Backward (clipped straight-through estimator): ``dx = g`` where the clip is inactive, i.e.
  ``qmin <= round(x / scale) + zp <= qmax``, and 0 where ``x`` was clipped. This is the
  representable range ``[(qmin - zp) * scale, (qmax - zp) * scale]`` widened by half a step on
  each side (values there round onto the end points without clipping), which also keeps the
  gradient of a tensor's own min/max robust to float rounding. ``scale`` and ``zero_point`` get
  zero cotangents (use :func:`lsq_fake_quant` to learn a step). Rounding is half to even.

  >>> fake_quant(jnp.array([0.503, -3.0]), 0.02, 0.0, 8, True)  # doctest: +SKIP
  Array([ 0.5 , -2.54], dtype=float32)
  """
  x = jnp.asarray(x)
  # Arrays, so the zero cotangents have a definite shape/dtype even for Python-float scales.
  scale = jnp.asarray(scale, jnp.float32)
  zero_point = jnp.asarray(zero_point, jnp.float32)
  return _fake_quant(x, scale, zero_point, check_bits(bits), bool(symmetric))


def fake_quant_minmax(x, bits: int = 8, *, symmetric: bool = True,
                      channel_axes: int | Sequence[int] | None = None) -> jax.Array:
  """:func:`fake_quant` with scales from ``x``'s own min/max (no gradient through the scales).

  What QAT uses for weights (dynamic per-channel) and for dynamically quantized activations.

  >>> w = jnp.array([[0.1, -2.0], [1.0, 0.5]])
  >>> fake_quant_minmax(w, 8, channel_axes=-1)  # doctest: +SKIP
  Array([[ 0.1023622, -2.       ], [ 1.       ,  0.503937 ]], dtype=float32)
  """
  scale, zero_point = minmax_params(jax.lax.stop_gradient(x), bits, symmetric=symmetric,
                                    channel_axes=channel_axes)
  return fake_quant(x, scale, zero_point, bits, symmetric)


def lsq_init_step(x, bits: int, channel_axes: int | Sequence[int] | None = None) -> jax.Array:
  """LSQ's initial step ``2 * mean(|x|) / sqrt(qmax)`` (float32, keepdims, per channel if asked).

  Floored at :data:`MIN_SCALE` so an all-zero tensor does not start with a zero step.

  >>> lsq_init_step(jnp.ones((4, 6)), 8, channel_axes=-1).shape
  (1, 6)
  """
  _, qmax = qrange(bits, True)
  axes = reduce_axes(x.ndim, channel_axes)
  mean_abs = jnp.mean(jnp.abs(jnp.asarray(x, jnp.float32)), axis=axes, keepdims=True)
  return jnp.maximum(2.0 * mean_abs / np.sqrt(qmax), MIN_SCALE)


def _sum_to_shape(t, shape):
  """Sums ``t`` over the axes along which ``shape`` was broadcast up to ``t.shape``."""
  lead = t.ndim - len(shape)
  t = jnp.sum(t, axis=tuple(range(lead))) if lead else t
  axes = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
  return jnp.sum(t, axis=axes, keepdims=True) if axes else t


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lsq(x, step, grad_scale, bits):
  qmin, qmax = qrange(bits, True)
  v = jnp.asarray(x, jnp.float32) / step
  return (jnp.clip(jnp.round(v), qmin, qmax) * step).astype(x.dtype)


def _lsq_fwd(x, step, grad_scale, bits):
  return _lsq(x, step, grad_scale, bits), (x, step, grad_scale)


def _lsq_bwd(bits, res, g):
  x, step, grad_scale = res
  qmin, qmax = qrange(bits, True)
  v = jnp.asarray(x, jnp.float32) / step
  below, above = v < qmin, v > qmax
  inside = ~below & ~above
  dx = jnp.where(inside, g, jnp.zeros_like(g)).astype(x.dtype)
  # d(output)/d(step) per element (Esser et al. 2020, eq. 3).
  dq_ds = jnp.where(below, float(qmin), jnp.where(above, float(qmax), jnp.round(v) - v))
  g32 = jnp.asarray(g, jnp.float32)
  dstep = (_sum_to_shape(g32 * dq_ds, step.shape) * grad_scale).astype(step.dtype)
  return dx, dstep, jnp.zeros_like(grad_scale)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_fake_quant(x, step, bits: int, *, grad_scale=None) -> jax.Array:
  """Symmetric fake quantization with a learned step (LSQ, Esser et al. 2020); zero point 0.

  Forward: ``clip(round(x / step), qmin, qmax) * step`` (narrow symmetric range, round half to
  even). Backward: ``dx = g`` where ``qmin <= x / step <= qmax`` else 0; ``dstep`` is the sum,
  over the elements sharing each step value, of ``g * (round(x/s) - x/s)`` inside the range,
  ``g * qmin`` below it and ``g * qmax`` above it, times ``grad_scale`` — by default
  ``1 / sqrt(numel_per_step * qmax)``, ``numel_per_step = x.size / step.size``. ``dstep`` has
  ``step``'s shape. ``step`` must broadcast against ``x`` and stay positive (the caller's job,
  e.g. by clipping it after each update).

  >>> s = lsq_init_step(w, 4, channel_axes=-1)                        # doctest: +SKIP
  >>> jax.grad(lambda s: lsq_fake_quant(w, s, 4).sum())(s).shape      # doctest: +SKIP
  (1, 6)
  """
  x = jnp.asarray(x)
  step = jnp.asarray(step)
  if grad_scale is None:
    _, qmax = qrange(bits, True)
    numel_per_step = x.size / max(step.size, 1)
    grad_scale = 1.0 / np.sqrt(numel_per_step * qmax)
  return _lsq(x, step, jnp.asarray(grad_scale, jnp.float32), check_bits(bits))
