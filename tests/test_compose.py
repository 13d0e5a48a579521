"""Composed methods ('lora+ia3'): one trainable tree per method, identity at init, exact merge."""
import jax
import numpy as np
import pytest

import tinybert
from peftjax import peft
from peftjax import tree
from peftjax.errors import ConfigError


def _randomize(t, seed=5):
  leaves, treedef = jax.tree.flatten(t)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + 0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_params_namespaced_and_counted():
  method, params, _ = tinybert.init('lora+ia3')
  assert method.name == 'lora+ia3' and sorted(params) == ['ia3', 'lora']
  _, lora, _ = tinybert.init('lora')
  _, ia3, _ = tinybert.init('ia3')
  assert tree.count(params) == tree.count(lora) + tree.count(ia3)


def test_identity_at_init_and_merge_equals_implicit():
  b = tinybert.built()
  inputs = tinybert.inputs()
  method, params, _ = tinybert.init('lora+ia3')
  base = b.module.apply({'params': b.params}, **inputs)
  np.testing.assert_array_equal(peft.apply(b.module, method, b.params, params, inputs), base)
  params = _randomize(params)
  implicit = peft.apply(b.module, method, b.params, params, inputs)
  assert not np.allclose(implicit, base, atol=1e-3)
  merged = method.merge(b.params, params)
  np.testing.assert_allclose(b.module.apply({'params': merged}, **inputs), implicit, atol=1e-5)


def test_jitted_step_trains_both():
  method, params, c = tinybert.init('lora+ia3')
  (before, after), _ = tinybert.steps(method, params, c, weight_decay=0.0)
  moved = tinybert.moved(before, after)
  assert any(p.startswith('peft/ia3/') for p in moved)
  assert any(p.startswith('peft/lora/') and p.endswith('lora_b') for p in moved)
  assert 'base/classifier/kernel' in moved


@pytest.mark.parametrize('name', ['lora+lorra', 'lora+lora'])
def test_bad_composition(name):
  with pytest.raises(ConfigError, match='several distinct ones joined by'):
    tinybert.method(name)
