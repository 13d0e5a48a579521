"""Full fine-tuning, linear probe and BitFit: exact trainable sets and a jitted step for each."""
import jax
import pytest

import tinybert
from peftjax import tree
from tinybert import D
from tinybert import F
from tinybert import L


@pytest.fixture(scope='module')
def built():
  return tinybert.built()


# The embedding LayerNorm bias, then per layer: q, k, v, out (4 * D), intermediate (F), output (D)
# and two LayerNorm biases.
BIASES = D + L * (4 * D + F + D + 2 * D)
HEAD = D * 3 + 3


@pytest.mark.parametrize('name,expected', [
    ('linear_probe', HEAD),
    ('bitfit', BIASES + 3 + D * 3),  # every bias (incl. the head's) + the head kernel
    ('full', None),
])
def test_trainable_sets_are_exact(built, name, expected):
  method, _ = tinybert.method(name)
  trainable, frozen = tree.partition(built.params, method.trainable_base)
  total = tree.count(built.params)
  assert tree.count(trainable) == (total if expected is None else expected)
  assert tree.count(trainable) + tree.count(frozen) == total


@pytest.mark.parametrize('name', ['linear_probe', 'bitfit', 'full', 'lora'])
def test_jitted_step_moves_only_trainable(name):
  method, params, c = tinybert.init(name)
  # No decay: decay alone would move LoRA A while its gradient is zero.
  (before, after), state = tinybert.steps(method, params, c, weight_decay=0.0)
  assert tree.flatten(before).keys() == tree.flatten(after).keys()
  # Every trainable leaf moves except LoRA's A, whose gradient is zero while B is still zero.
  assert tinybert.moved(before, after) == sorted(
      p for p in tree.flatten(before) if not p.endswith('lora_a'))
  # The optimizer keeps exactly two moments per trainable scalar and nothing for frozen leaves.
  float_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert float_state == 2 * tree.count(before)
