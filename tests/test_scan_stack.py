"""Methods on an ``nn.scan``-stacked model: per-layer parameters, equal to the unrolled model.

The same weights run scanned (stacked ``(layers, ...)``) and unrolled (``layer_i``); each method's
tree for the scanned model, sliced per layer, must be the unrolled model's tree, and both must
give the same outputs and the same gradients.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import peftjax
from peftjax import peft
from peftjax import tree as tree_lib
from peftjax.errors import ConfigError

L, D = 3, 8


class Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(D, name='query', kernel_init=nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), ('embed', 'mlp')))(x)
    h = nn.DenseGeneral((2, D // 2), name='up')(jnp.tanh(h))
    return x + nn.DenseGeneral(D, axis=(-1, -2), name='down')(h), None


class Stack(nn.Module):
  scan: bool

  @nn.compact
  def __call__(self, x):
    if self.scan:
      stack = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True}, length=L,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(name='layers')(x, None)
    else:
      for i in range(L):
        x, _ = Block(name=f'layer_{i}')(x, None)
    return x


def unstack(tree):
  """``{'layers': stacked}`` -> ``{'layer_i': slice i}``."""
  out = {k: v for k, v in tree.items() if k != 'layers'}
  for i in range(L):
    out[f'layer_{i}'] = jax.tree.map(lambda x, i=i: x[i], tree['layers'])
  return out


def _method(name, **fields):
  cfg = peftjax.config('quickstart')
  cfg.peft.method, cfg.peft.head = name, r'^$'
  cfg.peft.lora.targets, cfg.peft.lora.rank = r'.*/(query|up|down)/kernel$', 4
  cfg.peft.ia3.targets, cfg.peft.ia3.ffn_targets = r'(query|up)$', r'down$'
  cfg.peft.adapter.kind, cfg.peft.adapter.size = 'houlsby', 3
  cfg.peft.adapter.attn_targets, cfg.peft.adapter.ffn_targets = r'query$', r'down$'
  for k, v in fields.items():
    cfg.peft.lora[k] = v
  return peft.build(cfg.peft)


@pytest.fixture(scope='module')
def models():
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  scanned, unrolled = Stack(scan=True), Stack(scan=False)
  boxed = scanned.init(jax.random.key(1), x)['params']
  params = nn.meta.unbox(boxed)
  return scanned, unrolled, params, unstack(params), {'x': x}, nn.get_partition_spec(boxed)


def _perturb(tree, seed=3):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize('name', ['lora', 'ia3', 'dora', 'pissa', 'adapter'])
def test_scanned_method_equals_unrolled_per_layer(models, name):
  scanned, unrolled, params, flat_params, inputs, _ = models
  method = _method(name)
  tree = method.init(jax.random.key(2), scanned, params, inputs)
  base = method.prepare_base(params, tree, module=scanned, inputs=inputs)
  tree = _perturb(tree)
  y_scan = peft.apply(scanned, method, base, tree, inputs)
  y_flat = peft.apply(unrolled, method, unstack(base), unstack_tree(tree), inputs)
  np.testing.assert_allclose(y_scan, y_flat, rtol=1e-5, atol=1e-5)
  # The stacked tree holds one independent set of parameters per layer.
  first = tree_lib.flatten(tree)
  stacked = [v for v in first.values() if v.ndim >= 2]
  assert stacked and all(v.shape[0] == L for v in first.values())
  assert all(not np.allclose(v[0], v[1]) for v in stacked)
  # Gradients agree layer by layer.
  loss = lambda m, b, t: jnp.sum(peft.apply(m, method, b, t, inputs) ** 2)
  g_scan = jax.grad(loss, argnums=2)(scanned, base, tree)
  g_flat = jax.grad(loss, argnums=2)(unrolled, unstack(base), unstack_tree(tree))
  for p, g in tree_lib.flatten(unstack_tree(g_scan)).items():
    ref = tree_lib.flatten(g_flat)[p]
    np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(ref).max())))
  if name != 'adapter':  # merging the stacked tree is merging each layer
    merged = method.merge(base, tree)
    np.testing.assert_allclose(scanned.apply({'params': merged}, **inputs), y_scan,
                               rtol=1e-5, atol=1e-5)


def unstack_tree(tree):
  return unstack(tree) if 'layers' in tree else tree


def test_rank_is_checked_per_layer_not_against_the_stack(models):
  """A rank above the number of layers is valid when each layer's kernel allows it."""
  scanned, _, params, _, inputs, _ = models
  method = _method('lora', rank=6)
  tree = method.init(jax.random.key(2), scanned, params, inputs)
  assert tree['layers']['query']['lora_a'].shape == (L, D, 6)
  assert tree['layers']['query']['lora_b'].shape == (L, 6, D)
  with pytest.raises(ConfigError, match=r'1 <= rank <= 8'):
    _method('lora', rank=9).init(jax.random.key(2), scanned, params, inputs)


def test_scanned_factors_shard_on_the_stack_axis(models):
  scanned, _, params, _, inputs, specs = models
  method = _method('lora')
  tree = method.init(jax.random.key(2), scanned, params, inputs)
  got = method.logical_specs(specs, tree)['layers']['query']
  assert specs['layers']['query']['kernel'] == P('layers', 'embed', 'mlp')
  assert got == {'lora_a': P('layers', 'embed', None), 'lora_b': P('layers', None, 'mlp')}


class Probe(nn.Module):
  """One Dense per layer; the carry passes through unchanged, the Dense's output is the ys."""

  @nn.compact
  def __call__(self, x, _):
    return x, nn.Dense(D, name='query')(x)


class ProbeStack(nn.Module):

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    del deterministic  # only the LoRA branch drops out here
    stack = nn.scan(Probe, variable_axes={'params': 0},
                    split_rngs={'params': True, 'dropout': True}, length=L)
    return stack(name='layers')(x, None)[1]  # (L, b, t, D)


def test_lora_dropout_draws_a_mask_per_scanned_layer():
  """Identical layers with identical factors differ in training only by their dropout masks."""
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  model = ProbeStack()
  params = model.init(jax.random.key(1), x)['params']
  same = jax.tree.map(lambda v: jnp.broadcast_to(v[:1], v.shape), params)  # layer 0 everywhere
  method = _method('lora', dropout=0.5)
  lora = method.init(jax.random.key(2), model, same, {'x': x})
  lora = jax.tree.map(lambda v: jnp.broadcast_to(_perturb(v)[:1], v.shape), lora)
  train = peft.apply(model, method, same, lora, {'x': x}, rng=jax.random.key(3),
                     deterministic=False)
  evaluate = peft.apply(model, method, same, lora, {'x': x})
  np.testing.assert_allclose(evaluate[0], evaluate[1], rtol=1e-6)  # the layers are identical
  assert not np.allclose(train[0], train[1]), 'the scanned layers shared one dropout mask'
  assert not np.allclose(train[0], evaluate[0])
