"""Schedules, decay masks, accumulation, and optimizer state only for trainable leaves."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from peftjax import optim
from peftjax import tree


def _optim_cfg(**kw):
  c = common.get_config().optim
  c.update(kw)
  return c


def test_warmup_then_cosine():
  lr = optim.schedule(_optim_cfg(learning_rate=1e-3, warmup_steps=10, schedule='cosine'), 110)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(60)), 5e-4, rtol=1e-5)  # half-way down the cosine
  np.testing.assert_allclose(float(lr(110)), 0.0, atol=1e-9)


def test_linear_and_constant():
  lin = optim.schedule(_optim_cfg(learning_rate=1.0, warmup_steps=0, schedule='linear',
                                  end_lr_fraction=0.5), 100)
  np.testing.assert_allclose([float(lin(0)), float(lin(50)), float(lin(100))], [1.0, 0.75, 0.5])
  const = optim.schedule(_optim_cfg(learning_rate=0.1, warmup_steps=0, schedule='constant'), 9)
  np.testing.assert_allclose(float(const(7)), 0.1, rtol=1e-6)
  with pytest.raises(ValueError, match="optim.schedule='step'"):
    optim.schedule(_optim_cfg(schedule='step'), 10)


def test_decay_mask_skips_bias_and_norm():
  params = {'a': {'kernel': 0, 'bias': 0}, 'attention_norm': {'scale': 0, 'bias': 0},
            'q': {'lora_a': 0}}
  m = tree.flatten(optim.decay_mask(params))
  assert m == {'a/bias': False, 'a/kernel': True, 'attention_norm/bias': False,
               'attention_norm/scale': False, 'q/lora_a': True}


def test_weight_decay_applies_only_where_masked():
  params = {'w': {'kernel': jnp.ones(3), 'bias': jnp.ones(3)}}
  tx = optim.make_optimizer(_optim_cfg(learning_rate=0.1, warmup_steps=0, schedule='constant',
                                       weight_decay=0.5, clip_norm=0.0), 10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_allclose(upd['w']['kernel'], -0.1 * 0.5 * np.ones(3), rtol=1e-6)
  np.testing.assert_array_equal(upd['w']['bias'], np.zeros(3))


def test_grad_accumulation_equals_big_batch():
  cfg = _optim_cfg(learning_rate=0.1, warmup_steps=0, schedule='constant', clip_norm=0.0,
                   weight_decay=0.0)
  params = {'w': jnp.array([1.0, -2.0])}
  g1, g2 = {'w': jnp.array([0.5, 1.0])}, {'w': jnp.array([1.5, -3.0])}
  big = optim.make_optimizer(cfg, 10)
  u_big, _ = big.update({'w': (g1['w'] + g2['w']) / 2}, big.init(params), params)
  cfg.grad_accum_steps = 2
  acc = optim.make_optimizer(cfg, 10)
  s = acc.init(params)
  u1, s = acc.update(g1, s, params)
  np.testing.assert_array_equal(u1['w'], np.zeros(2))  # no update until k micro-batches
  u2, s = acc.update(g2, s, params)
  np.testing.assert_allclose(u2['w'], u_big['w'], rtol=1e-6)


def test_optimizer_state_bytes_only_for_trainable():
  """State is built over the trainable partition: 2 Adam moments, nothing for frozen leaves."""
  params = {'encoder': {'kernel': jnp.ones((384, 384))}, 'lora': {'a': jnp.ones((384, 8))}}
  trainable, frozen = tree.partition(params, 'lora/')
  tx = optim.make_optimizer(_optim_cfg(), 100)
  state = tx.init(trainable)
  float_bytes = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim > 0)
  assert float_bytes == 2 * tree.nbytes(trainable)


def test_masked_full_tree_zeroes_frozen_updates():
  params = {'frozen': jnp.ones(4), 'train': jnp.ones(2)}
  grads = {'frozen': jnp.full(4, 3.0), 'train': jnp.full(2, 3.0)}
  tx = optim.masked(optax.sgd(1.0), params, '^train$')
  upd, _ = tx.update(grads, tx.init(params))
  np.testing.assert_array_equal(upd['frozen'], np.zeros(4))
  np.testing.assert_array_equal(upd['train'], -3.0 * np.ones(2))
  # optax.masked alone would have passed the frozen gradient through unchanged.
  plain = optax.masked(optax.sgd(1.0), {'frozen': False, 'train': True})
  upd2, _ = plain.update(grads, plain.init(params))
  np.testing.assert_array_equal(upd2['frozen'], grads['frozen'])


def test_lr_multipliers_scale_one_group_exactly():
  """LoRA+: B's update is exactly `ratio` times what it would be without the multiplier."""
  params = {'q': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 4))}}
  grads = {'q': {'lora_a': jnp.full((4, 2), 0.3), 'lora_b': jnp.full((2, 4), -0.7)}}
  plain = optim.make_optimizer(_optim_cfg(warmup_steps=0, schedule='constant'), 10)
  plus = optim.make_optimizer(_optim_cfg(warmup_steps=0, schedule='constant',
                                         lr_multipliers=(('lora_b$', 16.0),)), 10)
  u0, _ = plain.update(grads, plain.init(params), params)
  u1, _ = plus.update(grads, plus.init(params), params)
  np.testing.assert_array_equal(u1['q']['lora_a'], u0['q']['lora_a'])
  np.testing.assert_allclose(u1['q']['lora_b'], 16.0 * u0['q']['lora_b'], rtol=1e-6)


@pytest.mark.parametrize('bad', [(('lora_b$',),), (('lora_b$', -1.0),), (('(', 2.0),)])
def test_lr_multipliers_validation(bad):
  with pytest.raises(ValueError, match='lr_multipliers|invalid selector regex'):
    optim.check_multipliers(bad)


def test_layer_decay_factors_are_exact():
  params = {'base': {'encoder': {'embeddings': {'w': jnp.ones(2)},
                                 'layer_0': {'w': jnp.ones(2)}, 'layer_1': {'w': jnp.ones(2)}},
                     'classifier': {'kernel': jnp.ones(2)}},
            'peft': {'encoder': {'layer_1': {'lora_b': jnp.ones(2)}}}}
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  cfg = dict(warmup_steps=0, schedule='constant', weight_decay=0.0)
  plain = optim.make_optimizer(_optim_cfg(**cfg), 10, num_layers=2)
  lld = optim.make_optimizer(_optim_cfg(layer_decay=0.5, **cfg), 10, num_layers=2)
  u0 = tree.flatten(plain.update(grads, plain.init(params), params)[0])
  u1 = tree.flatten(lld.update(grads, lld.init(params), params)[0])
  expected = {'base/classifier/kernel': 1.0, 'base/encoder/embeddings/w': 0.125,
              'base/encoder/layer_0/w': 0.25, 'base/encoder/layer_1/w': 0.5,
              'peft/encoder/layer_1/lora_b': 0.5}
  for p, f in expected.items():
    np.testing.assert_allclose(u1[p], f * u0[p], rtol=1e-6, err_msg=p)
