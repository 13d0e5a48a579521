"""Mixture-of-Experts: routing, aux statistics, dispatch, upcycling, validation, LoRA, train loss.

Every reference here is written in plain numpy (float64) independently of ``peftjax.moe``.
"""
import functools
import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from peftjax import moe
from peftjax import peft
from peftjax import run
from peftjax import step as step_lib
from peftjax import tree
from peftjax.components import moe_aux
from peftjax.errors import ConfigError
from peftjax.models import BertClassifier
from peftjax.models import BertConfig
from peftjax.models import BertEncoder
from peftjax.models.build import Built
from peftjax.models.build import build
from peftjax.moe import MoeConfig
from peftjax.moe import MoeFFN
from peftjax.moe import routing
from peftjax.tasks.classification import Classification
from peftjax.validate import validate
from peftjax.validate import validate_mesh_moe


# ---------------------------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------------------------

def np_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_gelu_tanh(x):  # jax.nn.gelu's default (approximate=True), MoeFFN's default activation
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def np_route(logits, k, mask, renormalize=True):
  """Per token: its k experts (descending probability) and weights; padding: experts -1."""
  probs = np_softmax(logits)
  order = np.argsort(-probs, axis=-1, kind='stable')[..., :k]  # (G, S, k)
  w = np.take_along_axis(probs, order, -1)
  if renormalize:
    w = w / w.sum(-1, keepdims=True)
  order = np.where(mask[..., None], order, -1)
  w = np.where(mask[..., None], w, 0.0)
  return order, w, probs


def np_assignments(order, cap, num_experts):
  """GShard priority by hand: ``kept[g, s, j]`` -- is the j-th choice of token s in a slot?"""
  g, s, k = order.shape
  kept = np.zeros((g, s, k), bool)
  for gi in range(g):
    fill = [0] * num_experts
    for j in range(k):  # every first choice before any second choice
      for si in range(s):
        e = order[gi, si, j]
        if e < 0:
          continue
        if fill[e] < cap:
          kept[gi, si, j] = True
        fill[e] += 1
  return kept


def np_expert(p, e, x):
  w1, b1 = np.asarray(p['intermediate']['kernel'], np.float64), np.asarray(
      p['intermediate']['bias'], np.float64)
  w2, b2 = np.asarray(p['output']['kernel'], np.float64), np.asarray(
      p['output']['bias'], np.float64)
  return np_gelu_tanh(x @ w1[e] + b1[e]) @ w2[e] + b2[e]


def np_moe(x, mask, p, k, cap, renormalize=True):
  """The routed part of an MoE FFN, one token and one choice at a time."""
  x = np.asarray(x, np.float64)
  logits = x @ np.asarray(p['router']['kernel'], np.float64)
  order, w, _ = np_route(logits, k, mask, renormalize)
  e_num = logits.shape[-1]
  kept = np_assignments(order, cap, e_num)
  y = np.zeros_like(x)
  for gi, si, j in zip(*np.nonzero(kept)):
    y[gi, si] += w[gi, si, j] * np_expert(p, order[gi, si, j], x[gi, si])
  return y, kept


def np_stats(logits, mask, k, cap):
  """Switch balance loss, z-loss, dropped fraction, expert load, as documented."""
  logits = np.asarray(logits, np.float64)
  g, s, e = logits.shape
  order, _, probs = np_route(logits, k, mask)
  balances = []
  counts_all = np.zeros(e)
  for gi in range(g):
    counts = np.zeros(e)
    for si in range(s):
      for j in range(k):
        if order[gi, si, j] >= 0:
          counts[order[gi, si, j]] += 1
    counts_all += counts
    f = counts / max(counts.sum(), 1)
    real = mask[gi]
    if real.any():  # an all-padding sequence does not count in the mean
      balances.append(e * np.sum(f * probs[gi][real].mean(0)))
  lse = np.log(np.exp(logits).sum(-1))
  z = np.sum(lse ** 2 * mask) / max(mask.sum(), 1)
  kept = np_assignments(order, cap, e)
  n_real = mask.sum() * k
  dropped = (n_real - kept.sum()) / max(n_real, 1)
  return dict(balance_loss=np.mean(balances) if balances else 0.0, z_loss=z, dropped_fraction=dropped,
              expert_load=counts_all / counts_all.sum())


def rnd(seed, shape, scale=1.0):
  """numpy normals (jax.random would compile a program per shape: slow on a busy CPU)."""
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def stats_of(collection):
  """The one MoE layer's sown stats of a standalone MoeFFN: ``{'z_loss': value, ...}``."""
  return {k: v[0] for k, v in collection['moe'].items()}


# ---------------------------------------------------------------------------------------------
# 1. routing
# ---------------------------------------------------------------------------------------------

def _logits_mask(seed=0, g=3, s=10, e=5):
  logits = jnp.asarray(rnd(seed, (g, s, e), 2.0))
  mask = np.ones((g, s), bool)
  mask[0, 7:] = False
  mask[2, 3:] = False
  return logits, mask


@pytest.mark.parametrize('renormalize', [True, False])
def test_top_k_route_weights_order_and_padding(renormalize):
  logits, mask = _logits_mask()
  g, s, e = logits.shape
  k = 3
  r = routing.top_k_route(logits, k, jnp.asarray(mask), renormalize=renormalize)
  order, w, probs = np_route(logits, k, mask, renormalize)
  assert r.expert.shape == (g, k * s) and r.expert.dtype == jnp.int32
  np.testing.assert_allclose(r.probs, probs, atol=1e-6)
  # Choice-major: assignment j*S + t is the j-th choice of token t; padding -> sentinel E.
  want_e = np.where(order >= 0, order, e).transpose(0, 2, 1).reshape(g, k * s)
  np.testing.assert_array_equal(r.expert, want_e)
  np.testing.assert_allclose(r.weight, w.transpose(0, 2, 1).reshape(g, k * s), atol=1e-6)
  per_token = np.asarray(r.weight).reshape(g, k, s).sum(1)
  if renormalize:
    np.testing.assert_allclose(per_token[mask], 1.0, atol=1e-6)
  else:  # raw softmax: the sum of the k largest probabilities, < 1 for k < E
    np.testing.assert_allclose(per_token[mask], np.sort(probs, -1)[..., -k:].sum(-1)[mask],
                               atol=1e-6)
    assert np.all(per_token[mask] < 1.0 - 1e-3)
  assert np.all(per_token[~mask] == 0.0)
  assert np.all(np.asarray(r.expert).reshape(g, k, s).transpose(0, 2, 1)[~mask] == e)


def np_positions(expert, num_experts):
  out = np.zeros_like(expert)
  for gi in range(expert.shape[0]):
    fill = [0] * (num_experts + 1)
    for a, ex in enumerate(expert[gi]):
      out[gi, a] = fill[ex]
      fill[ex] += 1
  return out


def test_positions_sorted_equals_onehot_and_loop():
  rng = np.random.default_rng(0)
  for e in (1, 3, 8):
    expert = rng.integers(0, e + 1, size=(4, 37)).astype(np.int32)  # includes sentinel E
    expert[0, :5] = e
    want = np_positions(expert, e)
    np.testing.assert_array_equal(routing.positions_sorted(jnp.asarray(expert), e), want)
    np.testing.assert_array_equal(routing.positions_onehot(jnp.asarray(expert), e), want)


def test_capacity_formula_and_clamps():
  assert routing.capacity(64, 8, 2, 1.25) == 20
  for s, e, k, cf in [(10, 3, 2, 1.0), (16, 4, 2, 0.5), (7, 5, 1, 1.3), (32, 8, 2, 2.0)]:
    assert routing.capacity(s, e, k, cf) == min(s, max(1, math.ceil(k * s * cf / e)))
  assert routing.capacity(16, 4, 2, 0.5) == 4
  assert routing.capacity(10, 4, 1, 0.01) == 1  # at least one slot
  assert routing.capacity(8, 2, 2, 4.0) == 8  # at most the group size
  assert routing.capacity(12, 4, 2, 0.1, dropless=True) == 12


def test_expert_choice_route_matches_reference_and_skips_padding():
  logits, mask = _logits_mask(seed=1, g=3, s=10, e=4)
  cap = 4  # group 2 has only 3 real tokens: its last slot of every expert stays empty
  tok, w, probs = routing.expert_choice_route(logits, cap, jnp.asarray(mask))
  p = np_softmax(logits)
  g, s, e = p.shape
  assert tok.shape == (g, e, cap)
  for gi in range(g):
    real = np.nonzero(mask[gi])[0]
    for ei in range(e):
      ranked = real[np.argsort(-p[gi, real, ei], kind='stable')][:cap]
      want_tok = np.full(cap, s)
      want_tok[:len(ranked)] = ranked
      want_w = np.zeros(cap)
      want_w[:len(ranked)] = p[gi, ranked, ei]
      np.testing.assert_array_equal(tok[gi, ei], want_tok)
      np.testing.assert_allclose(w[gi, ei], want_w, atol=1e-6)
  assert np.all(np.asarray(tok)[2, :, 3] == s) and np.all(np.asarray(w)[2, :, 3] == 0)
  np.testing.assert_allclose(probs, p, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 2. auxiliary statistics
# ---------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=(2, 3))
def _router_stats(logits, mask, k, cap):
  r = routing.top_k_route(logits, k, jnp.asarray(mask))
  pos = routing.positions_sorted(r.expert, logits.shape[-1])
  return routing.router_stats(logits, r.probs, r.expert, pos, cap, jnp.asarray(mask))


def test_router_stats_match_numpy_reference():
  logits, mask = _logits_mask(seed=2, g=4, s=10, e=5)
  mask[3] = False  # an all-padding sequence: no routing, no part in the balance mean
  for k, cap in [(1, 2), (2, 3), (2, 10)]:
    got = _router_stats(logits, mask, k, cap)
    want = np_stats(logits, mask, k, cap)
    for name in ('balance_loss', 'z_loss', 'dropped_fraction', 'expert_load'):
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert float(want['dropped_fraction']) > 0 or cap == 10


def test_balance_loss_is_one_when_uniform():
  # Equal logits: P_e = 1/E; top_k on ties picks the lowest indices, so craft a uniform f by
  # giving each token a tiny preference rotating over the experts (E tokens per group).
  e, s = 4, 8
  logits = np.zeros((2, s, e), np.float32)
  for t in range(s):
    logits[:, t, t % e] = 1e-6
  got = _router_stats(jnp.asarray(logits), np.ones((2, s), bool), 1, s)
  np.testing.assert_allclose(got['balance_loss'], 1.0, atol=1e-5)
  np.testing.assert_allclose(got['expert_load'], np.full(e, 0.25), atol=1e-7)
  # Everything on one expert with probability ~1: E * 1 * 1 = E.
  skew = np.zeros((1, s, e), np.float32)
  skew[..., 0] = 30.0
  got = _router_stats(jnp.asarray(skew), np.ones((1, s), bool), 1, s)
  np.testing.assert_allclose(got['balance_loss'], e, rtol=1e-5)


def test_dropped_fraction_crafted_example():
  # S=5, token 0 is padding; E=3, k=2, 2 slots per expert. By hand, choice-major:
  #   first choices:  t1->0 (pos 0), t2->0 (1), t3->0 (2: DROPPED), t4->1 (0)
  #   second choices: t1->1 (1), t2->1 (2: DROPPED), t3->2 (0), t4->0 (3: DROPPED)
  # 3 of 8 real assignments dropped. The padding token would pick experts 0 and 1 first in
  # line: were it given slots, 5 of 8 would be dropped.
  prefs = [(0, 1), (0, 1), (0, 1), (0, 2), (1, 0)]
  logits = np.zeros((1, 5, 3), np.float32)
  for t, (a, b) in enumerate(prefs):
    logits[0, t, a], logits[0, t, b] = 4.0, 2.0
  mask = np.array([[False, True, True, True, True]])
  assert routing.capacity(5, 3, 2, 0.6) == 2
  got = _router_stats(jnp.asarray(logits), mask, 2, 2)
  assert float(got['dropped_fraction']) == pytest.approx(3 / 8)
  np.testing.assert_allclose(got['expert_load'], [4 / 8, 3 / 8, 1 / 8], atol=1e-7)
  everyone = _router_stats(jnp.asarray(logits), np.ones_like(mask), 2, 2)
  assert float(everyone['dropped_fraction']) == pytest.approx(5 / 10)


def test_aux_losses_average_layers_and_dense_is_zero():
  col = {'encoder': {
      'layer_1': {'moe': {'balance_loss': (1.5,), 'z_loss': (4.0,), 'dropped_fraction': (0.25,),
                          'expert_load': (jnp.ones(4) / 4,)}},
      'layer_3': {'moe': {'balance_loss': (2.5,), 'z_loss': (2.0,), 'dropped_fraction': (0.75,),
                          'expert_load': (jnp.ones(4) / 4,)}}}}
  loss, metrics = moe.aux_losses(col, 0.1, 0.01)
  assert float(loss) == pytest.approx(0.1 * 2.0 + 0.01 * 3.0)
  assert {k: float(v) for k, v in metrics.items()} == pytest.approx(
      {'balance_loss': 2.0, 'z_loss': 3.0, 'dropped_fraction': 0.5})
  loss, metrics = moe.aux_losses({}, 0.1, 0.01)
  assert float(loss) == 0.0 and metrics == {}


# ---------------------------------------------------------------------------------------------
# 3. dispatch
# ---------------------------------------------------------------------------------------------

G, S, D, F, E = 2, 16, 8, 12, 4


def _layer(**cfg):
  return MoeFFN(MoeConfig(**{'num_experts': E, 'top_k': 2, **cfg}), hidden_size=D,
                intermediate_size=F)


def _expert_params(seed, e, d, f, router=True):
  """MoeFFN parameters of order-one scale (the layer's init is 0.02: outputs near 0)."""
  p = {'intermediate': {'kernel': rnd(seed, (e, d, f), 1 / np.sqrt(d)),
                        'bias': rnd(seed + 1, (e, f), 0.1)},
       'output': {'kernel': rnd(seed + 2, (e, f, d), 1 / np.sqrt(f)),
                  'bias': rnd(seed + 3, (e, d), 0.1)}}
  if router:
    p['router'] = {'kernel': rnd(seed + 4, (d, e))}
  p = jax.tree.map(jnp.asarray, p)
  return p


@functools.cache
def _setup():
  """Params with a decisive router, inputs, a padded token mask."""
  x = jnp.asarray(rnd(10, (G, S, D)))
  params = _expert_params(11, E, D, F)
  # The layer declares exactly these parameters, with these shapes.
  shapes = jax.eval_shape(lambda: nn.meta.unbox(_layer().init(jax.random.key(0), x)['params']))
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, params)
  mask = np.ones((G, S), bool)
  mask[1, 11:] = False
  return params, x, jnp.asarray(mask)


@functools.cache
def _moe(**cfg):
  """Jitted ``f(params, x, mask) -> (y, stats, (d params, d x))`` of an MoeFFN, compiled once
  per config; the gradients are of ``sum(y * ct)`` for a fixed random cotangent ``ct``."""
  layer = _layer(**cfg)

  def f(params, x, mask):
    def loss(p, x):
      y, col = layer.apply({'params': p}, x, mask, mutable=['moe'])
      return jnp.sum(y * rnd(99, x.shape)), (y, stats_of(col))
    (_, (y, st)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, st, grads
  return jax.jit(f)


def _run(cfg, params, x, mask):
  y, st, _ = _moe(**cfg)(params, x, mask)
  return y, st


def _grads(cfg, params, x, mask):
  return _moe(**cfg)(params, x, mask)[2]


def test_sorted_and_onehot_match_reference_with_drops():
  params, x, mask = _setup()
  cap = routing.capacity(S, E, 2, 0.5)
  assert cap == 4
  want, kept = np_moe(x, np.asarray(mask), params, 2, cap)
  assert 0 < (~kept & (np.asarray(mask)[..., None])).sum()  # some assignments are dropped
  outs = {}
  for d in ('sorted', 'onehot'):
    y, st = _run(dict(capacity_factor=0.5, dispatch=d), params, x, mask)
    np.testing.assert_allclose(y, want, atol=1e-5, err_msg=d)
    n_real = int(np.asarray(mask).sum()) * 2
    assert float(st['dropped_fraction']) == pytest.approx((n_real - kept.sum()) / n_real)
    outs[d] = y
  np.testing.assert_allclose(outs['sorted'], outs['onehot'], atol=1e-5)
  # Padding tokens get no routed output at all.
  assert np.all(np.asarray(outs['sorted'])[~np.asarray(mask)] == 0.0)


def test_sorted_and_onehot_gradients_agree():
  params, x, mask = _setup()
  gs = _grads(dict(capacity_factor=0.5, dispatch='sorted'), params, x, mask)
  go = _grads(dict(capacity_factor=0.5, dispatch='onehot'), params, x, mask)
  fs, fo = tree.flatten(gs[0]), tree.flatten(go[0])
  assert sorted(fs) == sorted(fo) == ['intermediate/bias', 'intermediate/kernel',
                                      'output/bias', 'output/kernel', 'router/kernel']
  for p in fs:
    np.testing.assert_allclose(fs[p], fo[p], atol=1e-5, err_msg=p)
    assert float(jnp.abs(fs[p]).max()) > 1e-4, p  # a real gradient, not two zeros
  np.testing.assert_allclose(gs[1], go[1], atol=1e-5)
  assert np.all(np.asarray(gs[1])[~np.asarray(mask)] == 0.0)  # padding takes no gradient path


def test_ragged_equals_sorted_dropless_and_dropless_drops_nothing():
  params, x, mask = _setup()
  want, kept = np_moe(x, np.asarray(mask), params, 2, S)
  assert kept.sum() == np.asarray(mask).sum() * 2
  res = {}
  for d in ('sorted', 'ragged', 'onehot'):
    y, st, grads = _moe(dropless=True, dispatch=d)(params, x, mask)
    assert float(st['dropped_fraction']) == 0.0
    np.testing.assert_allclose(y, want, atol=1e-5, err_msg=d)
    res[d] = (y, grads)
  (ys, (gps, gxs)), (yr, (gpr, gxr)) = res['sorted'], res['ragged']
  np.testing.assert_allclose(yr, ys, atol=1e-5)
  np.testing.assert_allclose(gxr, gxs, atol=1e-5)
  fs, fr = tree.flatten(gps), tree.flatten(gpr)
  for p in fs:
    assert np.all(np.isfinite(fr[p])), p
    np.testing.assert_allclose(fr[p], fs[p], atol=1e-5, err_msg=p)


def test_expert_choice_layer_matches_reference():
  params, x, mask = _setup()
  cap = routing.capacity(S, E, 2, 1.0)
  assert cap == 8
  y, st = _run(dict(router='expert_choice', capacity_factor=1.0), params, x, mask)
  xs, m = np.asarray(x, np.float64), np.asarray(mask)
  p = np_softmax(xs @ np.asarray(params['router']['kernel'], np.float64))
  want = np.zeros_like(xs)
  for gi in range(G):
    real = np.nonzero(m[gi])[0]
    for e in range(E):  # expert e takes its `cap` most probable real tokens
      for t in real[np.argsort(-p[gi, real, e], kind='stable')][:cap]:
        want[gi, t] += p[gi, t, e] * np_expert(params, e, xs[gi, t])
  np.testing.assert_allclose(y, want, atol=1e-5)
  assert float(st['balance_loss']) == 0.0 and float(st['dropped_fraction']) == 0.0
  assert np.all(np.asarray(y)[~m] == 0.0)
  # Load = filled slots per expert: every expert fills min(cap, real tokens) per sequence.
  filled = np.array([[min(cap, m[gi].sum())] * E for gi in range(G)], float).sum(0)
  np.testing.assert_allclose(st['expert_load'], filled / filled.sum(), atol=1e-7)


@pytest.mark.parametrize('dispatch', ['sorted', 'onehot'])
def test_dropped_token_gets_exactly_zero(dispatch):
  # k=1, E=2, S=4, cf=1: 2 slots per expert. Feature 0 steers tokens 0,1,2 to expert 0 and
  # token 3 to expert 1; token 2 is third in line for expert 0 and is dropped.
  assert routing.capacity(4, 2, 1, 1.0) == 2
  x = rnd(20, (1, 4, D), 0.1)
  x[0, :, 0] = [1.0, 1.0, 1.0, -1.0]
  router = np.zeros((D, 2), np.float32)
  router[0] = [5.0, -5.0]
  params = dict(_expert_params(21, 2, D, F, router=False), router={'kernel': jnp.asarray(router)})
  y, st = _run(dict(num_experts=2, top_k=1, capacity_factor=1.0, dispatch=dispatch), params,
                jnp.asarray(x), None)
  y = np.asarray(y)
  assert np.all(y[0, 2] == 0.0)
  assert float(st['dropped_fraction']) == pytest.approx(1 / 4)
  for t, e in [(0, 0), (1, 0), (3, 1)]:  # renormalized top-1 weight is exactly 1
    np.testing.assert_allclose(y[0, t], np_expert(params, e, x[0, t].astype(np.float64)),
                               atol=1e-5)
    assert np.abs(y[0, t]).max() > 1e-3


def test_shared_experts_add_a_dense_ffn():
  params, x, mask = _setup()
  layer = _layer(capacity_factor=0.5, shared_experts=2)
  shapes = jax.eval_shape(lambda: nn.meta.unbox(layer.init(jax.random.key(0), x)['params']))
  assert jax.tree.map(lambda a: a.shape, shapes['shared']) == {
      'intermediate': {'kernel': (D, 2 * F), 'bias': (2 * F,)},
      'output': {'kernel': (2 * F, D), 'bias': (D,)}}
  p1, p2 = _expert_params(30, 1, D, 2 * F, router=False).values()
  sh = {'intermediate': jax.tree.map(lambda a: a[0], p1),
        'output': jax.tree.map(lambda a: a[0], p2)}
  y_shared, _ = _run(dict(capacity_factor=0.5, shared_experts=2), dict(params, shared=sh), x,
                     mask)
  y_routed, _ = _run(dict(capacity_factor=0.5, dispatch='sorted'), params, x, mask)
  xs = np.asarray(x, np.float64)
  dense = np_gelu_tanh(xs @ np.asarray(sh['intermediate']['kernel'], np.float64)
                       + np.asarray(sh['intermediate']['bias'])) @ np.asarray(
                           sh['output']['kernel'], np.float64) + np.asarray(sh['output']['bias'])
  np.testing.assert_allclose(np.asarray(y_shared) - np.asarray(y_routed), dense, atol=1e-5)
  # Padding tokens skip the routed experts but not the shared ones.
  np.testing.assert_allclose(np.asarray(y_shared)[~np.asarray(mask)],
                             dense[~np.asarray(mask)], atol=1e-5)


def test_jitter_only_touches_router_input_in_training():
  """Identical experts (upcycled) make the output independent of routing: jitter may then
  change the router logits but never the experts' input or the layer output."""
  x = jnp.asarray(rnd(40, (G, S, D)))
  mask = jnp.ones((G, S), bool)
  dense = {'intermediate': {'kernel': rnd(41, (D, F), 0.3),
                            'bias': jnp.full((F,), 0.1)},
           'output': {'kernel': rnd(42, (F, D), 0.3),
                      'bias': jnp.full((D,), -0.1)}}
  params = moe.upcycle_ffn({'ffn': dense}, 'ffn', E, rng=jax.random.key(43),
                           router_std=1.0)['ffn']['moe']
  layer = _layer(jitter=0.3, dropless=True)

  @functools.partial(jax.jit, static_argnums=0)
  def run_jit(deterministic, rngs):
    seen = []

    def spy(next_fun, args, kwargs, context):  # records the router's input
      if context.module.name == 'router' and context.method_name == '__call__':
        seen.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
      y, col = layer.apply({'params': params}, x, mask, deterministic=deterministic, rngs=rngs,
                           mutable=['moe'])
    return y, seen[0], stats_of(col)

  def run(deterministic, rng=None):
    y, r, st = run_jit(deterministic, {} if rng is None else {'dropout': rng})
    return np.asarray(y), np.asarray(r), st

  y_eval, r_eval, st_eval = run(True)
  np.testing.assert_array_equal(r_eval, x)  # eval: never jittered
  y_eval2, r_eval2, _ = run(True, jax.random.key(1))  # an rng in eval changes nothing
  np.testing.assert_array_equal(r_eval2, x)
  np.testing.assert_array_equal(y_eval2, y_eval)
  y_tr, r_tr, st_tr = run(False, jax.random.key(1))
  assert not np.allclose(r_tr, x)
  ratio = r_tr / np.asarray(x)
  assert np.all((ratio >= 0.7 - 1e-6) & (ratio <= 1.3 + 1e-6))
  assert float(st_tr['z_loss']) != float(st_eval['z_loss'])  # router logits did change
  np.testing.assert_allclose(y_tr, y_eval, atol=1e-5)  # experts saw the un-jittered x
  _, r_tr2, _ = run(False, jax.random.key(2))
  assert not np.allclose(r_tr2, r_tr)
  with pytest.raises(flax.errors.InvalidRngError, match='dropout'):
    layer.apply({'params': params}, x, mask, deterministic=False, mutable=['moe'])
  # jitter=0: a training forward needs no rng and routes exactly as in eval.
  y0 = jax.jit(lambda p: _layer(dropless=True).apply({'params': p}, x, mask,
                                                     deterministic=False))(params)
  np.testing.assert_allclose(y0, _run(dict(dropless=True, dispatch='sorted'), params, x,
                                      mask)[0], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# 4. sparse upcycling of the real MiniLM
# ---------------------------------------------------------------------------------------------

SENTENCES = ['a gripping, beautifully shot film that never lets go of its characters .',
             'dull .',
             'the plot meanders , but the performances are terrific and the ending lands .',
             'i laughed , i cried , and then i checked my watch twice .']


@pytest.fixture(scope='module')
def text(minilm_dir):
  from peftjax.data import Tokenizer
  enc = Tokenizer(str(minilm_dir / 'tokenizer.json'), max_length=16).encode(SENTENCES)
  assert enc['attention_mask'].sum(1).min() < 16 == enc['attention_mask'].sum(1).max()
  return enc


def _moe_section(**kw):
  c = common.get_config().moe
  c.num_experts, c.top_k, c.every = 4, 2, 2
  for k, v in kw.items():
    c[k] = v
  return c


def _encode(built_, text):
  cfg = built_.module.cfg
  seen = []

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, MoeFFN) and context.method_name == '__call__':
      seen.append((np.asarray(args[0]), np.asarray(args[1])))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    h, col = BertEncoder(cfg).apply({'params': built_.params['encoder']}, text['input_ids'],
                                    text['attention_mask'], text['token_type_ids'],
                                    mutable=['moe'])
  return np.asarray(h), col.get('moe', {}), seen


@pytest.fixture(scope='module')
def dense_out(minilm_dir, text):
  model_cfg = common.get_config().model
  return _encode(build(model_cfg, num_classes=2, pretrained_dir=minilm_dir), text)[0]


@pytest.mark.parametrize('shared', [0, 1])
def test_upcycled_minilm_equals_dense(minilm_dir, minilm, text, dense_out, shared):
  model_cfg = common.get_config().model
  built_ = build(model_cfg, num_classes=2, pretrained_dir=minilm_dir,
                 moe_cfg=_moe_section(dropless=True, shared_experts=shared))
  assert built_.module.cfg.moe_layers == (1, 3, 5)
  _, enc = minilm
  m = built_.params['encoder']['layer_1']['moe']
  dense_w2 = np.asarray(enc['layer_1']['output']['kernel'])
  for e in range(4):  # every expert a copy (halved output with a shared expert)
    np.testing.assert_array_equal(m['intermediate']['kernel'][e],
                                  enc['layer_1']['intermediate']['kernel'])
    np.testing.assert_allclose(m['output']['kernel'][e], dense_w2 * (0.5 if shared else 1.0))
  assert ('shared' in m) == bool(shared)
  h, col, seen = _encode(built_, text)
  real = text['attention_mask'].astype(bool)
  np.testing.assert_allclose(h[real], dense_out[real], atol=1e-5, rtol=0)
  layers = moe.layer_stats(col)
  assert sorted(layers) == [f'layer_{i}/moe' for i in (1, 3, 5)]
  assert all(float(v['dropped_fraction']) == 0.0 for v in layers.values())
  assert len(seen) == 3


def test_upcycled_minilm_capacity_one_differs_only_on_dropped_tokens(minilm_dir, text):
  """cf=1.0 drops assignments. With 2 layers the MoE layer (layer 1) is the last one, so
  nothing mixes tokens after it: the encoder output differs from the dense model exactly on
  the real tokens with a dropped assignment (padding routes nowhere, so it differs too)."""
  model_cfg = common.get_config().model
  model_cfg.num_layers = 2
  dense = _encode(build(model_cfg, num_classes=2, pretrained_dir=minilm_dir), text)[0]
  built_ = build(model_cfg, num_classes=2, pretrained_dir=minilm_dir,
                 moe_cfg=_moe_section(capacity_factor=1.0))
  h, col, seen = _encode(built_, text)
  (x, token_mask), = seen
  s = x.shape[1]
  cap = routing.capacity(s, 4, 2, 1.0)
  kernel = built_.params['encoder']['layer_1']['moe']['router']['kernel']
  r = routing.top_k_route(jnp.asarray(x) @ kernel, 2, jnp.asarray(token_mask))
  pos = np.asarray(routing.positions_sorted(r.expert, 4))
  dropped_assign = (np.asarray(r.expert) < 4) & (pos >= cap)
  dropped_tok = dropped_assign.reshape(x.shape[0], 2, s).any(1)
  real = text['attention_mask'].astype(bool)
  n_dropped = int(dropped_assign.sum())
  assert n_dropped > 0  # the setting is meaningful: something is dropped
  frac = float(moe.layer_stats(col)['layer_1/moe']['dropped_fraction'])
  assert frac == pytest.approx(n_dropped / (2 * real.sum()))
  diff = np.abs(h - dense).max(-1)
  keep = real & ~dropped_tok
  assert keep.any()
  assert diff[keep].max() < 1e-5
  assert diff[real & dropped_tok].min() > 1e-3
  assert diff[~real].min() > 1e-3  # padding: no routed FFN at all (the dense model has one)
  print(f'\n[cf=1.0] cap={cap} dropped assignments {n_dropped}/{2 * real.sum()}, tokens with a '
        f'drop {int((real & dropped_tok).sum())}/{real.sum()}; max |diff| on kept tokens '
        f'{diff[keep].max():.2e}, min on dropped tokens {diff[real & dropped_tok].min():.2e}')


def test_upcycle_rejects_a_non_ffn_path(minilm):
  _, enc = minilm
  with pytest.raises(moe.UpcycleError, match=r"'layer_0/attention' is not an FFN"):
    moe.upcycle_ffn(enc, 'layer_0/attention', 4, rng=jax.random.key(0))
  with pytest.raises(moe.UpcycleError, match=r"'layer_9'.*holds nothing"):
    moe.upcycle_ffn(enc, 'layer_9', 4, rng=jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# 5. bad input
# ---------------------------------------------------------------------------------------------

def _config(**moe_kw):
  c = common.get_config()
  c.moe.num_experts = 4
  for k, v in moe_kw.items():
    c.moe[k] = v
  return c


def test_valid_moe_config_passes():
  validate(_config())
  MoeConfig(num_experts=4, top_k=4).check()


@pytest.mark.parametrize('field, value, msg', [
    ('top_k', 5, r'moe\.top_k=5 is invalid; valid: 1 <= top_k <= num_experts \(4\)'),
    ('top_k', 0, r'moe\.top_k=0 is invalid'),
    ('capacity_factor', 0.0, r'moe\.capacity_factor=0\.0 is invalid'),
    ('capacity_factor', -1.0, r'moe\.capacity_factor=-1\.0 is invalid'),
    ('router', 'hash', r"moe\.router='hash' is invalid; valid: topk, expert_choice"),
    ('dispatch', 'dense', r"moe\.dispatch='dense' is invalid; valid: sorted, onehot, ragged"),
])
def test_bad_moe_fields_name_field_and_value(field, value, msg):
  with pytest.raises(ConfigError, match='config.' + msg):
    validate(_config(**{field: value}))
  with pytest.raises(ValueError, match=msg):
    MoeConfig(num_experts=4, **{field: value}).check()


def test_mesh_expert_axis_must_divide_experts():
  class FakeMesh:
    shape = {'data': 1, 'expert': 4}

  with pytest.raises(ConfigError, match=r'moe\.num_experts=6 is invalid.*axis size 4'):
    validate_mesh_moe(_config(num_experts=6), FakeMesh())
  validate_mesh_moe(_config(num_experts=8), FakeMesh())
  with pytest.raises(ConfigError, match=r"moe\.dispatch='ragged'"):
    validate_mesh_moe(_config(num_experts=8, dispatch='ragged'), FakeMesh())


# ---------------------------------------------------------------------------------------------
# 6. LoRA on experts (tiny BERT, one MoE layer)
# ---------------------------------------------------------------------------------------------

TD, TF, TE, R = 16, 32, 4, 2
TINY = BertConfig(vocab_size=100, hidden_size=TD, num_layers=2, num_heads=2,
                  intermediate_size=TF, max_position=16,
                  moe=MoeConfig(num_experts=TE, top_k=2, capacity_factor=1.0), moe_layers=(1,))
EXPERT_TARGETS = r'moe/(intermediate|output|router)/kernel$'
PRE = 'encoder/layer_1/moe'
C1, C2 = 0.5, 0.2  # balance_coef, z_coef of the train step (large: the aux terms matter)
LR = 0.1


@functools.cache
def tiny() -> Built:
  """A random tiny BERT classifier whose layer 1 is an MoE layer (E=4, top-2, cf=1)."""
  module = BertClassifier(TINY, num_classes=3)
  ids = jnp.ones((4, 8), jnp.int32)
  boxed = jax.eval_shape(module.init, jax.random.key(0), ids, ids)['params']
  shapes = tree.flatten(jax.tree.map(lambda b: b.value, boxed,
                                     is_leaf=lambda b: isinstance(b, nn.meta.AxisMetadata)))
  # Random parameters from numpy (a jitted init compiles slowly): N(0, 0.02^2) weights and
  # biases, unit LayerNorm scales; a decisive router (N(0, 1)), so that a small perturbation
  # cannot flip a top-k choice.
  flat = {}
  for i, (path, sds) in enumerate(sorted(shapes.items())):
    if path.endswith('scale'):
      flat[path] = jnp.ones(sds.shape, sds.dtype)
    elif path.endswith('router/kernel'):
      flat[path] = jnp.asarray(rnd(1000 + i, sds.shape))
    else:
      flat[path] = jnp.asarray(rnd(1000 + i, sds.shape, 0.02))
  return Built(module, tree.unflatten(flat), ('input_ids', 'attention_mask', 'token_type_ids'),
               nn.get_partition_spec(boxed), 'random')


def tiny_batch() -> dict:
  ids = (jnp.arange(32, dtype=jnp.int32).reshape(4, 8) * 7 + 3) % 100
  return {'input_ids': ids, 'attention_mask': jnp.ones_like(ids).at[0, 6:].set(0),
          'token_type_ids': jnp.zeros_like(ids), 'label': jnp.array([0, 1, 2, 1])}


def _inputs() -> dict:
  return {k: v for k, v in tiny_batch().items() if k != 'label'}


@functools.cache
def lora_setup():
  """(method, its initial params, config), LoRA rank 2 on the router and the expert kernels."""
  b = tiny()
  c = common.get_config()
  c.peft.method, c.peft.lora.rank, c.peft.lora.alpha, c.peft.lora.targets = 'lora', R, 4.0, EXPERT_TARGETS
  m = peft.build(c.peft)
  return m, m.init(jax.random.key(1), b.module, b.params, _inputs()), c


@functools.cache
def plain_forward():
  b = tiny()
  return jax.jit(lambda base: b.module.apply({'params': base}, **_inputs()))


@functools.cache
def lora_forward():
  b, (m, _, _) = tiny(), lora_setup()
  return jax.jit(lambda base, lora: peft.apply(b.module, m, base, lora, _inputs()))


def _sgd_recording_grads():
  """``p <- p - LR * g`` that also keeps the step's gradients, exactly, as its state."""
  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(lambda g: -LR * g, grads), grads
  return optax.GradientTransformation(init, update)


@functools.cache
def lora_step():
  """One jitted ``step.make_train_step`` step of the LoRA model (balance C1, z C2):
  ``(trainable before, frozen, state before, state after, metrics)``."""
  b, (m, lora, _) = tiny(), lora_setup()
  base_tr, frozen = tree.partition(b.params, m.trainable_base)
  trainable = {'base': base_tr, 'peft': lora}
  tx = _sgd_recording_grads()
  state = run.TrainState.create(tx, trainable, seed=0)
  step = jax.jit(step_lib.make_train_step(run.make_forward(b, m), tx, Classification(None),
                                          [moe_aux.component(C1, C2)]))
  new, metrics = step(state, frozen, tiny_batch())
  return trainable, frozen, state, new, metrics


def test_expert_lora_count_identity_and_specs():
  b = tiny()
  m, lora, _ = lora_setup()
  flat = tree.flatten(lora)
  assert {p: tuple(v.shape) for p, v in flat.items()} == {
      f'{PRE}/router/lora_a': (TD, R), f'{PRE}/router/lora_b': (R, TE),
      f'{PRE}/intermediate/lora_a': (TE, TD, R), f'{PRE}/intermediate/lora_b': (TE, R, TF),
      f'{PRE}/output/lora_a': (TE, TF, R), f'{PRE}/output/lora_b': (TE, R, TD)}
  # router: A D x r + B r x E; per expert kernel: A E x in x r + B E x r x out.
  assert tree.count(lora) == (TD * R + R * TE) + TE * (TD * R + R * TF) + TE * (TF * R + R * TD)
  assert all(np.all(np.asarray(v) == 0) for p, v in flat.items() if p.endswith('lora_b'))
  assert all(np.abs(np.asarray(v)).max() > 0 for p, v in flat.items() if p.endswith('lora_a'))
  # From the trees alone a MoE layer's expert kernels look like a stack (one leading axis that
  # the factors share) and fold like one; only a call of the layer routes them per expert.
  assert {s.path: (s.kind, s.lead) for s in m.sites(b.params, lora)} == {
      f'{PRE}/router': ('dense', ()), f'{PRE}/intermediate': ('dense', (TE,)),
      f'{PRE}/output': ('dense', (TE,))}
  np.testing.assert_array_equal(lora_forward()(b.params, lora), plain_forward()(b.params))
  specs = tree.flatten(m.logical_specs(b.logical_specs, lora))
  P = jax.sharding.PartitionSpec
  assert specs == {f'{PRE}/intermediate/lora_a': P('expert', 'embed', None),
                   f'{PRE}/intermediate/lora_b': P('expert', None, 'mlp'),
                   f'{PRE}/output/lora_a': P('expert', 'mlp', None),
                   f'{PRE}/output/lora_b': P('expert', None, 'embed'),
                   f'{PRE}/router/lora_a': P('embed', None),
                   f'{PRE}/router/lora_b': P(None, 'expert')}


def test_expert_lora_one_step_trains_only_lora_and_head():
  trainable, frozen, _, new, metrics = lora_step()
  assert np.isfinite(float(metrics['loss']))
  assert sorted(tree.flatten(trainable['base'])) == ['classifier/bias', 'classifier/kernel']
  fz = tree.flatten(frozen)
  assert {f'{PRE}/intermediate/kernel', f'{PRE}/output/kernel', f'{PRE}/router/kernel'} <= set(fz)
  fa, fb = tree.flatten(trainable), tree.flatten(new.params)
  moved = sorted(p for p in fa if not np.array_equal(fa[p], fb[p]))
  # With B = 0 the gradient of every A is exactly 0: A stays; every B and the head move.
  assert moved == ['base/classifier/bias', 'base/classifier/kernel',
                   f'peft/{PRE}/intermediate/lora_b', f'peft/{PRE}/output/lora_b',
                   f'peft/{PRE}/router/lora_b']
  grads = tree.flatten(new.opt_state)
  assert all(np.all(np.asarray(grads[p]) == 0) for p in grads if p.endswith('lora_a'))
  # The base (expert kernels, router) is not even an input of the update: bit-identical.
  assert all(np.array_equal(fz[p], tree.flatten(tiny().params)[p]) for p in fz)


def test_expert_lora_merge_equals_implicit():
  b = tiny()
  m, lora, _ = lora_setup()
  leaves, treedef = jax.tree.flatten(lora)
  lora = treedef.unflatten([jnp.asarray(rnd(70 + i, x.shape, 0.1))
                            for i, x in enumerate(leaves)])
  implicit = lora_forward()(b.params, lora)
  merged = m.merge(b.params, lora)
  np.testing.assert_allclose(plain_forward()(merged), implicit, atol=1e-5, rtol=0)
  # The update changes the model (so the agreement above is not trivial).
  assert np.abs(np.asarray(implicit) - np.asarray(plain_forward()(b.params))).max() > 1e-4
  s = 4.0 / R
  fl, fm = tree.flatten(lora), tree.flatten(merged)
  for name in ('intermediate', 'output'):
    w = np.asarray(b.params['encoder']['layer_1']['moe'][name]['kernel'])
    a, bb = np.asarray(fl[f'{PRE}/{name}/lora_a']), np.asarray(fl[f'{PRE}/{name}/lora_b'])
    for e in range(TE):  # W_e + s * A_e B_e, expert by expert
      np.testing.assert_allclose(fm[f'{PRE}/{name}/kernel'][e], w[e] + s * a[e] @ bb[e],
                                 atol=1e-6)
  np.testing.assert_allclose(tree.flatten(m.unmerge(merged, lora))[f'{PRE}/output/kernel'],
                             b.params['encoder']['layer_1']['moe']['output']['kernel'],
                             atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 7. the train step's loss includes the auxiliary losses
# ---------------------------------------------------------------------------------------------

def test_train_step_loss_includes_aux_losses():
  """The step above ran with balance_coef=C1, z_coef=C2; its optimizer kept the gradients.
  They must be those of CE + C1*balance + C2*z, recomputed from ``peft.apply(with_aux=True)``."""
  b = tiny()
  m, _, _ = lora_setup()
  trainable, frozen, state, new, metrics = lora_step()
  batch = tiny_batch()
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)  # the step's rng

  def parts(params):
    """(CE, balance, z, dropped) of the one MoE layer, read off the collection directly."""
    base = tree.combine(frozen, params['base'])
    logits, aux = peft.apply(b.module, m, base, params['peft'], _inputs(), rng=rng,
                             deterministic=False, with_aux=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    layer = aux['encoder']['layer_1']['moe']
    return (ce, layer['balance_loss'][0], layer['z_loss'][0],
            layer['dropped_fraction'][0]), aux

  @jax.jit
  def reference(params):
    out, vjp, aux = jax.vjp(parts, params, has_aux=True)
    one = jnp.ones(())
    g_total = vjp((one, C1 * one, C2 * one, 0 * one))[0]  # d(CE + C1*balance + C2*z)
    g_aux = vjp((0 * one, C1 * one, C2 * one, 0 * one))[0]  # d(C1*balance + C2*z) alone
    return out, aux, g_total, g_aux

  (ce, bal, z, drop), aux, want, want_aux = reference(trainable)
  assert float(metrics['loss']) == pytest.approx(float(ce), rel=1e-5)  # the CE alone
  assert float(metrics['balance_loss']) == pytest.approx(float(bal), rel=1e-5)
  assert float(metrics['z_loss']) == pytest.approx(float(z), rel=1e-5)
  assert float(metrics['dropped_fraction']) == pytest.approx(float(drop), abs=1e-7)
  assert float(bal) > 1.0 and float(z) > 0.0 and float(drop) > 0.0
  # moe.aux_losses on the same collection gives the same weighted sum.
  aux_loss, _ = moe.aux_losses(aux, C1, C2)
  assert float(aux_loss) == pytest.approx(float(C1 * bal + C2 * z), rel=1e-6)
  # The step differentiated CE + C1*balance + C2*z: its gradients are the reference's.
  fg, fw, fa = map(tree.flatten, (new.opt_state, want, want_aux))
  assert sorted(fg) == sorted(fw)
  for p in fw:
    np.testing.assert_allclose(fg[p], fw[p], atol=2e-6, rtol=1e-4, err_msg=p)
  router_b = f'peft/{PRE}/router/lora_b'
  assert np.abs(fa[router_b]).max() > 1e-3  # the aux terms alone move the router: not CE-only
  assert np.abs(fa['base/classifier/kernel']).max() == 0.0  # ... and never the head
  assert float(metrics['grad_norm']) == pytest.approx(float(optax.tree.norm(want)), rel=1e-4)
