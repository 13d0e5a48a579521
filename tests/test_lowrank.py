"""Low-rank factorization: exact at full rank, Eckart-Young truncated, two matmuls, trainable."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tinybert
from peftjax import tree
from peftjax.compress import lowrank
from peftjax.errors import UserInputError
from peftjax.models.vision import MLP

ENCODER = r'encoder/.*/(query|key|value|out|intermediate|output)/kernel$'
# (in axes, out axes) of the tiny BERT kernels: D=16, F=32, 2 heads of 8.
SHAPES = {'query': ((16,), (2, 8)), 'key': ((16,), (2, 8)), 'value': ((16,), (2, 8)),
          'out': ((2, 8), (16,)), 'intermediate': ((16,), (32,)), 'output': ((32,), (16,))}


def _bert():
  b = tinybert.built()
  return b.module, b.params, tinybert.inputs()


@functools.cache
def _forwards():
  """Jitted (plain, factored) BERT forwards: one compile per tree structure, not per op."""
  module, _, inputs = _bert()
  plain = jax.jit(lambda p: module.apply({'params': p}, **inputs))
  return plain, jax.jit(lambda p: lowrank.apply(module, p, inputs))


def _bert_loss(p):
  module, _, inputs = _bert()
  logits = lowrank.apply(module, p, inputs)
  return optax.softmax_cross_entropy_with_integer_labels(logits, tinybert.batch()['label']).mean()


@functools.cache
def _rank4():
  return lowrank.factorize(_bert()[1], targets=ENCODER, rank=4)


@functools.cache
def _mlp():
  """MLP 64 -> 24 -> 10 on 3 images of 8x8 (batch 3 so no activation is kernel-shaped)."""
  model = MLP(hidden=(24,), num_classes=10)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8, 8, 1)), jnp.float32)
  # The model's own layout with numpy values (cheaper than compiling init); nonzero biases so
  # the factored layers' bias is checked too.
  shapes = jax.eval_shape(model.init, jax.random.key(1), images)['params']
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) / np.sqrt(x.shape[0]),
                                              jnp.float32), nn.meta.unbox(shapes))
  return model, params, images, jnp.array([1, 4, 7])


def _kind(path):
  return path.split('/')[-2]


def _flat2d(w, kind):
  n_in = len(SHAPES[kind][0])
  w = np.asarray(w, np.float64)
  return w.reshape(int(np.prod(w.shape[:n_in])), -1)


def _best_rank_r(w2, r):
  u, s, vt = np.linalg.svd(w2, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vt[:r], s


def _product(f, layer):
  u, v = f[f'{layer}/kernel_u'], f[f'{layer}/kernel_v']
  r = u.shape[-1]
  return np.asarray(u, np.float64).reshape(-1, r) @ np.asarray(v, np.float64).reshape(r, -1)


def _eqns(jaxpr):
  """Every equation of a jaxpr, recursing into sub-jaxprs (pjit, remat, custom_vjp...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for val in eqn.params.values():
      for sub in val if isinstance(val, (list, tuple)) else (val,):
        if hasattr(sub, 'eqns'):
          yield from _eqns(sub)
        elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
          yield from _eqns(sub.jaxpr)


def _out_shapes(closed):
  return {tuple(v.aval.shape) for e in _eqns(closed.jaxpr) for v in e.outvars}


# ----------------------------------------------------------------------------- exactness


def test_full_rank_keeps_logits_and_unfactorize_restores_kernels():
  _, params, _ = _bert()
  # energy=1.0 keeps every nonzero singular value: full rank, whatever each kernel's shape.
  f = lowrank.factorize(params, targets=r'kernel$', energy=1.0)
  flat = tree.flatten(f)
  assert not [p for p in flat if p.endswith('/kernel')]
  assert flat['encoder/layer_0/attention/query/kernel_u'].shape == (16, 16)
  assert flat['encoder/layer_0/attention/query/kernel_v'].shape == (16, 2, 8)
  assert flat['encoder/layer_0/attention/out/kernel_u'].shape == (2, 8, 16)
  assert flat['encoder/layer_0/attention/out/kernel_v'].shape == (16, 16)
  assert flat['classifier/kernel_u'].shape == (16, 3)
  assert flat['classifier/kernel_v'].shape == (3, 3)
  plain, factored = _forwards()
  ref = plain(params)
  np.testing.assert_allclose(factored(f), ref, atol=1e-5)

  back = jax.jit(lowrank.unfactorize)(f)  # jittable: one program, not one per kernel
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for p, w in tree.flatten(params).items():
    np.testing.assert_allclose(tree.flatten(back)[p], w, atol=1e-6, err_msg=p)
  np.testing.assert_allclose(plain(back), ref, atol=1e-5)


def test_truncated_factors_are_the_best_rank_r_approximation():
  _, params, _ = _bert()
  f = _rank4()
  flat, orig, w_rs = tree.flatten(f), tree.flatten(params), {}
  layers = [p[:-len('/kernel')] for p in tree.select(params, ENCODER)]
  assert len(layers) == 12
  for layer in layers:
    kind = _kind(layer + '/kernel')
    ins, outs = SHAPES[kind]
    u, v = flat[f'{layer}/kernel_u'], flat[f'{layer}/kernel_v']
    assert u.shape == (*ins, 4) and v.shape == (4, *outs), layer
    w_r, s = _best_rank_r(_flat2d(orig[f'{layer}/kernel'], kind), 4)
    np.testing.assert_allclose(_product(flat, layer), w_r, atol=1e-6, err_msg=layer)
    w_rs[f'{layer}/kernel'] = jnp.asarray(w_r.reshape(*ins, *outs), jnp.float32)
    # Balanced split: U's column norms and V's row norms are both sqrt(S_r).
    u2, v2 = np.asarray(u).reshape(-1, 4), np.asarray(v).reshape(4, -1)
    np.testing.assert_allclose(np.linalg.norm(u2, axis=0), np.sqrt(s[:4]), rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v2, axis=1), np.sqrt(s[:4]), rtol=1e-5)
  # x·U·V is x·W_r: the factored model equals the plain model with numpy's rank-4 kernels.
  plain, factored = _forwards()
  dense = plain(tree.unflatten({**orig, **w_rs}))
  np.testing.assert_allclose(factored(f), dense, atol=1e-5)
  assert not np.allclose(dense, plain(params), atol=1e-4)  # rank 4 of 16 does change the model


@pytest.mark.parametrize('energy', [0.5, 0.9])
def test_energy_picks_the_minimal_rank(energy):
  _, params, _ = _bert()
  f = lowrank.factorize(params, targets=ENCODER, energy=energy)
  rep = lowrank.report(params, f)
  ranks = set()
  for path in tree.select(params, ENCODER):
    s = np.linalg.svd(_flat2d(tree.flatten(params)[path], _kind(path)), compute_uv=False)
    kept = np.cumsum(s ** 2) / np.sum(s ** 2)
    r = rep['kernels'][path]['rank']
    assert kept[r - 1] >= energy and (r == 1 or kept[r - 2] < energy), (path, r, kept)
    assert tree.flatten(f)[path + '_u'].shape[-1] == r
    np.testing.assert_allclose(rep['kernels'][path]['energy'], kept[r - 1], rtol=1e-5)
    ranks.add(r)
  assert len(ranks) > 1  # chosen per kernel, not one rank for all


# ----------------------------------------------------------------------------- a smaller model


def test_exact_parameter_counts_and_report():
  _, params, _ = _bert()
  f = _rank4()
  # Per layer: q, k, v, out 16x16 -> 4·(16+16) saves 4·128; intermediate 16x32 and output
  # 32x16 -> 4·48 save 2·320. Two layers.
  assert tree.count(f) == tree.count(params) - 2 * (4 * 128 + 2 * 320)
  rep = lowrank.report(params, f)
  assert rep['params_before'] == tree.count(params) and rep['params_after'] == tree.count(f)
  assert rep['params_saved'] == 2304
  assert rep['flops_before'] == 2 * 2 * (4 * 256 + 2 * 512)
  assert rep['flops_after'] == 2 * 2 * (4 * 128 + 2 * 4 * 48)
  path = 'encoder/layer_1/attention/query/kernel'
  s = np.linalg.svd(_flat2d(tree.flatten(params)[path], 'query'), compute_uv=False)
  assert rep['kernels'][path] == {
      'shape': (16, 2, 8), 'shape_2d': (16, 16), 'rank': 4, 'max_rank': 16,
      'params_before': 256, 'params_after': 128, 'flops_before': 512, 'flops_after': 256,
      'energy': pytest.approx(np.sum(s[:4] ** 2) / np.sum(s ** 2), rel=1e-5)}
  text = lowrank.format_report(rep)
  assert 'encoder/layer_1/attention/query/kernel' in text and 'saved 2,304' in text

  _, mparams, _, _ = _mlp()
  assert tree.count(mparams) == 64 * 24 + 24 + 24 * 10 + 10
  small = lowrank.factorize(mparams, targets=r'kernel$', rank=4)
  assert tree.count(small) == 4 * (64 + 24) + 24 + 4 * (24 + 10) + 10
  assert lowrank.factored_paths(small) == ['classifier', 'dense_0']


def test_forward_is_two_matmuls_and_never_forms_u_v():
  model, params, images, labels = _mlp()
  small = lowrank.factorize(params, targets=r'kernel$', rank=4)
  fwd = lambda p: lowrank.apply(model, p, images)
  closed = jax.make_jaxpr(fwd)(small)
  dots = [e for e in _eqns(closed.jaxpr) if e.primitive.name == 'dot_general']
  assert len(dots) == 4  # (x·U)·V in each of the two layers
  kernels = {(64, 24), (24, 10)}
  assert not kernels & _out_shapes(closed)
  # Nor in the backward: dL/dU = xᵀ·(g·Vᵀ), dL/dV = (x·U)ᵀ·g.
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(fwd(p), labels).mean()
  assert not kernels & _out_shapes(jax.make_jaxpr(jax.grad(loss))(small))
  # The same on BERT, through remat, custom_vjp and the DenseGeneral attention projections.
  # (Traced, not compiled: a BERT backward costs seconds to compile; the MLP test below checks
  # gradient values.)
  f = _rank4()
  kernels = {(16, 2, 8), (2, 8, 16), (16, 16), (16, 32), (32, 16)}
  module, _, inputs = _bert()
  assert not kernels & _out_shapes(jax.make_jaxpr(lambda p: lowrank.apply(module, p, inputs))(f))
  grad_jaxpr = jax.make_jaxpr(jax.grad(_bert_loss))(f)
  # (16, 16) is also the position-embedding gradient (max_position 16 x hidden 16).
  assert not (kernels - {(16, 16)}) & _out_shapes(grad_jaxpr)
  grad_shapes = [tuple(v.aval.shape) for v in grad_jaxpr.jaxpr.outvars]
  assert grad_shapes == [tuple(x.shape) for x in jax.tree.leaves(f)]  # a gradient per factor


# ----------------------------------------------------------------------------- training


def test_gradients_flow_to_the_factors_and_full_fine_tuning_trains_them():
  model, params, images, labels = _mlp()
  small = lowrank.factorize(params, targets=r'kernel$', rank=4)

  def loss(p):
    logits = lowrank.apply(model, p, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def reference(p):  # the factored MLP written out by hand
    d, c = p['dense_0'], p['classifier']
    h = jax.nn.relu(images.reshape(3, -1) @ d['kernel_u'] @ d['kernel_v'] + d['bias'])
    logits = h @ c['kernel_u'] @ c['kernel_v'] + c['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  # Full fine-tuning of the factored model: the factors are ordinary parameters. The one
  # compiled step also returns the loss and gradients at its input, used for the checks below.
  tx = optax.adam(1e-2)

  @jax.jit
  def train_step(p, opt_state):
    value, g = jax.value_and_grad(loss)(p)
    updates, opt_state = tx.update(g, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, value, g

  opt_state = tx.init(small)
  _, _, _, grads = train_step(small, opt_state)
  ref = jax.jit(jax.grad(reference))(small)
  for p, g in tree.flatten(grads).items():
    assert float(jnp.abs(g).max()) > 0, p
    np.testing.assert_allclose(g, tree.flatten(ref)[p], atol=1e-6, err_msg=p)
  # Central finite difference along a random unit direction in the classifier's factors (past
  # the ReLU, so the loss is smooth there and the O(eps^2) error is tiny).
  rng = np.random.default_rng(0)
  du = rng.normal(size=small['classifier']['kernel_u'].shape).astype(np.float32)
  dv = rng.normal(size=small['classifier']['kernel_v'].shape).astype(np.float32)
  norm = np.sqrt(np.sum(du ** 2) + np.sum(dv ** 2))
  du, dv = du / norm, dv / norm
  eps = 1e-2
  loss_at = lambda t: float(train_step({**small, 'classifier': {
      **small['classifier'], 'kernel_u': small['classifier']['kernel_u'] + t * du,
      'kernel_v': small['classifier']['kernel_v'] + t * dv}}, opt_state)[2])
  fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
  g = grads['classifier']
  analytic = float(np.vdot(g['kernel_u'], du) + np.vdot(g['kernel_v'], dv))
  assert abs(analytic) > 1e-3
  np.testing.assert_allclose(fd, analytic, rtol=1e-3)

  p, losses = small, []
  for _ in range(5):
    p, opt_state, value, _ = train_step(p, opt_state)
    losses.append(float(value))
  assert losses[-1] < losses[0]
  assert tinybert.moved(small, p) == sorted(tree.paths(small))
  assert jax.tree.structure(p) == jax.tree.structure(small)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('kwargs, match', [
    (dict(targets=r'layer_0/intermediate/kernel$', rank=17),
     r"rank=17 is invalid for encoder/layer_0/intermediate/kernel: its 2-D \(in, out\) shape "
     r"is \(16, 32\).*valid: 1\.\.16"),
    (dict(targets=r'attention/query/kernel$', rank=17),
     r'encoder/layer_0/attention/query/kernel.*\(16, 16\) \(kernel \(16, 2, 8\)\).*1\.\.16'),
    (dict(targets=ENCODER, rank=0), r'rank=0 is invalid; valid: an integer >= 1'),
    (dict(targets=ENCODER, rank=-2), r'rank=-2 is invalid'),
    (dict(targets=ENCODER, rank=2.0), r'rank=2\.0 is invalid'),
    (dict(targets=ENCODER, energy=0.0), r'energy=0\.0 is invalid; valid: a float in \(0, 1\]'),
    (dict(targets=ENCODER, energy=1.5), r'energy=1\.5 is invalid'),
    (dict(targets=ENCODER, energy=float('nan')), r'energy=nan is invalid'),
    (dict(targets=ENCODER, rank=4, energy=0.9), r'exactly one of rank= and energy='),
    (dict(targets=ENCODER), r'exactly one of rank= and energy='),
    (dict(targets=r'encoder/.*/quary/kernel$', rank=2),
     r"matches no parameter; closest kernel paths: \[.*'encoder/layer_\d/attention/query/"
     r"kernel'"),
    (dict(targets=r'attention_norm/scale$', rank=2),
     r"matches \['encoder/layer_0/attention_norm/scale'.*cannot handle.*'kernel'"),
    (dict(targets=r'word_embeddings/embedding$', rank=2), r'cannot handle'),
    (dict(targets=r'layer_0/output/(kernel|bias)$', rank=2),
     r"matches \['encoder/layer_0/output/bias'\]"),
    (dict(targets=r'query/kernel$', rank=2, out_axes={'query': 3}),
     r"out_axes\['query'\]=3 is invalid for encoder/layer_0/attention/query/kernel with shape "
     r'\(16, 2, 8\); valid: an integer in 1\.\.2'),
])
def test_factorize_rejects_bad_input(kwargs, match):
  _, params, _ = _bert()
  with pytest.raises(UserInputError, match=match):
    lowrank.factorize(params, **kwargs)


def test_scope_rejects_factors_that_do_not_fit_the_layer():
  module, params, inputs = _bert()
  # One output axis for a (embed, heads, kv) kernel: factors (16, 2, r) / (r, 8), which the
  # DenseGeneral (contracting only embed) cannot use; a clear error, not a shape crash.
  f = lowrank.factorize(params, targets=r'layer_0/attention/query/kernel$', rank=4,
                        out_axes={'query': 1})
  assert tree.flatten(f)['encoder/layer_0/attention/query/kernel_u'].shape == (16, 2, 4)
  with pytest.raises(UserInputError, match=r'encoder/layer_0/attention/query: factors .*'
                                           r'out_axes override giving this kernel 2 output'):
    _forwards()[1](f)  # raised while tracing: nothing compiles

  model, mparams, images, _ = _mlp()
  small = lowrank.factorize(mparams, targets=r'kernel$', rank=4)
  trace = lambda p, paths: jax.make_jaxpr(
      lambda p: lowrank.apply(model, p, images, paths=paths))(p)
  with pytest.raises(UserInputError, match=r'classifier: holds low-rank factors but is not in '):
    trace(small, ['dense_0'])
  only = lowrank.factorize(mparams, targets=r'dense_0/kernel$', rank=4)
  with pytest.raises(UserInputError, match=r'classifier: is in scope\(paths\) but'):
    trace(only, ['dense_0', 'classifier'])
  trace(only, ['dense_0'])  # the right paths: runs
