"""Full fine-tuning, linear probe and BitFit: exact trainable sets and a jitted step for each."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from peftjax import optim
from peftjax import peft
from peftjax import train
from peftjax import tree
from peftjax.models import BertClassifier
from peftjax.models import BertConfig
from peftjax.models.build import Built

BERT = BertConfig(vocab_size=100, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                  max_position=16)
D, F, L = 16, 32, 2


@pytest.fixture(scope='module')
def built():
  module = BertClassifier(BERT, num_classes=3)
  ids = jnp.ones((4, 8), jnp.int32)
  boxed = module.init(jax.random.key(0), ids, ids)['params']
  return Built(module, nn.meta.unbox(boxed), ('input_ids', 'attention_mask', 'token_type_ids'),
               nn.get_partition_spec(boxed), 'random')


def _method(name):
  c = common.get_config()
  c.peft.method = name
  return peft.build(c.peft), c


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
  method, _ = _method(name)
  trainable, frozen = tree.partition(built.params, method.trainable_base)
  total = tree.count(built.params)
  assert tree.count(trainable) == (total if expected is None else expected)
  assert tree.count(trainable) + tree.count(frozen) == total


@pytest.mark.parametrize('name', ['linear_probe', 'bitfit', 'full', 'lora'])
def test_jitted_step_moves_only_trainable(built, name):
  method, c = _method(name)
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0  # decay alone would move LoRA A while its gradient is zero
  ids = jnp.arange(32, dtype=jnp.int32).reshape(4, 8) % 100
  batch = {'input_ids': ids, 'attention_mask': jnp.ones_like(ids),
           'token_type_ids': jnp.zeros_like(ids), 'label': jnp.array([0, 1, 2, 1])}
  inputs = {k: batch[k] for k in built.input_keys}
  lora = method.init(jax.random.key(1), built.module, built.params, inputs)
  base_tr, frozen = tree.partition(built.params, method.trainable_base)
  trainable = {'base': base_tr, 'peft': lora}
  tx = optim.make_optimizer(c.optim, 10)
  state = {'step': jnp.zeros((), jnp.int32), 'params': trainable, 'opt_state': tx.init(trainable),
           'rng': jax.random.key_data(jax.random.key(2))}
  step = jax.jit(train.make_train_step(train.make_forward(built, method), tx, built.input_keys))
  new, metrics = step(state, frozen, batch)
  assert np.isfinite(metrics['loss'])
  before, after = tree.flatten(trainable), tree.flatten(new['params'])
  assert before.keys() == after.keys()
  moved = [p for p in before if not np.array_equal(before[p], after[p])]
  # Every trainable leaf moves except LoRA's A, whose gradient is zero while B is still zero.
  assert sorted(moved) == sorted(p for p in before if not p.endswith('lora_a'))
  # The optimizer keeps exactly two moments per trainable scalar and nothing for frozen leaves.
  float_state = sum(x.size for x in jax.tree.leaves(new['opt_state']) if x.ndim > 0)
  assert float_state == 2 * tree.count(trainable)
