"""Real int8 inference: conversion, int8 x int8 -> int32 matmuls, agreement with fake quant, save/load."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinybert
from configs import common
from peftjax import peft
from peftjax import tree
from peftjax.errors import ConfigError
from peftjax.errors import UserInputError
from peftjax.models import BertClassifier
from peftjax.models import BertConfig
from peftjax.quant import int8
from peftjax.quant import qat


def _cfg(**quant):
  c = common.get_config()
  for k, v in quant.items():
    c.quant[k] = v
  return c


def _batches():
  b = tinybert.batch()
  return [b, {**b, 'input_ids': (b['input_ids'] * 7 + 3) % 100}]


def _fake_quant_model(c):
  """The QAT forward (probe method: the base only) with the same calibration."""
  c.quant.qat = True
  m = qat.wrap(peft.build(c.peft), c.quant)
  b = tinybert.built()
  params = m.init(jax.random.key(1), b.module, b.params, tinybert.inputs())
  if m.needs_calibration:
    params = m.calibrate(b.module, b.params, params, _batches(), b.input_keys)
  return lambda inputs: peft.apply(b.module, m, b.params, params, inputs)


def _ranges(c):
  b = tinybert.built()
  sites = qat.find_quant_sites(b.module, b.params, tinybert.inputs(), c.quant)
  fwd = lambda p, batch: b.module.apply({'params': p},
                                        **{k: batch[k] for k in b.input_keys})
  return qat.calibrate_ranges(fwd, b.params, sites, _batches(), c.quant)


def _convert(c, static=True):
  b = tinybert.built()
  return int8.convert(b.module, b.params, tinybert.inputs(), c.quant,
                      ranges=_ranges(c) if static else None)


@pytest.mark.parametrize('activations,symmetric', [('static', True), ('static', False),
                                                   ('dynamic', True), ('none', True)])
def test_int8_matches_fake_quant_within_one_step(activations, symmetric):
  c = _cfg(activations=activations, act_symmetric=symmetric)
  model = _convert(c, static=activations == 'static')
  assert model.settings['activations'] == activations
  got = model(tinybert.inputs())
  want = _fake_quant_model(_cfg(activations=activations, act_symmetric=symmetric))(
      tinybert.inputs())
  # One quantization step of the head's input (the pooled hidden state) bounds the error; the
  # int32 accumulation is exact, so in practice they agree to float rounding.
  np.testing.assert_allclose(got, want, atol=1e-4)
  float_out = tinybert.built().module.apply({'params': tinybert.built().params},
                                            **tinybert.inputs())
  if activations != 'none':
    assert np.abs(np.asarray(got) - np.asarray(float_out)).max() > 1e-6  # really quantized


def test_matmuls_really_run_in_int8():
  model = _convert(_cfg(activations='static'))
  jaxpr = str(jax.make_jaxpr(model)(tinybert.inputs()))
  n_int_dots = jaxpr.count('preferred_element_type=int32')
  assert n_int_dots == 6 * tinybert.L
  flat = tree.flatten(model.params)
  for s in model.sites:
    assert flat[s.weight_path].dtype == jnp.int8  # no float copy is kept


def test_embeddings_and_bytes():
  c = _cfg(activations='static', embeddings=True, targets=r'(encoder/.*|classifier/.*)kernel$')
  model = _convert(c)
  kinds = sorted({s.kind for s in model.sites})
  assert kinds == ['dense', 'embed']
  b = tinybert.built()
  want = _fake_quant_model(_cfg(activations='static', embeddings=True,
                                targets=r'(encoder/.*|classifier/.*)kernel$'))(tinybert.inputs())
  np.testing.assert_allclose(model(tinybert.inputs()), want, atol=1e-4)
  # Every weight matrix is int8: float bytes remain only for biases, norms and the scales.
  flat = tree.flatten(b.params)
  int8_elems = sum(flat[s.weight_path].size for s in model.sites)
  scales = sum(4 * model.qparams[s.path]['w_scale'].size for s in model.sites)
  act = sum(8 for s in model.sites if s.kind == 'dense')  # x_scale, x_zero
  assert model.weight_bytes == qat.bytes_of(b.params) - 3 * int8_elems + scales + act
  summary = int8.summary(model, b.params)
  assert summary['bytes_ratio'] == model.weight_bytes / qat.bytes_of(b.params) < 0.4


def test_lora_merged_then_converted():
  """A LoRA fine-tune merged and converted equals the converted merged float model."""
  b = tinybert.built()
  method, lora, _ = tinybert.init('lora')
  lora = jax.tree.map(lambda x: x + 0.3, lora)
  merged = method.merge(b.params, lora)
  c = _cfg(activations='dynamic')
  model = int8.convert(b.module, merged, tinybert.inputs(), c.quant)
  float_out = b.module.apply({'params': merged}, **tinybert.inputs())
  np.testing.assert_allclose(model(tinybert.inputs()), float_out, atol=0.05)


def test_save_load_round_trip_and_size(tmp_path):
  model = _convert(_cfg(activations='static'))
  size = int8.save(model, tmp_path / 'int8')
  assert size == int8.disk_bytes(tmp_path / 'int8') > 0
  assert [p.name for p in tmp_path.iterdir()] == ['int8']  # no temporary directory left
  b = tinybert.built()
  loaded = int8.load(tmp_path / 'int8', b.module, b.params)
  np.testing.assert_array_equal(loaded(tinybert.inputs()), model(tinybert.inputs()))
  with pytest.raises(UserInputError, match='exists; refusing to overwrite'):
    int8.save(model, tmp_path / 'int8')


def test_load_into_a_model_of_other_shapes_is_an_error(tmp_path):
  model = _convert(_cfg(activations='static'))
  int8.save(model, tmp_path / 'int8')
  other = BertClassifier(BertConfig(vocab_size=100, hidden_size=24, num_layers=2, num_heads=2,
                                    intermediate_size=32, max_position=16), num_classes=3)
  ids = jnp.ones((2, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: other.init(jax.random.key(0), ids, ids))['params']
  from flax import linen as nn
  shapes = nn.meta.unbox(shapes)
  with pytest.raises(UserInputError, match=r'does not fit this model \(36 mismatches\), e.g. '
                                           r"\['classifier/kernel: saved \(16, 3\) vs float "
                                           r'model \(24, 3\)'):
    int8.load(tmp_path / 'int8', other, shapes)
  with pytest.raises(UserInputError, match='is not an int8 model'):
    int8.load(tmp_path, other, shapes)


def test_asymmetric_weights_rejected_for_int8():
  with pytest.raises(ConfigError, match='quant.symmetric=False is invalid for int8 inference'):
    _convert(_cfg(symmetric=False), static=False)


def test_cnn_convolutions_run_in_int8_and_match_fake_quant():
  """Conv kernels quantize per output channel; the int8 conv equals the fake-quant one."""
  from flax import linen as nn
  from peftjax.models.vision import CNN
  module = CNN(channels=(4, 8), hidden=16, num_classes=10)
  images = jax.random.uniform(jax.random.key(0), (4, 12, 12, 1))
  params = nn.meta.unbox(module.init(jax.random.key(1), images)['params'])
  c = _cfg(qat=True, targets=r'kernel$', activations='static')
  c.peft.method = 'full'
  m = qat.wrap(peft.build(c.peft), c.quant)
  inputs = {'image': images}
  pp = m.init(jax.random.key(1), module, params, inputs)
  sites = m.sites(module, params, inputs)
  assert [s.kind for s in sites].count('conv') == 2
  pp = m.calibrate(module, params, pp, [inputs], ('image',))
  want = peft.apply(module, m, params, pp, inputs)
  fwd = lambda p, b: module.apply({'params': p}, b['image'])
  model = int8.convert(module, params, inputs, c.quant,
                       ranges=qat.calibrate_ranges(fwd, params, sites, [inputs], c.quant))
  np.testing.assert_allclose(model(inputs), want, atol=1e-5)
  assert str(jax.make_jaxpr(model)(inputs)).count('preferred_element_type=int32') == 4


def test_qlora_merged_into_a_requantized_int8_base():
  """QLoRA for serving: merge LoRA into the dequantized base, then convert to int8 again."""
  b = tinybert.built()
  c = _cfg(qlora=True, activations='dynamic')
  m = qat.wrap(peft.build(c.peft), c.quant)
  lora = m.init(jax.random.key(1), b.module, b.params, tinybert.inputs())
  base = m.prepare_base(b.params, lora, module=b.module, inputs=tinybert.inputs())  # int8-stored
  lora = jax.tree.map(lambda x: x + 0.1, lora)
  served = int8.convert(b.module, m.merge(base, lora), tinybert.inputs(), c.quant)
  qlora_out = peft.apply(b.module, m, base, lora, tinybert.inputs())
  # Weights re-quantized to the merged weight's own grid + dynamic int8 activations.
  np.testing.assert_allclose(served(tinybert.inputs()), qlora_out, atol=0.05)
  assert not np.allclose(served(tinybert.inputs()), qlora_out, atol=1e-7)
  flat = tree.flatten(served.params)
  assert all(flat[s.weight_path].dtype == jnp.int8 for s in served.sites)
