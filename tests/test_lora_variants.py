"""PiSSA and DoRA: exact counts, identity at init, merge == implicit, SVD init, gradients."""
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tinybert
from peftjax import peft
from peftjax import tree
from peftjax.errors import ConfigError
from peftjax.peft import lora_variants


class Foreign(nn.Module):
  """Embed, multi-axis DenseGeneral in and out, a bias-free Dense, and a Dense head."""

  @nn.compact
  def __call__(self, ids, deterministic: bool = True):
    x = nn.Embed(50, 16, name='tok')(ids)                              # (b, l, 16)
    h = nn.DenseGeneral((4, 8), name='proj')(x)                        # (b, l, 4, 8)
    y = nn.DenseGeneral(16, axis=(-2, -1), name='merge')(jnp.tanh(h))  # (b, l, 16)
    y = nn.Dense(16, use_bias=False, name='nobias')(jnp.tanh(y))       # (b, l, 16)
    y = nn.LayerNorm(name='norm')(y + x)
    return nn.Dense(5, name='head')(y.mean(1))


DENSE = r'(proj/kernel|merge/kernel|nobias/kernel|head/kernel)$'
ALL = r'(tok/embedding|proj/kernel|merge/kernel|nobias/kernel|head/kernel)$'
LORA_COUNT = 3 * ((50 + 16) + (16 + 32) + (32 + 16) + (16 + 16) + (16 + 5))


def _cfg(method, **lora):
  """A ``peft`` section for ``method``; ``lora`` sets fields of ``peft.lora``."""
  base = dict(rank=3, alpha=6.0, rslora=False, dropout=0.0, targets=ALL)
  return ml_collections.ConfigDict({'method': method, 'head': '', 'lora': {**base, **lora}})


@pytest.fixture(scope='module')
def setup():
  model = Foreign()
  ids = jax.random.randint(jax.random.key(1), (3, 7), 0, 50)
  params = model.init(jax.random.key(0), ids)['params']
  # Flax's default bias init is zero; random biases make the bias handling observable.
  params = tree.map_with_path(
      lambda p, x: 0.5 * jax.random.normal(jax.random.key(len(p)), x.shape)
      if p.endswith('bias') else x, params)
  return model, params, {'ids': ids}


def _init(setup, method, **kw):
  model, params, inputs = setup
  m = peft.build(_cfg(method, **kw))
  return m, m.init(jax.random.key(2), model, params, inputs)


def _randomize(tree_, seed=3):
  leaves, treedef = jax.tree.flatten(tree_)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _assert_trees_close(a, b, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol, rtol=0), a, b)


def _shapes_produced(jaxpr) -> set:
  out = set()
  for eqn in jaxpr.eqns:
    out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, 'shape'))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      out |= _shapes_produced(sub)
  return out


# --- PiSSA ------------------------------------------------------------------------------------

def test_pissa_count_equals_lora(setup):
  _, lora = _init(setup, 'lora')
  _, pissa = _init(setup, 'pissa')
  assert jax.tree.map(jnp.shape, pissa) == jax.tree.map(jnp.shape, lora)
  assert tree.count(pissa) == tree.count(lora) == LORA_COUNT


def test_pissa_output_unchanged_at_init(setup):
  model, params, inputs = setup
  method, pissa = _init(setup, 'pissa')
  residual = method.prepare_base(params, pissa)
  # The residual alone is a different model; residual + principal part is the original.
  original = model.apply({'params': params}, **inputs)
  assert not np.allclose(model.apply({'params': residual}, **inputs), original, atol=1e-2)
  np.testing.assert_allclose(peft.apply(model, method, residual, pissa, inputs), original,
                             atol=1e-5, rtol=0)


def test_pissa_update_is_rank_r_svd_truncation(setup):
  _, params, _ = setup
  for alpha in (6.0, 12.0):  # the principal part does not depend on the LoRA scale
    method, pissa = _init(setup, 'pissa', alpha=alpha)
    flat, lp = tree.flatten(params), tree.flatten(pissa)
    for site in method.sites(params, pissa):
      w = np.asarray(flat[site.weight_path], np.float64).reshape(site.d_in, site.d_out)
      u, s, vt = np.linalg.svd(w, full_matrices=False)
      truncated = (u[:, :3] * s[:3]) @ vt[:3]
      a = np.asarray(lp[f'{site.path}/lora_a']).reshape(site.d_in, 3)
      b = np.asarray(lp[f'{site.path}/lora_b']).reshape(3, site.d_out)
      np.testing.assert_allclose(method.scale * a @ b, truncated, atol=1e-4, rtol=0)
      # A and B share the singular values sqrt(S_r / s): balanced factors.
      np.testing.assert_allclose(np.linalg.svd(a, compute_uv=False),
                                 np.sqrt(s[:3] / method.scale), rtol=1e-4)
      np.testing.assert_allclose(np.linalg.svd(b, compute_uv=False),
                                 np.sqrt(s[:3] / method.scale), rtol=1e-4)


def test_pissa_merge_of_prepared_base_is_original(setup):
  model, params, inputs = setup
  method, pissa = _init(setup, 'pissa')
  residual = method.prepare_base(params, pissa)
  _assert_trees_close(method.merge(residual, pissa), params, atol=1e-5)
  # After training (random A, B) merge still equals the implicit forward.
  trained = _randomize(pissa)
  np.testing.assert_allclose(
      model.apply({'params': method.merge(residual, trained)}, **inputs),
      peft.apply(model, method, residual, trained, inputs), atol=1e-5, rtol=0)


def test_pissa_minilm_layer_unchanged_at_init(minilm):
  from peftjax.models import BertEncoder
  cfg, enc = minilm
  enc = jax.tree.map(jnp.asarray, enc)
  model = BertEncoder(cfg)
  ids = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
  inputs = {'input_ids': ids, 'attention_mask': jnp.ones_like(ids)}
  method = peft.build(_cfg('pissa', rank=8, alpha=16.0,
                           targets=r'layer_0/(attention/(query|value)|intermediate)/kernel$'))
  pissa = method.init(jax.random.key(0), model, enc, inputs)
  assert tree.count(pissa) == 2 * 8 * (384 + 384) + 8 * (384 + 1536)
  residual = method.prepare_base(enc, pissa)
  np.testing.assert_allclose(peft.apply(model, method, residual, pissa, inputs),
                             model.apply({'params': enc}, **inputs), atol=1e-5, rtol=0)


def test_pissa_jitted_step_on_tiny_bert():
  method, pissa, c = tinybert.init('pissa')
  b = tinybert.built()
  residual = method.prepare_base(b.params, pissa)
  np.testing.assert_allclose(
      peft.apply(b.module, method, residual, pissa, tinybert.inputs()),
      b.module.apply({'params': b.params}, **tinybert.inputs()), atol=1e-5, rtol=0)
  (before, after), _ = tinybert.steps(method, pissa, c, weight_decay=0.0, base=residual)
  # Unlike LoRA, B != 0 at init, so A has a gradient and moves at step 1 too.
  assert tinybert.moved(before, after) == sorted(tree.flatten(before))
  assert any(p.endswith('lora_a') for p in tree.flatten(before))


# --- DoRA -------------------------------------------------------------------------------------

def test_dora_shapes_and_exact_count(setup):
  _, dora = _init(setup, 'dora', targets=DENSE)
  shapes = jax.tree.map(jnp.shape, dora)
  assert shapes['proj'] == {'lora_a': (16, 3), 'lora_b': (3, 4, 8), 'magnitude': (4, 8)}
  assert shapes['merge'] == {'lora_a': (4, 8, 3), 'lora_b': (3, 16), 'magnitude': (16,)}
  lora_count = LORA_COUNT - 3 * (50 + 16)  # no embedding
  assert tree.count(dora) == lora_count + (32 + 16 + 16 + 5)


def test_dora_magnitude_is_column_norm_and_output_unchanged_at_init(setup):
  model, params, inputs = setup
  method, dora = _init(setup, 'dora', targets=DENSE)
  np.testing.assert_allclose(dora['proj']['magnitude'],
                             np.linalg.norm(params['proj']['kernel'], axis=0), rtol=1e-6)
  np.testing.assert_allclose(peft.apply(model, method, params, dora, inputs),
                             model.apply({'params': params}, **inputs), atol=1e-6, rtol=0)


def test_dora_factored_norm_equals_explicit(setup):
  _, params, _ = setup
  method, dora = _init(setup, 'dora', targets=DENSE)
  dora = _randomize(dora)
  flat, lp = tree.flatten(params), tree.flatten(dora)
  for s in method.sites(params, dora):
    w = flat[s.weight_path]
    a, b = lp[f'{s.path}/lora_a'], lp[f'{s.path}/lora_b']
    v = np.asarray(w).reshape(s.d_in, s.d_out) + method.scale * (
        np.asarray(a).reshape(s.d_in, -1) @ np.asarray(b).reshape(-1, s.d_out))
    np.testing.assert_allclose(lora_variants.column_norm(s, w, a, b, method.scale),
                               np.linalg.norm(v, axis=0).reshape(s.out_shape), rtol=1e-5)


def test_dora_merge_equals_implicit(setup):
  model, params, inputs = setup
  method, dora = _init(setup, 'dora', targets=DENSE)
  dora = _randomize(dora)
  implicit = peft.apply(model, method, params, dora, inputs)
  assert not np.allclose(implicit, model.apply({'params': params}, **inputs), atol=1e-3)
  np.testing.assert_allclose(model.apply({'params': method.merge(params, dora)}, **inputs),
                             implicit, atol=1e-5, rtol=0)
  with pytest.raises(NotImplementedError):
    method.unmerge(params, dora)


def test_dora_gradient_treats_norm_as_constant(setup):
  """The gradient equals that of the merged weight with ||W + sAB||_c held constant."""
  model, params, inputs = setup
  method, dora = _init(setup, 'dora', targets=r'(proj|head)/kernel$')
  dora = _randomize(dora)
  sites = {s.path: s for s in method.sites(params, dora)}

  def implicit(p):
    return (peft.apply(model, method, params, p, inputs) ** 2).sum()

  def merged_const_norm(p):
    flat = tree.flatten(params)
    for path, s in sites.items():
      a, b, m = p[path]['lora_a'], p[path]['lora_b'], p[path]['magnitude']
      v = flat[s.weight_path] + method.scale * (
          a.reshape(s.d_in, -1) @ b.reshape(-1, s.d_out)).reshape(*s.in_shape, *s.out_shape)
      norm = jax.lax.stop_gradient(jnp.sqrt((v ** 2).sum(axis=tuple(range(len(s.in_shape))))))
      flat[s.weight_path] = m * v / norm
    return (model.apply({'params': tree.unflatten(flat)}, **inputs) ** 2).sum()

  _assert_trees_close(jax.grad(implicit)(dora), jax.grad(merged_const_norm)(dora), atol=1e-4)


def test_dora_never_forms_a_weight_sized_array(setup):
  model, params, inputs = setup
  method, dora = _init(setup, 'dora', targets=r'(proj|merge|head)/kernel$')

  def loss(p):
    return (peft.apply(model, method, params, p, inputs) ** 2).sum()

  produced = _shapes_produced(jax.make_jaxpr(jax.grad(loss))(_randomize(dora)).jaxpr)
  for path in ('proj/kernel', 'merge/kernel', 'head/kernel'):
    s = next(s for s in method.sites(params, dora) if s.weight_path == path)
    for shape in (tree.flatten(params)[path].shape, (s.d_in, s.d_out)):
      assert shape not in produced, f'a {shape} array (the size of {path}) was computed'


def test_dora_rejects_embedding_targets(setup):
  with pytest.raises(ConfigError, match=r"DoRA adapts nn.Dense.*tok/embedding|tok/embedding.*DoRA"):
    _init(setup, 'dora', targets=ALL)


def test_dora_logical_specs(setup):
  _, params, _ = setup
  method, dora = _init(setup, 'dora', targets=DENSE)
  base_specs = tree.map_with_path(
      lambda p, x: jax.sharding.PartitionSpec(*(f'{p.split("/")[0]}{i}' for i in range(x.ndim))),
      params)
  specs = method.logical_specs(base_specs, dora)
  assert tuple(specs['proj']['magnitude']) == ('proj1', 'proj2')
  assert tuple(specs['proj']['lora_b']) == (None, 'proj1', 'proj2')
  assert tuple(specs['merge']['magnitude']) == ('merge2',)


def test_dora_jitted_step_on_tiny_bert():
  method, dora, c = tinybert.init('dora')
  b = tinybert.built()
  np.testing.assert_allclose(
      peft.apply(b.module, method, b.params, dora, tinybert.inputs()),
      b.module.apply({'params': b.params}, **tinybert.inputs()), atol=1e-6, rtol=0)
  # No decay: decay alone would move A while its gradient is zero.
  (before, after), state = tinybert.steps(method, dora, c, weight_decay=0.0)
  # B, the magnitudes and the head move; A's gradient is zero while B is still zero.
  moved = tinybert.moved(before, after)
  assert moved == sorted(p for p in tree.flatten(before) if not p.endswith('lora_a'))
  assert any(p.endswith('magnitude') for p in moved)
  float_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert float_state == 2 * tree.count(before)


def test_dora_dropout_only_in_training(setup):
  model, params, inputs = setup
  method, dora = _init(setup, 'dora', targets=DENSE, dropout=0.5)
  dora = _randomize(dora)
  ev = peft.apply(model, method, params, dora, inputs)
  np.testing.assert_array_equal(ev, peft.apply(model, method, params, dora, inputs))
  tr = peft.apply(model, method, params, dora, inputs, rng=jax.random.key(0), deterministic=False)
  assert not np.allclose(tr, ev, atol=1e-4)
