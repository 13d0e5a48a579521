"""Weight sharing: k-means fixed points, nearest assignment, masks, expand and its gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import tree
from peftjax.compress import share as share_lib
from peftjax.errors import ConfigError

RNG = np.random.default_rng(0)


def _lloyd_step(w, c, idx):
  """Reference: the float32 means of the non-empty clusters (empty ones keep their centroid)."""
  out = c.copy()
  for j in range(c.size):
    if np.any(idx == j):
      out[j] = np.float32(np.mean(w[idx == j].astype(np.float64)))
  return out


def _assert_nearest(w, c, idx):
  d = np.abs(w.astype(np.float64)[:, None] - c.astype(np.float64)[None, :])
  np.testing.assert_array_equal(d[np.arange(w.size), idx.astype(np.int64)], d.min(axis=1))


# --- kmeans ----------------------------------------------------------------------------------


def test_linear_init_is_evenly_spaced_between_min_and_max():
  w = RNG.standard_normal(500).astype(np.float32)
  c, _ = share_lib.kmeans(w, 3, iters=0)
  lo, hi = np.float64(w.min()), np.float64(w.max())
  np.testing.assert_array_equal(c, np.linspace(lo, hi, 8).astype(np.float32))
  assert c[0] == w.min() and c[-1] == w.max()
  # With a mask only the kept weights set the range.
  mask = np.abs(w) < 1.0
  c, _ = share_lib.kmeans(w, 2, mask=mask, iters=0)
  lo, hi = np.float64(w[mask].min()), np.float64(w[mask].max())
  np.testing.assert_array_equal(c, np.linspace(lo, hi, 4).astype(np.float32))


def test_density_init_is_quantiles():
  w = RNG.standard_normal(1001).astype(np.float32)
  c, _ = share_lib.kmeans(w, 2, iters=0, init='density')
  np.testing.assert_array_equal(
      c, np.quantile(w.astype(np.float64), [0, 1 / 3, 2 / 3, 1]).astype(np.float32))


@pytest.mark.parametrize('bits', [1, 3, 5])
def test_kmeans_converges_to_cluster_means_with_nearest_assignment(bits):
  # A skewed mixture, so the clusters differ in size and the linear init is far from optimal.
  w = np.concatenate([RNG.standard_normal(1500) * 0.05, RNG.standard_normal(300) + 2.0,
                      RNG.laplace(size=200)]).astype(np.float32).reshape(40, 50)
  c, idx = share_lib.kmeans(w, bits, iters=100_000)
  assert c.dtype == np.float32 and c.shape == (2**bits,)
  assert idx.dtype == np.uint8 and idx.shape == w.shape
  assert np.all(np.diff(c) > 0)  # sorted, distinct
  flat_w, flat_i = w.ravel(), idx.ravel()
  _assert_nearest(flat_w, c, flat_i)
  # A fixed point of Lloyd's algorithm: each centroid is the mean of its cluster.
  np.testing.assert_allclose(c, _lloyd_step(flat_w, c, flat_i), rtol=1e-6, atol=1e-7)
  # Deterministic.
  c2, idx2 = share_lib.kmeans(w, bits, iters=100_000)
  np.testing.assert_array_equal(c, c2)
  np.testing.assert_array_equal(idx, idx2)


def test_kmeans_few_iterations_still_assigns_nearest():
  w = RNG.standard_normal(3000).astype(np.float32)
  c, idx = share_lib.kmeans(w, 4, iters=2)
  _assert_nearest(w, c, idx)


def test_kmeans_with_mask_clusters_only_kept_weights():
  w = RNG.standard_normal((30, 20)).astype(np.float32)
  mask = RNG.random(w.shape) < 0.3
  c, idx = share_lib.kmeans(w, 3, mask=mask)
  c_ref, idx_ref = share_lib.kmeans(w[mask], 3)  # the pruned weights play no part at all
  np.testing.assert_array_equal(c, c_ref)
  np.testing.assert_array_equal(idx[mask], idx_ref)
  assert np.all(idx[~mask] == 0)
  # Everything pruned: zero centroids, no error.
  c, idx = share_lib.kmeans(w, 2, mask=np.zeros(w.shape))
  np.testing.assert_array_equal(c, np.zeros(4, np.float32))
  assert not idx.any()


# --- share / expand --------------------------------------------------------------------------


def _params():
  return {'enc': {'dense': {'kernel': RNG.uniform(-1, 1, (64, 48)).astype(np.float32),
                            'bias': RNG.standard_normal(48).astype(np.float32)},
                  'out': {'kernel': RNG.uniform(-1, 1, (48, 10)).astype(np.float32)}},
          'norm': {'scale': np.ones(10, np.float32)}}


@pytest.mark.parametrize('bits', [1, 2, 4, 8])
def test_expand_has_exactly_2_pow_bits_values(bits):
  params = _params()
  shared = share_lib.share(params, bits=bits, targets='dense/kernel$')
  w = np.asarray(share_lib.expand(shared)['enc']['dense']['kernel'])
  assert w.shape == (64, 48) and w.dtype == np.float32
  assert np.unique(w).size == 2**bits
  np.testing.assert_array_equal(np.unique(w), np.asarray(
      shared['enc']['dense']['kernel']['centroids']))


def test_share_structure_and_untouched_leaves():
  params = _params()
  masks = {'enc': {'out': {'kernel': (RNG.random((48, 10)) < 0.5).astype(np.float32)}}}
  shared = share_lib.share(params, bits=3, targets='kernel$', masks=masks)
  assert set(shared['enc']['dense']['kernel']) == {'centroids', 'indices'}
  assert set(shared['enc']['out']['kernel']) == {'centroids', 'indices', 'mask'}
  assert shared['enc']['dense']['bias'] is params['enc']['dense']['bias']
  assert shared['norm']['scale'] is params['norm']['scale']
  assert share_lib.shared_paths(shared) == ['enc/dense/kernel', 'enc/out/kernel']
  expanded = share_lib.expand(shared)
  assert tree.paths(expanded) == tree.paths(params)
  np.testing.assert_array_equal(expanded['enc']['dense']['bias'], params['enc']['dense']['bias'])


def test_pruned_weights_stay_exactly_zero():
  params = _params()
  mask = RNG.random((48, 10)) < 0.4
  shared = share_lib.share(params, bits=2, targets='out/kernel$',
                           masks={'enc': {'out': {'kernel': mask}}})
  leaf = shared['enc']['out']['kernel']
  w = np.asarray(jax.jit(share_lib.expand)(shared)['enc']['out']['kernel'])
  assert np.all(w[~mask] == 0.0)
  assert np.all(np.isin(w[mask], np.asarray(leaf['centroids'])))
  assert np.unique(w[mask]).size == 4
  np.testing.assert_array_equal(np.asarray(leaf['mask']), mask)


def test_centroid_gradient_is_segment_sum_of_weight_gradients():
  params = _params()
  mask = RNG.random((64, 48)) < 0.6
  shared = share_lib.share(params, bits=4, targets='kernel$',
                           masks={'enc': {'dense': {'kernel': mask}}})
  x = jnp.asarray(RNG.standard_normal((8, 64)), jnp.float32)

  def loss_w(w):  # a nonlinear loss of the weights
    return jnp.sum(jnp.tanh(x @ w) ** 2) + jnp.sum(jnp.sin(w))

  trainable, frozen = share_lib.partition_centroids(shared)
  assert tree.paths(trainable) == ['enc/dense/kernel/centroids', 'enc/out/kernel/centroids']

  def loss(trainable):
    return loss_w(share_lib.expand(tree.combine(trainable, frozen))['enc']['dense']['kernel'])

  grads = jax.jit(jax.grad(loss))(trainable)
  g = grads['enc']['dense']['kernel']['centroids']
  leaf = shared['enc']['dense']['kernel']

  @jax.jit
  def reference(leaf):
    # Pruned weights are in no cluster; the kept ones' gradients add up per cluster.
    g_w = jax.grad(loss_w)(share_lib.expand_leaf(leaf))
    return jax.ops.segment_sum(jnp.where(leaf['mask'], g_w, 0.0).ravel(),
                               leaf['indices'].ravel().astype(jnp.int32), 16)

  ref = reference(leaf)
  assert np.abs(ref).min() > 0  # every cluster gets a gradient, so the check is not vacuous
  np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5)
  # The other leaf does not enter the loss: zero gradient.
  np.testing.assert_array_equal(grads['enc']['out']['kernel']['centroids'],
                                np.zeros(16, np.float32))


def test_partition_centroids_freezes_indices_and_masks():
  shared = share_lib.share(_params(), bits=2, targets='kernel$',
                           masks={'enc': {'out': {'kernel': np.ones((48, 10))}}})
  trainable, frozen = share_lib.partition_centroids(shared, also='bias$')
  assert tree.paths(trainable) == ['enc/dense/bias', 'enc/dense/kernel/centroids',
                                   'enc/out/kernel/centroids']
  assert tree.paths(frozen) == ['enc/dense/kernel/indices', 'enc/out/kernel/indices',
                                'enc/out/kernel/mask', 'norm/scale']
  assert tree.fingerprint(tree.combine(trainable, frozen)) == tree.fingerprint(shared)


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize('bits', [0, 9, -1, True, 2.0, '4'])
def test_bad_bits(bits):
  with pytest.raises(ConfigError, match=r"bits=.* is invalid; valid: an integer in 1\.\.8"):
    share_lib.share(_params(), bits=bits, targets='kernel$')
  with pytest.raises(ValueError, match=rf'bits={bits!r}'):
    share_lib.kmeans(np.ones(4), bits)


def test_targets_matching_nothing_names_close_paths():
  with pytest.raises(ConfigError) as e:
    share_lib.share(_params(), bits=4, targets='enc/dense/kernal$')
  assert "targets='enc/dense/kernal$' matches no parameter" in str(e.value)
  assert 'enc/dense/kernel' in str(e.value)


def test_bad_masks_and_init():
  params = _params()
  with pytest.raises(ValueError, match="'enc/dense/bias', which targets='kernel\\$' does not"):
    share_lib.share(params, bits=2, targets='kernel$',
                    masks={'enc': {'dense': {'bias': np.ones(48)}}})
  with pytest.raises(ValueError, match=r'masks\[.enc/out/kernel.\] has shape \(10, 48\)'):
    share_lib.share(params, bits=2, targets='kernel$',
                    masks={'enc': {'out': {'kernel': np.ones((10, 48))}}})
  with pytest.raises(ValueError, match='no parameter'):
    share_lib.share(params, bits=2, targets='kernel$', masks={'enc': {'nope': np.ones(3)}})
  with pytest.raises(ConfigError, match="init='forgy' is invalid"):
    share_lib.kmeans(np.ones(4), 2, init='forgy')
