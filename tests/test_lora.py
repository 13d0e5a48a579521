"""LoRA on a linen model peftjax did not write: counts, identity at init, merge, gradients, errors."""
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import tinybert
from peftjax import optim
from peftjax import peft
from peftjax import tree


class Foreign(nn.Module):
  """Defined only here: Embed, multi-axis DenseGeneral in and out, and Dense."""

  @nn.compact
  def __call__(self, ids, deterministic: bool = True):
    x = nn.Embed(50, 16, name='tok')(ids)                        # (b, l, 16)
    h = nn.DenseGeneral((4, 8), name='proj')(x)                  # (b, l, 4, 8)
    y = nn.DenseGeneral(16, axis=(-2, -1), name='merge')(jnp.tanh(h))  # (b, l, 16)
    y = nn.LayerNorm(name='norm')(y + x)
    return nn.Dense(5, name='head')(y.mean(1))


ALL = r'(tok/embedding|proj/kernel|merge/kernel|head/kernel)$'


def _cfg(**lora):
  """A ``peft`` section for LoRA; ``lora`` sets fields of ``peft.lora``."""
  base = dict(rank=3, alpha=6.0, rslora=False, dropout=0.0, targets=ALL)
  return ml_collections.ConfigDict({'method': 'lora', 'head': '', 'lora': {**base, **lora}})


@pytest.fixture(scope='module')
def setup():
  model = Foreign()
  ids = jax.random.randint(jax.random.key(1), (3, 7), 0, 50)
  params = model.init(jax.random.key(0), ids)['params']
  return model, params, {'ids': ids}


def _init(setup, **kw):
  model, params, inputs = setup
  method = peft.build(_cfg(**kw))
  return method, method.init(jax.random.key(2), model, params, inputs)


def _randomize(tree_, seed=3):
  leaves, treedef = jax.tree.flatten(tree_)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_shapes_and_exact_count(setup):
  method, lora = _init(setup)
  shapes = jax.tree.map(jnp.shape, lora)
  assert shapes == {'tok': {'lora_a': (50, 3), 'lora_b': (3, 16)},
                    'proj': {'lora_a': (16, 3), 'lora_b': (3, 4, 8)},
                    'merge': {'lora_a': (4, 8, 3), 'lora_b': (3, 16)},
                    'head': {'lora_a': (16, 3), 'lora_b': (3, 5)}}
  r = 3
  assert tree.count(lora) == r * ((50 + 16) + (16 + 32) + (32 + 16) + (16 + 5))
  assert all(np.all(np.asarray(l['lora_b']) == 0) for l in lora.values())


def test_output_unchanged_at_init(setup):
  model, params, inputs = setup
  method, lora = _init(setup)
  base = model.apply({'params': params}, **inputs)
  np.testing.assert_array_equal(peft.apply(model, method, params, lora, inputs), base)


def test_merge_equals_implicit_and_unmerge_inverts(setup):
  model, params, inputs = setup
  method, lora = _init(setup)
  lora = _randomize(lora)
  implicit = peft.apply(model, method, params, lora, inputs)
  merged = method.merge(params, lora)
  assert not np.allclose(implicit, model.apply({'params': params}, **inputs), atol=1e-3)
  np.testing.assert_allclose(model.apply({'params': merged}, **inputs), implicit, atol=1e-5)
  back = method.unmerge(merged, lora)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), back, params)


def test_scale_is_alpha_over_rank(setup):
  model, params, inputs = setup
  m1, lora = _init(setup, alpha=6.0)
  m2, _ = _init(setup, alpha=12.0)
  lora = _randomize(lora)
  base = model.apply({'params': params}, **inputs)
  # Only the head is adapted in a linear position, so doubling alpha doubles its delta.
  cfg = dict(targets=r'head/kernel$')
  m1, l1 = _init(setup, alpha=6.0, **cfg)
  m2, _ = _init(setup, alpha=12.0, **cfg)
  l1 = _randomize(l1)
  d1 = peft.apply(model, m1, params, l1, inputs) - base
  d2 = peft.apply(model, m2, params, l1, inputs) - base
  np.testing.assert_allclose(d2, 2 * d1, rtol=1e-5, atol=1e-6)
  assert m1.scale == 2.0


def _shapes_produced(jaxpr) -> set:
  out = set()
  for eqn in jaxpr.eqns:
    out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, 'shape'))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _shapes_produced(sub)
  return out


def test_update_and_weight_gradient_never_formed(setup):
  model, params, inputs = setup
  method, lora = _init(setup)

  def loss(lora):
    return (peft.apply(model, method, params, lora, inputs) ** 2).sum()

  jaxpr = jax.make_jaxpr(jax.grad(loss))(_randomize(lora)).jaxpr
  produced = _shapes_produced(jaxpr)
  for path in ('tok/embedding', 'proj/kernel', 'merge/kernel', 'head/kernel'):
    shape = tree.flatten(params)[path].shape
    assert shape not in produced, f'a {shape} array (the size of {path}) was computed'


def test_gradients_only_for_trainable_and_zero_for_frozen(setup):
  model, params, inputs = setup
  method, lora = _init(setup, targets=r'proj/kernel$')
  lora = _randomize(lora)
  full = {'base': params, 'lora': lora}

  def loss(full):
    return (peft.apply(model, method, full['base'], full['lora'], inputs) ** 2).sum()

  grads = jax.grad(loss)(full)
  tx = optim.masked(optax.adam(1e-2), full, r'^lora/')
  updates, state = tx.update(grads, tx.init(full), full)
  for p, u in tree.flatten(updates).items():
    if p.startswith('base/'):
      assert np.all(np.asarray(u) == 0), p
    else:
      assert np.any(np.asarray(u) != 0), p
  # Adam state exists for the LoRA leaves only (frozen leaves hold empty MaskedNodes).
  mu = state.inner_states['trainable'].inner_state[0].mu
  assert tree.count(mu) == tree.count(lora)
  assert grads['lora']['proj']['lora_a'].shape == (16, 3)


def test_dropout_only_in_training(setup):
  model, params, inputs = setup
  method, lora = _init(setup, dropout=0.5)
  lora = _randomize(lora)
  ev1 = peft.apply(model, method, params, lora, inputs)
  ev2 = peft.apply(model, method, params, lora, inputs)
  np.testing.assert_array_equal(ev1, ev2)
  tr = peft.apply(model, method, params, lora, inputs, rng=jax.random.key(0), deterministic=False)
  assert not np.allclose(tr, ev1, atol=1e-4)


def test_target_matching_nothing_lists_closest_paths(setup):
  with pytest.raises(ValueError, match=r"matches no parameter; closest weight paths: \[.*proj/kernel"):
    _init(setup, targets=r'projj/kernel$')


def test_unsupported_leaf_is_an_error(setup):
  with pytest.raises(ValueError, match='LoRA cannot handle'):
    _init(setup, targets=r'norm/scale$')


@pytest.mark.parametrize('rank', [0, 6])
def test_bad_rank(setup, rank):
  # head kernel is 16 x 5: rank 6 > min(16, 5).
  with pytest.raises(ValueError, match=r'peft.lora.rank=' + str(rank)):
    _init(setup, rank=rank, targets=r'head/kernel$' if rank else ALL)


def test_logical_specs_follow_adapted_weight(setup):
  model, params, inputs = setup
  method, lora = _init(setup)
  base_specs = tree.map_with_path(
      lambda p, x: jax.sharding.PartitionSpec(*(f'{p.split("/")[0]}{i}' for i in range(x.ndim))),
      params)
  specs = method.logical_specs(base_specs, lora)
  assert tuple(specs['merge']['lora_a']) == ('merge0', 'merge1', None)
  assert tuple(specs['merge']['lora_b']) == (None, 'merge2')
  assert tuple(specs['proj']['lora_b']) == (None, 'proj1', 'proj2')


def test_minilm_quickstart_count(minilm):
  from peftjax.models import BertClassifier
  cfg, enc = minilm
  model = BertClassifier(cfg, num_classes=2)
  ids = jnp.ones((2, 8), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), ids, ids)['params']
  params = nn.meta.unbox(params)
  method = peft.build(_cfg(rank=8, alpha=16.0, targets=r'attention/(query|value)/kernel$'))
  lora = jax.eval_shape(lambda: method.init(jax.random.key(0), model, params,
                                            {'input_ids': ids, 'attention_mask': ids}))
  assert tree.count(lora) == 6 * 2 * (384 * 8 + 8 * 384)  # 73,728


def test_rslora_scale_is_alpha_over_sqrt_rank(setup):
  model, params, inputs = setup
  cfg = dict(targets=r'head/kernel$', rank=4, alpha=8.0)
  plain, lora = _init(setup, **cfg)
  rs, _ = _init(setup, rslora=True, **cfg)
  assert plain.scale == 2.0 and rs.scale == 4.0  # 8 / 4 and 8 / sqrt(4)
  lora = _randomize(lora)
  base = model.apply({'params': params}, **inputs)
  np.testing.assert_allclose(peft.apply(model, rs, params, lora, inputs) - base,
                             2.0 * (peft.apply(model, plain, params, lora, inputs) - base),
                             rtol=1e-5, atol=1e-6)


class NoModeArg(nn.Module):
  """A model whose __call__ takes no `deterministic` (as many models written elsewhere)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name='out')(jnp.tanh(nn.Dense(8, name='hidden')(x)))


def test_apply_runs_a_model_without_a_deterministic_argument():
  model = NoModeArg()
  x = jax.random.normal(jax.random.key(3), (2, 5))
  params = model.init(jax.random.key(0), x)['params']
  assert not peft.takes_deterministic(model) and peft.takes_deterministic(Foreign())
  method = peft.build(_cfg(targets=r'(hidden|out)/kernel$', dropout=0.0))
  lora = method.init(jax.random.key(1), model, params, {'x': x})
  lora = jax.tree.map(lambda v: v + 0.1, lora)  # B != 0, so the adapter changes the output
  want = model.apply({'params': method.merge(params, lora)}, x)
  for deterministic in (True, False):
    got = peft.apply(model, method, params, lora, {'x': x}, rng=jax.random.key(2),
                     deterministic=deterministic)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(want, model.apply({'params': params}, x), atol=1e-3)


# ------------------------------------------------------------------ pure methods
def _two_models():
  """``(module, params, inputs)`` of the tiny BERT and of a two-layer MLP (no `deterministic`)."""
  b = tinybert.built()
  mlp, x = NoModeArg(), jax.random.normal(jax.random.key(3), (2, 5))
  return [(b.module, b.params, tinybert.inputs()),
          (mlp, mlp.init(jax.random.key(0), x)['params'], {'x': x})]


@pytest.mark.parametrize('name,kw', [
    ('lora', dict(targets=r'kernel$', rank=2)),
    ('pissa', dict(targets=r'kernel$', rank=2)),
    ('dora', dict(targets=r'kernel$', rank=2)),
    ('ia3', dict(targets=r'(out|key)$', ffn_targets=r'(hidden|output)$')),
    ('adapter', dict(kind='pfeiffer', ffn_targets=r'(out|output)$', size=3)),
])
def test_one_method_object_initialises_two_models(name, kw):
  """The object holds only its config: what init finds lives in what it returns."""
  shared, _ = tinybert.method(name, **kw)
  models = _two_models()
  # Both inits first: the second model must not disturb the first one's method.
  trees = [_randomize(shared.init(jax.random.key(1), m, p, i)) for m, p, i in models]
  assert set(vars(shared)) == {'cfg'}
  for (module, params, inputs), t in zip(models, trees):
    fresh, _ = tinybert.method(name, **kw)
    _assert_same(fresh.init(jax.random.key(1), module, params, inputs),
                 shared.init(jax.random.key(1), module, params, inputs))
    base = shared.prepare_base(params, t)
    _assert_same(base, fresh.prepare_base(params, t))
    want = peft.apply(module, fresh, base, t, inputs)
    np.testing.assert_array_equal(peft.apply(module, shared, base, t, inputs), want)
    assert not np.allclose(want, module.apply({'params': base}, **inputs), atol=1e-4)
    if name != 'adapter':  # mergeable: the merge follows the tree too
      np.testing.assert_allclose(module.apply({'params': shared.merge(base, t)}, **inputs), want,
                                 rtol=1e-4, atol=1e-4)  # float rounding of large random updates


def _assert_same(a, b):
  fa, fb = tree.flatten(a), tree.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
