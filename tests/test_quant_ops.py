"""Fake-quant ops and observers against numpy references: grids, scales, STE/LSQ gradients, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax.quant import ops as quant
from peftjax.errors import ConfigError
from peftjax.quant import observers

RNG = np.random.default_rng(0)


def _randn(*shape, scale=1.0):
  return (scale * RNG.standard_normal(shape)).astype(np.float32)


def _np_qrange(bits, symmetric):
  qmax = 2**(bits - 1) - 1
  return (-qmax if symmetric else -qmax - 1), qmax


def _np_scale(x_min, x_max, bits, symmetric):
  """numpy reference of compute_scale (float32)."""
  qmin, qmax = _np_qrange(bits, symmetric)
  x_min, x_max = np.float32(x_min), np.float32(x_max)
  if symmetric:
    return np.maximum(np.maximum(np.abs(x_min), np.abs(x_max)) / np.float32(qmax), 1e-8), 0 * x_min
  x_min, x_max = np.minimum(x_min, 0), np.maximum(x_max, 0)
  scale = np.maximum((x_max - x_min) / np.float32(qmax - qmin), np.float32(1e-8))
  return scale, np.clip(np.round(qmin - x_min / scale), qmin, qmax)


# --- ranges, bits, axes ---------------------------------------------------------------------


@pytest.mark.parametrize('bits,symmetric,expected', [
    (8, True, (-127, 127)), (8, False, (-128, 127)), (4, True, (-7, 7)), (4, False, (-8, 7)),
    (2, True, (-1, 1)), (2, False, (-2, 1))])
def test_qrange(bits, symmetric, expected):
  assert quant.qrange(bits, symmetric) == expected


@pytest.mark.parametrize('bad', [1, 9, 3.5, 0, -8, True, '8', None])
def test_check_bits_rejects(bad):
  with pytest.raises(ConfigError) as e:
    quant.check_bits(bad)
  assert str(e.value) == f'quant.bits={bad!r} is invalid; valid: an integer in 2..8'


def test_check_bits_names_the_field_and_accepts_2_to_8():
  with pytest.raises(ConfigError, match=r'^quant\.act_bits=9 is invalid; valid: an integer in 2\.\.8$'):
    quant.check_bits(9, 'quant.act_bits')
  assert [quant.check_bits(b) for b in range(2, 9)] == list(range(2, 9))
  assert quant.check_bits(np.int64(4)) == 4


def test_reduce_axes():
  assert quant.reduce_axes(2, None) == (0, 1)
  assert quant.reduce_axes(2, ()) == (0, 1)
  assert quant.reduce_axes(2, -1) == (0,)
  assert quant.reduce_axes(2, 1) == (0,)
  assert quant.reduce_axes(3, (1, 2)) == (0,)
  assert quant.reduce_axes(3, (-2, -1)) == (0,)
  assert quant.reduce_axes(4, (0, 2)) == (1, 3)
  with pytest.raises(ValueError, match='out of range'):
    quant.reduce_axes(2, 2)


# --- quantize / dequantize ------------------------------------------------------------------


@pytest.mark.parametrize('symmetric,zp', [(True, 0.0), (False, 3.0)])
def test_round_trip_on_grid_is_exact(symmetric, zp):
  qmin, qmax = _np_qrange(8, symmetric)
  scale = np.float32(0.05)
  q = np.arange(qmin, qmax + 1, dtype=np.float32)
  x = (q - np.float32(zp)) * scale  # exactly the grid points, as dequantize computes them
  qj = quant.quantize(jnp.asarray(x), scale, zp, 8, symmetric)
  np.testing.assert_array_equal(np.asarray(qj), q.astype(np.int8))
  back = quant.dequantize(qj, scale, zp)
  assert back.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(back), x)


@pytest.mark.parametrize('symmetric', [True, False])
def test_round_trip_within_half_a_step(symmetric):
  x = _randn(4, 6)
  scale, zp = quant.minmax_params(jnp.asarray(x), 8, symmetric=symmetric)
  back = quant.dequantize(quant.quantize(x, scale, zp, 8, symmetric), scale, zp)
  s = float(scale.reshape(()))
  assert np.max(np.abs(np.asarray(back) - x)) <= s / 2 + 1e-6 * s
  # and the error is not trivially zero: the values really were moved onto the grid
  assert np.max(np.abs(np.asarray(back) - x)) > 0


def test_quantize_rounds_half_to_even():
  q = quant.quantize(jnp.array([0.5, 1.5, 2.5, -0.5, -1.5]), 1.0, 0.0, 8, True)
  np.testing.assert_array_equal(np.asarray(q), [0, 2, 2, 0, -2])


@pytest.mark.parametrize('bits,symmetric,lo,hi', [
    (8, True, -127, 127), (8, False, -128, 127), (4, True, -7, 7), (4, False, -8, 7)])
def test_int8_dtype_and_saturation(bits, symmetric, lo, hi):
  x = jnp.linspace(-300.0, 300.0, 24).reshape(4, 6)  # far outside the grid at both ends
  q = quant.quantize(x, 1.0, 0.0, bits, symmetric)
  assert q.dtype == jnp.int8
  assert int(q.min()) == lo and int(q.max()) == hi
  # own-range scales stay inside the grid too
  scale, zp = quant.minmax_params(jnp.asarray(_randn(4, 6)), bits, symmetric=symmetric)
  q = np.asarray(quant.quantize(jnp.asarray(_randn(4, 6)), scale, zp, bits, symmetric))
  assert q.dtype == np.int8 and q.min() >= lo and q.max() <= hi


@pytest.mark.parametrize('bits', [8, 4])
@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('channel_axes', [None, -1])
def test_fake_quant_output_on_grid(bits, symmetric, channel_axes):
  qmin, qmax = _np_qrange(bits, symmetric)
  x = _randn(4, 6) + np.float32(0.3)
  scale, zp = quant.minmax_params(jnp.asarray(x), bits, symmetric=symmetric,
                                  channel_axes=channel_axes)
  y = np.asarray(quant.fake_quant(jnp.asarray(x), scale, zp, bits, symmetric))
  k = y / np.asarray(scale) + np.asarray(zp)
  np.testing.assert_allclose(k, np.round(k), atol=1e-3)
  assert np.round(k).min() >= qmin and np.round(k).max() <= qmax
  # equals the numpy reference dequantize(quantize(x))
  ref = (np.clip(np.round(x / np.asarray(scale)) + np.asarray(zp), qmin, qmax)
         - np.asarray(zp)) * np.asarray(scale)
  np.testing.assert_allclose(y, ref, atol=1e-6 * np.asarray(scale).max())


@pytest.mark.parametrize('x', [
    np.array([[0.3, 2.1, 1.0], [0.7, 0.4, 1.9]], np.float32),      # all positive
    np.array([[-0.3, -2.1, -1.0], [-0.7, -0.4, -1.9]], np.float32),  # all negative
    np.array([[-0.37, 2.13, 1.0], [0.71, -0.4, 1.9]], np.float32)])  # mixed
def test_asymmetric_zero_is_exact(x):
  scale, zp = quant.minmax_params(jnp.asarray(x), 8, symmetric=False)
  assert float(zp.reshape(())) == round(float(zp.reshape(())))  # an integer value
  q0 = quant.quantize(jnp.zeros(()), scale, zp, 8, False)
  assert int(q0.reshape(())) == int(zp.reshape(()))
  assert float(quant.fake_quant(jnp.zeros((1, 1)), scale, zp, 8, False)[0, 0]) == 0.0
  ref_scale, ref_zp = _np_scale(x.min(), x.max(), 8, False)
  np.testing.assert_allclose(float(scale.reshape(())), ref_scale, rtol=1e-6)
  assert float(zp.reshape(())) == ref_zp


# --- per-channel scales ---------------------------------------------------------------------


def test_per_column_scales_take_each_column_max():
  mags = np.arange(1, 7, dtype=np.float32)
  w = _randn(4, 6) * mags  # column j scaled by j+1
  scale, zp = quant.minmax_params(jnp.asarray(w), 8, channel_axes=-1)
  assert scale.shape == (1, 6) and zp.shape == (1, 6)
  np.testing.assert_allclose(np.asarray(scale)[0], np.abs(w).max(axis=0) / 127, rtol=1e-6)
  assert np.all(np.asarray(zp) == 0)
  per_tensor, _ = quant.minmax_params(jnp.asarray(w), 8)
  assert per_tensor.shape == (1, 1)
  np.testing.assert_allclose(float(per_tensor[0, 0]), np.abs(w).max() / 127, rtol=1e-6)
  # asymmetric per column
  scale, zp = quant.minmax_params(jnp.asarray(w), 4, symmetric=False, channel_axes=1)
  ref_s, ref_z = _np_scale(w.min(axis=0), w.max(axis=0), 4, False)
  np.testing.assert_allclose(np.asarray(scale)[0], ref_s, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(zp)[0], ref_z)


def test_dense_general_kernel_gets_a_scale_per_head_and_dim():
  w = _randn(3, 2, 4) * np.arange(1, 9, dtype=np.float32).reshape(1, 2, 4)
  for axes in [(1, 2), (-2, -1)]:
    scale, zp = quant.minmax_params(jnp.asarray(w), 8, channel_axes=axes)
    assert scale.shape == (1, 2, 4) and zp.shape == (1, 2, 4)
    np.testing.assert_allclose(np.asarray(scale)[0], np.abs(w).max(axis=0) / 127, rtol=1e-6)
  y = np.asarray(quant.fake_quant_minmax(jnp.asarray(w), 8, channel_axes=(1, 2)))
  s = np.abs(w).max(axis=0, keepdims=True) / np.float32(127)
  np.testing.assert_allclose(y, np.clip(np.round(w / s), -127, 127) * s, atol=1e-6 * s.max())


# --- straight-through gradients -------------------------------------------------------------


def test_ste_gradient_is_the_range_mask():
  scale = np.array([[0.01, 0.02, 0.05, 0.1, 0.2, 0.5]], np.float32)
  zp = np.array([[0, 5, -20, 100, -128, 3]], np.float32)
  x = _randn(4, 6, scale=4.0)
  # plus points a third of a step beyond each end: rounded onto the end point, not clipped
  lo, hi = (-128 - zp) * scale, (127 - zp) * scale
  x = np.concatenate([x, lo - scale / 3, hi + scale / 3, lo - scale, hi + scale])
  q = np.round(x / scale) + zp
  mask = ((q >= -128) & (q <= 127)).astype(np.float32)
  assert 0 < mask.sum() < mask.size  # both cases occur
  np.testing.assert_array_equal(mask[-4:], [[1] * 6, [1] * 6, [0] * 6, [0] * 6])
  c = _randn(*x.shape)  # non-uniform cotangent
  f = lambda x, s, z: jnp.sum(c * quant.fake_quant(x, s, z, 8, False))
  dx, ds, dz = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(zp))
  np.testing.assert_array_equal(np.asarray(dx), c * mask)
  assert ds.shape == scale.shape and not np.any(np.asarray(ds))
  assert dz.shape == zp.shape and not np.any(np.asarray(dz))


def test_fake_quant_minmax_gradient_passes_through():
  # own min/max: nothing is clipped, so the gradient is exactly the cotangent, extremes included
  x = _randn(4, 6)
  c = _randn(4, 6)
  for sym in (True, False):
    g = jax.grad(lambda x: jnp.sum(c * quant.fake_quant_minmax(x, 4, symmetric=sym,
                                                               channel_axes=-1)))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g), c)


def test_fake_quant_jit_equals_eager():
  x = jnp.asarray(_randn(4, 6))
  for sym in (True, False):
    eager = quant.fake_quant_minmax(x, 4, symmetric=sym, channel_axes=-1)
    jitted = jax.jit(lambda x: quant.fake_quant_minmax(x, 4, symmetric=sym, channel_axes=-1))(x)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))
    s, z = quant.minmax_params(x, 4, symmetric=sym)
    np.testing.assert_array_equal(
        np.asarray(quant.fake_quant(x, s, z, 4, sym)),
        np.asarray(jax.jit(quant.fake_quant, static_argnums=(3, 4))(x, s, z, 4, sym)))


# --- LSQ ------------------------------------------------------------------------------------


def _np_lsq(x, s, c, bits, grad_scale, reduce_axes):
  qmin, qmax = _np_qrange(bits, True)
  v = x / s
  y = np.clip(np.round(v), qmin, qmax) * s
  inside = (v >= qmin) & (v <= qmax)
  dq_ds = np.where(v < qmin, qmin, np.where(v > qmax, qmax, np.round(v) - v))
  ds = np.sum(c * dq_ds, axis=reduce_axes, keepdims=True) * grad_scale
  return y, c * inside, ds


def test_lsq_init_step():
  w = _randn(4, 6)
  np.testing.assert_allclose(np.asarray(quant.lsq_init_step(jnp.asarray(w), 8, channel_axes=-1)),
                             2 * np.abs(w).mean(axis=0, keepdims=True) / np.sqrt(127), rtol=1e-6)
  s = quant.lsq_init_step(jnp.asarray(w), 4)
  assert s.shape == (1, 1)
  np.testing.assert_allclose(float(s[0, 0]), 2 * np.abs(w).mean() / np.sqrt(7), rtol=1e-6)


def test_lsq_gradients_match_the_formula_per_channel():
  x = _randn(4, 6, scale=2.0)
  step = np.array([[0.05, 0.1, 0.2, 0.3, 0.5, 1.0]], np.float32)  # bits=4: range +-7 steps
  c = _randn(4, 6)
  f = lambda x, s: jnp.sum(c * quant.lsq_fake_quant(x, s, 4))
  dx, ds = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(step))
  y_ref, dx_ref, ds_ref = _np_lsq(x, step, c, 4, 1 / np.sqrt(4 * 7), (0,))
  inside = dx_ref != 0
  assert 0 < inside.sum() < inside.size  # some elements clipped, some not
  np.testing.assert_allclose(np.asarray(quant.lsq_fake_quant(jnp.asarray(x), jnp.asarray(step), 4)),
                             y_ref, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(dx), dx_ref)
  assert ds.shape == step.shape
  np.testing.assert_allclose(np.asarray(ds), ds_ref, rtol=1e-5, atol=1e-6)


def test_lsq_gradients_per_tensor_scalar_step_and_explicit_grad_scale():
  x = _randn(4, 6, scale=2.0)
  c = _randn(4, 6)
  step = np.float32(0.25)
  for grad_scale, ref_gs in [(None, 1 / np.sqrt(24 * 7)), (1.0, 1.0), (0.3, 0.3)]:
    f = lambda x, s: jnp.sum(c * quant.lsq_fake_quant(x, s, 4, grad_scale=grad_scale))
    dx, ds = jax.grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(step))
    _, dx_ref, ds_ref = _np_lsq(x, step, c, 4, ref_gs, None)
    assert ds.shape == ()
    np.testing.assert_array_equal(np.asarray(dx), dx_ref)
    np.testing.assert_allclose(float(ds), float(ds_ref.reshape(())), rtol=1e-5, atol=1e-6)


def test_lsq_under_jit_equals_eager():
  x, step = jnp.asarray(_randn(4, 6)), jnp.full((1, 6), 0.1)
  g = lambda x, s: jax.grad(lambda s: jnp.sum(quant.lsq_fake_quant(x, s, 8) ** 2))(s)
  y = lambda x, s: quant.lsq_fake_quant(x, s, 8)
  np.testing.assert_array_equal(np.asarray(y(x, step)), np.asarray(jax.jit(y)(x, step)))
  # the step gradient is a reduction: jit may sum in another order (1 ulp)
  np.testing.assert_allclose(np.asarray(g(x, step)), np.asarray(jax.jit(g)(x, step)), rtol=1e-6)


# --- degenerate inputs ----------------------------------------------------------------------


@pytest.mark.parametrize('value', [0.0, 3.0, -2.0])
@pytest.mark.parametrize('symmetric', [True, False])
@pytest.mark.parametrize('channel_axes', [None, -1])
def test_constant_tensor_gives_finite_results(value, symmetric, channel_axes):
  x = jnp.full((4, 6), value)
  scale, zp = quant.minmax_params(x, 8, symmetric=symmetric, channel_axes=channel_axes)
  assert np.all(np.asarray(scale) > 0) and np.all(np.isfinite(np.asarray(zp)))
  y, g = jax.value_and_grad(
      lambda x: quant.fake_quant_minmax(x, 8, symmetric=symmetric, channel_axes=channel_axes).sum())(x)
  fq = quant.fake_quant_minmax(x, 8, symmetric=symmetric, channel_axes=channel_axes)
  assert np.all(np.isfinite(np.asarray(fq))) and np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(np.asarray(fq), value, atol=np.asarray(scale).max() / 2)
  if value == 0.0:
    assert not np.any(np.asarray(fq))


def test_all_zero_lsq_is_finite():
  x = jnp.zeros((4, 6))
  step = quant.lsq_init_step(x, 8, channel_axes=-1)
  assert np.all(np.asarray(step) > 0)
  y, (dx, ds) = jax.value_and_grad(lambda x, s: quant.lsq_fake_quant(x, s, 8).sum(),
                                   argnums=(0, 1))(x, step)
  for a in (y, dx, ds):
    assert np.all(np.isfinite(np.asarray(a)))


# --- observers ------------------------------------------------------------------------------

BATCHES = [_randn(4, 6), _randn(4, 6, scale=3.0) + 1.0, _randn(4, 6, scale=0.5) - 2.0]


def _observe(kind, batches=BATCHES, **kw):
  state = observers.init_state(kind)
  for b in batches:
    state = observers.update(kind, state, jnp.asarray(b), **kw)
  return state


def test_minmax_observer():
  x_min, x_max = observers.finalize('minmax', _observe('minmax'))
  assert x_min.dtype == jnp.float32 and x_min.shape == () and x_max.shape == ()
  assert float(x_min) == min(b.min() for b in BATCHES)
  assert float(x_max) == max(b.max() for b in BATCHES)


@pytest.mark.parametrize('momentum', [0.9, 0.5])
def test_moving_average_observer(momentum):
  lo, hi = BATCHES[0].min(), BATCHES[0].max()
  for b in BATCHES[1:]:
    lo = momentum * lo + (1 - momentum) * b.min()
    hi = momentum * hi + (1 - momentum) * b.max()
  x_min, x_max = observers.finalize('moving_average', _observe('moving_average', momentum=momentum))
  np.testing.assert_allclose([float(x_min), float(x_max)], [lo, hi], rtol=1e-6)


@pytest.mark.parametrize('p', [99.99, 90.0])
def test_percentile_observer(p):
  lo = np.mean([np.percentile(b.reshape(-1), 100 - p) for b in BATCHES])
  hi = np.mean([np.percentile(b.reshape(-1), p) for b in BATCHES])
  x_min, x_max = observers.finalize('percentile', _observe('percentile', percentile=p))
  np.testing.assert_allclose([float(x_min), float(x_max)], [lo, hi], rtol=1e-5, atol=1e-6)
  if p == 90.0:  # strictly inside the batch ranges: outliers are really clipped
    assert float(x_max) < np.mean([b.max() for b in BATCHES])


@pytest.mark.parametrize('kind', observers.KINDS)
def test_observer_update_under_jit_matches_eager(kind):
  state = observers.init_state(kind)
  step = jax.jit(lambda s, x: observers.update(kind, s, x))
  for b in BATCHES:
    state = step(state, jnp.asarray(b))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(state))
  eager = observers.finalize(kind, _observe(kind))
  np.testing.assert_allclose(np.asarray(observers.finalize(kind, state)), np.asarray(eager),
                             rtol=1e-6)


@pytest.mark.parametrize('kind', observers.KINDS)
def test_finalize_without_batches_raises(kind):
  with pytest.raises(ConfigError, match=r'quant\.calibration_batches must be >= 1'):
    observers.finalize(kind, observers.init_state(kind))


def test_unknown_observer_kind():
  msg = r"^quant\.observer='ema' is invalid; valid: minmax, moving_average, percentile$"
  with pytest.raises(ConfigError, match=msg):
    observers.init_state('ema')
  with pytest.raises(ConfigError, match=msg):
    observers.update('ema', observers.init_state('minmax'), jnp.ones(3))
  with pytest.raises(ConfigError, match=msg):
    observers.finalize('ema', _observe('minmax'))
