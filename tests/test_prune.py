"""Pruning: exact magnitude counts (layer/global, eager == jit), N:M groups, the cubic schedule,
the sparsity report, errors, and structured BERT head/FFN pruning against zeroed references."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import tree
from peftjax.compress import prune
from peftjax.compress import structured
from peftjax.models import BertClassifier
from peftjax.models import BertConfig
from peftjax.moe.layer import MoeConfig

TARGETS = r'encoder/.*kernel$'


def _params(seed=0, ties=False):
  """A small BERT-shaped tree; ``ties``: integer values, so many |w| are equal (and zero)."""
  shapes = {'encoder/layer_0/attention/query/kernel': (8, 2, 4),
            'encoder/layer_0/attention/query/bias': (2, 4),
            'encoder/layer_0/attention/out/kernel': (2, 4, 8),
            'encoder/layer_0/intermediate/kernel': (8, 12),
            'classifier/kernel': (8, 3)}
  rng = np.random.default_rng(seed)
  make = (lambda s: rng.integers(-3, 4, s)) if ties else (lambda s: rng.normal(size=s))
  return tree.unflatten({p: jnp.asarray(make(s), jnp.float32) for p, s in shapes.items()})


def _ref_mask(values: np.ndarray, s: float) -> np.ndarray:
  """Prune the round(s * n) smallest |v| (stable order), numpy in float64."""
  flat = np.abs(values.ravel())
  mask = np.ones(flat.size, np.float32)
  mask[np.argsort(flat, kind='stable')[:round(s * flat.size)]] = 0
  return mask.reshape(values.shape)


# ----------------------------------------------------------------------------- masks


def test_apply_masks_touches_only_masked_leaves():
  params = _params()
  masks = prune.magnitude_masks(params, 0.5, targets=TARGETS)
  assert set(tree.paths(masks)) == set(tree.select(params, TARGETS))
  out = tree.flatten(prune.apply_masks(params, masks))
  flat, flat_m = tree.flatten(params), tree.flatten(masks)
  for p, x in flat.items():
    want = np.asarray(x) * np.asarray(flat_m[p]) if p in flat_m else x
    np.testing.assert_array_equal(out[p], want)
  assert flat_m['encoder/layer_0/intermediate/kernel'].dtype == jnp.float32
  with pytest.raises(ValueError, match='has shape'):
    prune.apply_masks(params, {'classifier': {'kernel': np.ones((3, 8))}})


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('s', [0.0, 0.3, 0.5, 0.75, 0.9])
def test_magnitude_layer_exact_counts(s, ties):
  params = _params(ties=ties)
  masks = tree.flatten(prune.magnitude_masks(params, s, targets=TARGETS, scope='layer'))
  for p, w in tree.flatten(params).items():
    if p not in masks:
      continue
    w = np.asarray(w)
    assert int((np.asarray(masks[p]) == 0).sum()) == round(s * w.size), p
    np.testing.assert_array_equal(masks[p], _ref_mask(w, s))


@pytest.mark.parametrize('ties', [False, True])
@pytest.mark.parametrize('s', [0.25, 0.6, 0.95])
def test_magnitude_global_exact_counts(s, ties):
  params = _params(ties=ties)
  chosen = {p: np.asarray(w) for p, w in tree.flatten(params).items()
            if p in tree.select(params, TARGETS)}
  masks = tree.flatten(prune.magnitude_masks(params, s, targets=TARGETS, scope='global'))
  assert list(masks) == list(chosen)
  ref = _ref_mask(np.concatenate([w.ravel() for w in chosen.values()]), s)
  got = np.concatenate([np.asarray(masks[p]).ravel() for p in chosen])
  n = ref.size
  assert int((got == 0).sum()) == round(s * n)
  np.testing.assert_array_equal(got, ref)
  # Global is not per-layer: the counts per leaf differ from round(s * leaf size).
  per_leaf = [int((np.asarray(m) == 0).sum()) for m in masks.values()]
  assert per_leaf != [round(s * w.size) for w in chosen.values()]


def test_masks_under_jit_with_traced_sparsity_equal_eager():
  params = _params(ties=True)
  for scope in prune.SCOPES:
    fn = jax.jit(lambda p, s, scope=scope: prune.magnitude_masks(p, s, targets=TARGETS,
                                                                 scope=scope))
    for s in (0.3, 0.8):
      got, want = fn(params, jnp.float32(s)), prune.magnitude_masks(params, s, targets=TARGETS,
                                                                   scope=scope)
      jax.tree.map(np.testing.assert_array_equal, got, want)


def test_gradual_pruning_inside_a_jitted_step():
  """The schedule and the masks, both traced, in one jitted step; sparsity only grows."""
  kw = dict(initial=0.0, final=0.75, begin=2, end=10, every=2)

  @jax.jit
  def step(params, t):
    s = prune.cubic_sparsity(t, **kw)
    masks = prune.magnitude_masks(params, s, targets=TARGETS, scope='global')
    return prune.apply_masks(params, masks)

  params = _params()
  n = tree.count(tree.partition(params, TARGETS)[0])
  prev = 0
  for t in range(0, 13, 3):
    params = step(params, t)
    zeros = prune.sparsity(params, targets=TARGETS)['zeros']
    assert zeros == round(prune.cubic_sparsity(t, **kw) * n) >= prev
    prev = zeros
  assert prev == round(0.75 * n)


# ----------------------------------------------------------------------------- N:M


def _check_nm(w: np.ndarray, mask: np.ndarray, n: int, m: int, out_axes: int):
  d_out = int(np.prod(w.shape[-out_axes:]))
  groups = np.abs(w).reshape(-1, m, d_out)
  keep = mask.reshape(-1, m, d_out) != 0
  assert (keep.sum(axis=1) == n).all()
  kept = np.where(keep, groups, np.inf).min(axis=1)
  dropped = np.where(keep, -np.inf, groups).max(axis=1)
  assert (kept >= dropped).all()  # the kept ones are the largest of their group


@pytest.mark.parametrize('n,m', [(2, 4), (1, 4), (3, 8)])
def test_nm_masks_keep_the_n_largest_of_every_group(n, m):
  rng = np.random.default_rng(1)
  shapes = {'enc/attention/query/kernel': ((8, 2, 4), 2),  # (embed, heads, kv): 2 output axes
            'enc/attention/out/kernel': ((2, 4, 8), 1),    # input heads*kv
            'enc/intermediate/kernel': ((16, 5), 1),
            'conv_0/kernel': ((3, 3, 8, 5), 1)}             # input kh*kw*cin
  params = tree.unflatten({p: jnp.asarray(rng.normal(size=s), jnp.float32)
                           for p, (s, _) in shapes.items()})
  masks = tree.flatten(prune.nm_masks(params, n=n, m=m, targets='kernel$'))
  for p, (s, k) in shapes.items():
    assert prune.default_out_axes(p, np.zeros(s)) == k
    _check_nm(np.asarray(tree.flatten(params)[p]), np.asarray(masks[p]), n, m, k)
  # Override: the query kernel as a (embed*heads, kv) matrix groups differently.
  q = np.asarray(tree.flatten(params)['enc/attention/query/kernel'])
  over = prune.nm_masks(params, n=n, m=m, targets='query/kernel$', out_axes=1)
  over = np.asarray(tree.flatten(over)['enc/attention/query/kernel'])
  _check_nm(q, over, n, m, 1)
  assert not np.array_equal(over, masks['enc/attention/query/kernel'])


def test_nm_ties_keep_lower_index():
  w = jnp.array([[1.], [1.], [1.], [1.]])
  mask = prune.nm_masks({'d': {'kernel': w}}, n=2, m=4, targets='kernel$')['d']['kernel']
  np.testing.assert_array_equal(mask[:, 0], [1, 1, 0, 0])


def test_nm_errors():
  params = {'dense': {'kernel': jnp.ones((6, 3))}}
  with pytest.raises(ValueError, match=r'n=5 > m=4.*1 <= n <= m'):
    prune.nm_masks(params, n=5, m=4, targets='kernel$')
  with pytest.raises(ValueError, match=r'n=0.*1 <= n <= m'):
    prune.nm_masks(params, n=0, m=4, targets='kernel$')
  with pytest.raises(ValueError, match=r'dense/kernel: input size 6 .*not divisible by m=4'):
    prune.nm_masks(params, targets='kernel$')
  with pytest.raises(ValueError, match=r'dense/kernel: out_axes=2 .*valid: 1\.\.1'):
    prune.nm_masks(params, n=1, m=2, targets='kernel$', out_axes=2)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('s', [-0.1, 1.0, 1.5, float('nan')])
def test_bad_sparsity(s):
  with pytest.raises(ValueError, match=r'sparsity=.*outside the valid range \[0, 1\)') as e:
    prune.magnitude_masks(_params(), s, targets=TARGETS)
  assert repr(float(s)) in str(e.value)


def test_bad_scope_and_targets():
  with pytest.raises(ValueError, match=r"scope='row'; valid: 'layer', 'global'"):
    prune.magnitude_masks(_params(), 0.5, targets=TARGETS, scope='row')
  with pytest.raises(ValueError,
                     match=r'matches no parameter.*encoder/layer_0/intermediate/kernel'):
    prune.magnitude_masks(_params(), 0.5, targets=r'encoder/.*/intermediat/kernal$')
  with pytest.raises(ValueError, match='matches no parameter'):
    prune.nm_masks(_params(), targets='nothing')


# ----------------------------------------------------------------------------- schedule


def test_cubic_schedule_values_and_quantisation():
  kw = dict(initial=0.1, final=0.9, begin=10, end=50)
  f = lambda t, t0=10, t1=50: 0.9 + (0.1 - 0.9) * (1 - (t - t0) / (t1 - t0)) ** 3
  assert prune.cubic_sparsity(0, **kw) == pytest.approx(0.1)     # held before begin
  assert prune.cubic_sparsity(10, **kw) == pytest.approx(0.1)    # begin
  assert prune.cubic_sparsity(30, **kw) == pytest.approx(0.9 - 0.8 / 8)  # middle
  assert prune.cubic_sparsity(37, **kw) == pytest.approx(f(37))
  assert prune.cubic_sparsity(50, **kw) == pytest.approx(0.9)    # end
  assert prune.cubic_sparsity(1000, **kw) == pytest.approx(0.9)  # held after
  # every=7: t quantised down to 10 + 7j; the updates land at 10, 17, 24, ...; from end on final.
  q = dict(kw, every=7)
  for t, t_q in [(10, 10), (16, 10), (17, 17), (23, 17), (45, 45), (49, 45)]:
    assert prune.cubic_sparsity(t, **q) == pytest.approx(f(t_q)), t
  assert prune.cubic_sparsity(50, **q) == pytest.approx(0.9)
  # Traced steps (one jit, vmapped) agree with the Python values.
  ts = jnp.arange(0, 60, dtype=jnp.int32)
  traced = jax.jit(jax.vmap(lambda t: prune.cubic_sparsity(t, **q)))(ts)
  np.testing.assert_allclose(traced, [prune.cubic_sparsity(int(t), **q) for t in ts], atol=1e-6)
  with pytest.raises(ValueError, match='end=10 must be > begin=10'):
    prune.cubic_sparsity(0, initial=0.0, final=0.5, begin=10, end=10)
  with pytest.raises(ValueError, match=r'final=1\.0 is outside the valid range \[0, 1\)'):
    prune.cubic_sparsity(0, initial=0.0, final=1.0, begin=0, end=10)
  with pytest.raises(ValueError, match='every=0'):
    prune.cubic_sparsity(0, initial=0.0, final=0.5, begin=0, end=10, every=0)


def test_sparsity_report():
  params = {'a': {'kernel': jnp.array([0., 1., 2., 3.])}, 'b': {'kernel': jnp.array([0., 0.])}}
  r = prune.sparsity(params)
  assert r['leaves'] == {'a/kernel': 0.25, 'b/kernel': 1.0}
  assert (r['overall'], r['zeros'], r['total']) == (0.5, 3, 6)
  masks = {'a': {'kernel': jnp.array([1., 0., 0., 1.])}}
  r = prune.sparsity(params, masks)
  assert r['leaves'] == {'a/kernel': 0.75} and r['overall'] == 0.75
  assert isinstance(r['overall'], float)
  assert prune.sparsity(params, targets='^b/')['leaves'] == {'b/kernel': 1.0}


# ----------------------------------------------------------------------------- structured


CFG = BertConfig(vocab_size=100, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
                 max_position=16)  # head_dim 4


@functools.cache
def _bert():
  """A 4-head tiny classifier with random weights of std 0.5 (biases 0.1, not 0), so heads and
  channels change the logits visibly and a wrong slice can't hide below 1e-5. The shapes come
  from ``eval_shape`` (no init compile), the values from numpy."""
  module = BertClassifier(CFG, num_classes=3)
  ids = jax.ShapeDtypeStruct((4, 8), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), ids, ids)['params'])
  rng = np.random.default_rng(0)

  def fill(path, x):
    if path.endswith('scale'):
      return jnp.asarray(1 + 0.1 * rng.normal(size=x.shape), jnp.float32)
    return jnp.asarray((0.1 if path.endswith('bias') else 0.5) * rng.normal(size=x.shape),
                       jnp.float32)
  return tree.map_with_path(fill, shapes)


@functools.cache
def _apply(cfg):
  """One jitted forward per config (eager flax would compile every op for every shape)."""
  return jax.jit(lambda params, inputs: BertClassifier(cfg, num_classes=3).apply(
      {'params': params}, **inputs))


def _inputs():
  """4 x 8 tokens, one row padded (tests/tinybert.py's batch, without importing the trainer)."""
  ids = jnp.arange(32, dtype=jnp.int32).reshape(4, 8) % 100
  return {'input_ids': ids, 'attention_mask': jnp.ones_like(ids).at[0, 6:].set(0),
          'token_type_ids': jnp.zeros_like(ids)}


def _logits(cfg, params):
  return _apply(cfg)(params, _inputs())


def _heads(params, cfg):
  """(query, key, value, out) kernels and (q, k, v) biases of each layer as numpy."""
  flat = {p: np.asarray(v) for p, v in tree.flatten(params['encoder']).items()}
  return [{n: flat[f'layer_{i}/attention/{n}'] for n in
           ('query/kernel', 'key/kernel', 'value/kernel', 'query/bias', 'key/bias', 'value/bias',
            'out/kernel')} for i in range(cfg.num_layers)]


def test_head_pruning_equals_zeroed_heads():
  params = _bert()
  scores = jnp.array([[0.3, 0.9, 0.1, 0.5], [0.8, 0.2, 0.7, 0.4]])
  small, small_cfg = structured.prune_heads(params, CFG, 2, scores)
  assert (small_cfg.num_heads, small_cfg.head_dim, small_cfg.hidden_size) == (2, 4, 16)
  kept = {0: [1, 3], 1: [0, 2]}
  # Reference: the full model with the removed heads' q/k/v slices and out rows zeroed.
  flat = {p: np.array(v) for p, v in tree.flatten(params).items()}  # numpy: no op compiles
  for i, keep in kept.items():
    drop = np.array([h for h in range(4) if h not in keep])
    a = f'encoder/layer_{i}/attention/'
    for n in ('query', 'key', 'value'):
      flat[a + n + '/kernel'][:, drop] = 0
      flat[a + n + '/bias'][drop] = 0
    flat[a + 'out/kernel'][drop] = 0
    np.testing.assert_array_equal(tree.flatten(small)[a + 'query/kernel'],
                                  tree.flatten(params)[a + 'query/kernel'][:, np.array(keep)])
  want = _logits(CFG, tree.unflatten(flat))
  got = _logits(small_cfg, small)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The removed heads mattered: the pruned model is not the original one.
  assert np.abs(np.asarray(got) - np.asarray(_logits(CFG, params))).max() > 1e-2
  d, dh, removed = 16, 4, 2
  per_layer = removed * (3 * (d * dh + dh) + dh * d)
  assert tree.count(small) == tree.count(params) - CFG.num_layers * per_layer
  assert tree.flatten(small)['encoder/layer_0/attention/out/bias'].shape == (16,)


def test_head_pruning_default_magnitude_scores_and_export_refusal():
  from peftjax.hf.bert_export import ExportError
  from peftjax.hf.bert_export import hf_config
  params = _bert()
  scores = np.asarray(structured.head_scores(params, CFG))
  # L2 norm of everything a head owns: q/k/v kernel slices [:, h] and biases [h], out rows [h].
  ref = np.array([[np.sqrt(sum((layer[n][:, h] ** 2).sum() for n in
                               ('query/kernel', 'key/kernel', 'value/kernel'))
                           + sum((layer[n][h] ** 2).sum() for n in
                                 ('query/bias', 'key/bias', 'value/bias', 'out/kernel')))
                   for h in range(4)] for layer in _heads(params, CFG)])
  np.testing.assert_allclose(scores, ref, rtol=1e-5)
  small, small_cfg = structured.prune_heads(params, CFG, 3)
  top = np.sort(np.argsort(-scores, axis=1, kind='stable')[:, :3], axis=1)
  for i in range(2):
    np.testing.assert_array_equal(
        tree.flatten(small)[f'encoder/layer_{i}/attention/out/kernel'],
        tree.flatten(params)[f'encoder/layer_{i}/attention/out/kernel'][top[i]])
  assert tree.flatten(small)['encoder/layer_1/attention/value/kernel'].shape == (16, 3, 4)
  # Encoder-only trees work too and prune the same way.
  enc, _ = structured.prune_heads(params['encoder'], CFG, 3)
  jax.tree.map(np.testing.assert_array_equal, enc, small['encoder'])
  hf_config(CFG)  # unpruned: fine
  with pytest.raises(ExportError, match=r'num_heads=3 x head_size=4 != hidden_size=16'):
    hf_config(small_cfg)


def _grads_like(params, seed=5):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)


def test_first_order_scores_match_numpy():
  params = _bert()
  grads = _grads_like(params)
  hs = np.asarray(structured.head_scores(params, CFG, grads))
  fs = np.asarray(structured.ffn_scores(params, CFG, grads))
  assert hs.shape == (2, 4) and fs.shape == (2, 32)
  wf = {p: np.asarray(v, np.float64) for p, v in tree.flatten(params['encoder']).items()}
  gf = {p: np.asarray(v, np.float64) for p, v in tree.flatten(grads['encoder']).items()}
  for i in range(2):
    a = f'layer_{i}/attention/'
    for h in range(4):
      total = sum((wf[a + n + '/kernel'][:, h] * gf[a + n + '/kernel'][:, h]).sum()
                  + (wf[a + n + '/bias'][h] * gf[a + n + '/bias'][h]).sum()
                  for n in ('query', 'key', 'value'))
      total += (wf[a + 'out/kernel'][h] * gf[a + 'out/kernel'][h]).sum()
      assert hs[i, h] == pytest.approx(abs(total), rel=1e-4, abs=1e-5)
    p = f'layer_{i}/'
    ref = np.abs((wf[p + 'intermediate/kernel'] * gf[p + 'intermediate/kernel']).sum(0)
                 + wf[p + 'intermediate/bias'] * gf[p + 'intermediate/bias']
                 + (wf[p + 'output/kernel'] * gf[p + 'output/kernel']).sum(1))
    np.testing.assert_allclose(fs[i], ref, rtol=1e-4, atol=1e-5)
    refm = np.sqrt((wf[p + 'intermediate/kernel'] ** 2).sum(0) + wf[p + 'intermediate/bias'] ** 2
                   + (wf[p + 'output/kernel'] ** 2).sum(1))
    np.testing.assert_allclose(structured.ffn_scores(params, CFG)[i], refm, rtol=1e-5)


def test_ffn_pruning_equals_zeroed_channels():
  params = _bert()
  scores = np.random.default_rng(7).uniform(size=(2, 32))
  small, small_cfg = structured.prune_ffn(params, CFG, 20, scores)
  assert small_cfg.intermediate_size == 20 and small_cfg.num_heads == 4
  top = np.argsort(-np.asarray(scores), axis=1, kind='stable')[:, :20]
  flat = {p: np.array(v) for p, v in tree.flatten(params).items()}
  for i in range(2):
    drop = np.setdiff1d(np.arange(32), top[i])
    p = f'encoder/layer_{i}/'
    flat[p + 'intermediate/kernel'][:, drop] = 0
    flat[p + 'intermediate/bias'][drop] = 0
    flat[p + 'output/kernel'][drop] = 0
  got = _logits(small_cfg, small)
  np.testing.assert_allclose(got, _logits(CFG, tree.unflatten(flat)), atol=1e-5)
  assert np.abs(np.asarray(got) - np.asarray(_logits(CFG, params))).max() > 1e-2
  assert tree.count(small) == tree.count(params) - 2 * 12 * (16 + 1 + 16)


def test_structured_pruning_errors():
  params = _bert()
  moe_cfg = dataclasses.replace(CFG, moe=MoeConfig(num_experts=2), moe_layers=(1,))
  for fn in (structured.prune_heads, structured.prune_ffn):
    with pytest.raises(ValueError, match=r'moe_layers=\(1,\).*dense BERT models only'):
      fn(params, moe_cfg, 2)
  with pytest.raises(ValueError, match=r'keep_per_layer=5; valid: an integer in 1\.\.4'):
    structured.prune_heads(params, CFG, 5)
  with pytest.raises(ValueError, match=r'keep=0; valid: an integer in 1\.\.32'):
    structured.prune_ffn(params, CFG, 0)
  with pytest.raises(ValueError, match=r'scores has shape \(2, 3\); expected \(2, 4\)'):
    structured.prune_heads(params, CFG, 2, jnp.ones((2, 3)))
  with pytest.raises(ValueError, match=r"query/kernel' has shape \(16, 4, 4\); the BertConfig "
                     r"expects \(16, 4, 8\)"):
    structured.head_scores(params, dataclasses.replace(CFG, head_size=8))
