"""IA3: exact counts, identity at init, merge == implicit, a jitted step, errors, logical specs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinybert
from peftjax import peft
from peftjax import tree
from peftjax.errors import ConfigError
from peftjax.models import BertClassifier
from tinybert import D
from tinybert import F
from tinybert import H
from tinybert import L


@pytest.fixture(scope='module')
def built():
  return tinybert.built()


_batch = tinybert.batch


def _inputs(built):
  return tinybert.inputs()


def _init(built, **kw):
  return tinybert.init('ia3', **kw)


def _randomize(tree_, seed=3):
  leaves, treedef = jax.tree.flatten(tree_)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  # exp(N(0, 1)): positive scales far from 1, so the adapted model differs visibly.
  return treedef.unflatten([jnp.exp(jax.random.normal(k, x.shape))
                            for k, x in zip(keys, leaves)])


def test_shapes_and_ones(built):
  _, ia3, _ = _init(built)
  shapes = {p: x.shape for p, x in tree.flatten(ia3).items()}
  expected = {}
  for i in range(L):
    expected[f'encoder/layer_{i}/attention/key/ia3_out/scale'] = (H, D // H)
    expected[f'encoder/layer_{i}/attention/value/ia3_out/scale'] = (H, D // H)
    expected[f'encoder/layer_{i}/output/ia3_in/scale'] = (F,)
  assert shapes == expected
  assert all(np.all(np.asarray(x) == 1) for x in jax.tree.leaves(ia3))


def test_output_unchanged_at_init(built):
  method, ia3, _ = _init(built)
  inputs = _inputs(built)
  base = built.module.apply({'params': built.params}, **inputs)
  np.testing.assert_array_equal(peft.apply(built.module, method, built.params, ia3, inputs), base)


def test_merge_equals_implicit(built):
  method, ia3, _ = _init(built)
  ia3 = _randomize(ia3)
  inputs = _inputs(built)
  # Give the biases nonzero values, so the merge must scale them too.
  params = tree.map_with_path(
      lambda p, x: x + 0.1 if p.endswith('bias') else x, built.params)
  implicit = peft.apply(built.module, method, params, ia3, inputs)
  base = built.module.apply({'params': params}, **inputs)
  assert not np.allclose(implicit, base, atol=1e-3)
  merged = method.merge(params, ia3)
  np.testing.assert_allclose(built.module.apply({'params': merged}, **inputs), implicit,
                             atol=1e-5)
  # Only the adapted kernels and the output-scaled biases change.
  changed = sorted(p for p, x in tree.flatten(merged).items()
                   if not np.array_equal(x, tree.flatten(params)[p]))
  assert changed == sorted(f'encoder/layer_{i}/{m}' for i in range(L) for m in (
      'attention/key/kernel', 'attention/key/bias', 'attention/value/kernel',
      'attention/value/bias', 'output/kernel'))


def test_jitted_step_moves_ia3_and_head_only(built):
  method, ia3, c = _init(built)
  (before, after), _ = tinybert.steps(method, ia3, c)
  assert tinybert.moved(before, after) == sorted(tree.flatten(before))  # every vector + the head
  assert sorted(tree.flatten(before['base'])) == ['classifier/bias', 'classifier/kernel']
  # Frozen leaves are not in the state at all, and the step does not return them.
  assert tree.count(after) == tree.count(before) == 3 * D + 3 + L * (2 * D + F)


def test_no_match_lists_close_module_paths(built):
  with pytest.raises(ConfigError, match=r"peft.ia3.targets='attention/\(keyy\).*closest module "
                                        r"paths: \[.*attention/key"):
    _init(built, targets='attention/(keyy)$')
  with pytest.raises(ConfigError, match=r'peft.ia3.ffn_targets'):
    _init(built, ffn_targets='/outptu$')


def test_ffn_only(built):
  _, ia3, _ = _init(built, targets='')
  assert tree.count(ia3) == L * F


def test_logical_specs(built):
  method, ia3, _ = _init(built)
  specs = tree.flatten(method.logical_specs(built.logical_specs, ia3))
  assert tuple(specs['encoder/layer_0/attention/key/ia3_out/scale']) == ('heads', 'kv')
  assert tuple(specs['encoder/layer_1/output/ia3_in/scale']) == ('mlp',)


def test_minilm_count(minilm):
  cfg, _ = minilm
  model = BertClassifier(cfg, num_classes=2)
  ids = jnp.ones((2, 8), jnp.int32)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), ids, ids)['params'])
  method, _ = tinybert.method('ia3')
  ia3 = jax.eval_shape(lambda: method.init(jax.random.key(0), model, params,
                                           {'input_ids': ids, 'attention_mask': ids}))
  assert tree.count(ia3) == 6 * (384 + 384 + 1536)  # 13,824
