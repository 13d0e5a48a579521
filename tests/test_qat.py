"""QAT and QLoRA as a transform over every PEFT method, on the tiny BERT."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinybert
from peftjax import peft
from peftjax import tree
from peftjax.errors import ConfigError
from peftjax.peft.base import layer_scope
from peftjax.quant import ops
from peftjax.quant import qat

KERNELS = r'encoder/.*kernel$'


def qmethod(name='lora', peft_overrides=None, **quant):
  m, c = tinybert.method(name, **(peft_overrides or {}))
  c.quant.qat = True
  for k, v in quant.items():
    c.quant[k] = v
  return qat.wrap(m, c.quant), c


def qinit(name='lora', peft_overrides=None, **quant):
  m, c = qmethod(name, peft_overrides, **quant)
  b = tinybert.built()
  return m, m.init(jax.random.key(1), b.module, b.params, tinybert.inputs()), c


def _randomize(t, seed=5, scale=0.2):
  leaves, treedef = jax.tree.flatten(t)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape)
                            for k, x in zip(keys, leaves)])


def _model():
  """The tiny BERT and a sample batch: what QAT/QLoRA's base functions find the layers from."""
  return {'module': tinybert.built().module, 'inputs': tinybert.inputs()}


def _sites(m):
  """The layers ``m`` quantizes in the tiny BERT (derived from the model, never stored)."""
  return m.sites(tinybert.built().module, tinybert.built().params, tinybert.inputs())


def _fwd(m, base, params):
  return peft.apply(tinybert.built().module, m, base, params, tinybert.inputs())


def test_sites_are_the_encoder_matmuls():
  m, _, _ = qinit('lora')
  flat = tree.flatten(tinybert.built().params)
  want = sorted(p for p in flat if p.startswith('encoder/') and p.endswith('kernel'))
  assert sorted(s.weight_path for s in _sites(m)) == want
  assert len(want) == 6 * tinybert.L  # q, k, v, out, intermediate, output per layer


def test_weights_on_per_channel_int8_grid_with_ste_gradient():
  m, params, _ = qinit('full')
  b = tinybert.built()
  fq = tree.flatten(m.forward_base(b.params, params, **_model()))
  flat = tree.flatten(b.params)
  for s in _sites(m):
    w, q = np.asarray(flat[s.weight_path]), np.asarray(fq[s.weight_path])
    axes = tuple(range(len(s.in_shape)))
    scale = np.abs(w).max(axis=axes, keepdims=True) / 127
    steps = q / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # on the grid...
    assert np.abs(np.round(steps)).max() == 127  # ...of its own output channel, full range used
    np.testing.assert_allclose(q, w, atol=float(scale.max()) / 2 + 1e-7)
  # STE: inside the range the weight gradient passes unchanged (every weight is inside).
  k = 'encoder/layer_0/intermediate/kernel'
  g = jax.grad(lambda p: jnp.sum(tree.flatten(m.forward_base(p, params, **_model()))[k] ** 2))(
      b.params)
  np.testing.assert_allclose(tree.flatten(g)[k], 2 * fq[k], rtol=1e-6)


def test_lora_on_quantized_base_is_identity_at_init_and_trains_only_lora():
  """LoRA + QAT of the frozen base: at B = 0 the model is exactly the fake-quant base."""
  b = tinybert.built()
  m, params, c = qinit('lora')
  probe, probe_params, _ = qinit('linear_probe')
  quantized = _fwd(m, b.params, params)
  np.testing.assert_array_equal(quantized, _fwd(probe, b.params, probe_params))
  float_out = b.module.apply({'params': b.params}, **tinybert.inputs())
  assert 1e-5 < np.abs(quantized - float_out).max() < 0.05  # quantization noise, but small
  (before, after), _ = tinybert.steps(m, params, c, weight_decay=0.0)
  moved = tinybert.moved(before, after)
  assert any(p.endswith('lora_b') for p in moved)
  assert all(p.startswith('peft/') or p.startswith('base/classifier/') for p in moved)


def test_lora_branch_reads_float_input_base_reads_quantized():
  """y = Q(x)·Q(W) + s·(x·A)·B: the LoRA delta equals the float-input reference exactly."""
  b = tinybert.built()
  m, params, _ = qinit('lora')
  params = _randomize(params)
  # Record the first query projection's input and output (an outermost interceptor sees the
  # float input and the layer's full result, LoRA included).
  got = {}

  def grab(path, module, call, x):
    del module
    y = call(x)
    got[path] = (x, y)
    return y

  path = 'encoder/layer_0/attention/query'
  with layer_scope((nn.DenseGeneral,), {path}, grab):
    _fwd(m, b.params, params)
  x = got[path][0]  # the float input the LoRA interceptor saw (outside the quant scope)
  flat = tree.flatten(params)
  kernel = tree.flatten(m.forward_base(b.params, params, **_model()))[f'{path}/kernel']
  bias = tree.flatten(b.params)[f'{path}/bias']
  xq = ops.fake_quant_minmax(x, 8)
  ref = (jnp.einsum('bld,dhk->blhk', xq, kernel) + bias
         + m.inner.scale * jnp.einsum('bld,dr,rhk->blhk', x, flat[f'{path}/lora_a'],
                                   flat[f'{path}/lora_b']))
  np.testing.assert_allclose(got[path][1], ref, atol=2e-5)


def test_effective_mode_quantizes_merged_weight_and_trains_lora_through_ste():
  b = tinybert.built()
  m, params, c = qinit('lora', of='effective')
  params = _randomize(params)
  probe, probe_params, _ = qinit('linear_probe')
  merged = m.inner.merge(b.params, params)
  np.testing.assert_allclose(_fwd(m, b.params, params), _fwd(probe, merged, probe_params),
                             atol=1e-6)
  loss = lambda p: jnp.sum(_fwd(m, b.params, p) ** 2)
  grads = tree.flatten(jax.grad(loss)(params))
  assert all(float(jnp.abs(g).max()) > 0 for g in grads.values())


@pytest.mark.parametrize('name', ['lora', 'dora', 'pissa', 'ia3', 'adapter', 'prompt', 'prefix',
                                  'full', 'bitfit', 'linear_probe', 'lora+ia3'])
def test_every_method_trains_with_qat_in_one_jitted_step(name):
  m, params, c = qinit(name)
  b = tinybert.built()
  base = m.prepare_base(b.params, params, **_model())
  (before, after), state = tinybert.steps(m, params, c, weight_decay=0.0, base=base)
  assert tinybert.moved(before, after)
  trainable_base = set(tree.flatten(before['base']))
  for s in _sites(m):  # frozen kernels never appear in the trainable partition
    assert (f'base/{s.weight_path}' in {f'base/{p}' for p in trainable_base}) == (
        name == 'full')


def test_full_qat_gradient_is_ste_of_the_float_gradient_at_the_quantized_weights():
  b = tinybert.built()
  m, params, _ = qinit('full', activations='none')
  probe, probe_params, _ = tinybert.init('full')
  loss_q = lambda p: jnp.sum(_fwd(m, p, params) ** 2)
  loss_f = lambda p: jnp.sum(_fwd(probe, p, probe_params) ** 2)
  g_q = jax.grad(loss_q)(b.params)
  g_f = jax.grad(loss_f)(m.forward_base(b.params, params, **_model()))  # float grads at Q(W)
  np.testing.assert_allclose(tree.flatten(g_q)['encoder/layer_1/output/kernel'],
                             tree.flatten(g_f)['encoder/layer_1/output/kernel'], rtol=1e-4,
                             atol=1e-7)


def _calibrated(name='linear_probe', **quant):
  m, params, c = qinit(name, **quant)
  b = tinybert.built()
  batches = [tinybert.batch(), {**tinybert.batch(), 'input_ids': tinybert.batch()['input_ids'][::-1]}]
  params = m.calibrate(b.module, b.params, params, batches, b.input_keys)
  return m, params, c, batches


def test_static_scales_match_observed_ranges():
  m, params, _, batches = _calibrated(activations='static', act_symmetric=False)
  dense = [s.path for s in _sites(m)]
  scales = m.static_scales(params)
  assert sorted(scales) == sorted(dense)
  # The intermediate->output input is the GELU output: its min is GELU's (about -0.17).
  scale, zero = scales['encoder/layer_0/output']
  assert float(scale) > 0 and -128 <= float(zero) <= 127
  lo = -128 - float(zero)
  assert lo * float(scale) < 0  # the calibrated range includes negatives
  out = _fwd(m, tinybert.built().params, params)
  assert np.isfinite(np.asarray(out)).all()


def test_lsq_steps_initialised_from_calibration_and_trained():
  m, params, c, _ = _calibrated('lora', activations='lsq')
  steps = tree.flatten(params['lsq'])
  assert len(steps) == len(_sites(m)) and all(k.endswith('act_step') for k in steps)
  assert all(float(v) > 0 and float(v) != 1.0 for v in steps.values())
  (before, after), _ = tinybert.steps(m, params, c, weight_decay=0.0)
  moved = tinybert.moved(before, after)
  assert any('act_step' in p for p in moved)


def test_qlora_base_held_in_int8_at_a_quarter_of_the_bytes():
  b = tinybert.built()
  m, c = qmethod('lora')
  c.quant.qat, c.quant.qlora = False, True
  m = qat.wrap(tinybert.method('lora')[0], c.quant)
  params = m.init(jax.random.key(1), b.module, b.params, tinybert.inputs())
  base = m.prepare_base(b.params, params, **_model())
  flat, fflat = tree.flatten(base), tree.flatten(b.params)
  for s in _sites(m):
    assert flat[s.weight_path + '/int8'].dtype == jnp.int8
    assert s.weight_path not in flat
  kernel_bytes = sum(fflat[s.weight_path].size for s in _sites(m))
  scale_bytes = sum(4 * flat[s.weight_path + '/scale'].size for s in _sites(m))
  assert qat.bytes_of(base) == qat.bytes_of(b.params) - 3 * kernel_bytes + scale_bytes
  # The forward is the float model on the dequantized weights; LoRA (B = 0) changes nothing.
  deq = qat.load_int8(base, _sites(m))
  np.testing.assert_allclose(_fwd(m, base, params),
                             b.module.apply({'params': deq}, **tinybert.inputs()), atol=1e-6)
  (before, after), _ = tinybert.steps(m, params, c, weight_decay=0.0, base=base)
  assert any(p.endswith('lora_b') for p in tinybert.moved(before, after))
  # Merge for serving: the float merge of the dequantized base, ready to re-quantize.
  params = _randomize(params)
  merged = m.merge(base, params)
  np.testing.assert_allclose(b.module.apply({'params': merged}, **tinybert.inputs()),
                             _fwd(m, base, params), atol=1e-5)


@pytest.mark.parametrize('field,value,match', [
    ('bits', 9, r'quant.bits=9 is invalid; valid: an integer in 2..8'),
    ('bits', 1, r'quant.bits=1'),
    ('act_bits', 0, r'quant.act_bits=0'),
    ('activations', 'sometimes', r"quant.activations='sometimes' is invalid"),
    ('of', 'merged', r"quant.of='merged' is invalid"),
    ('observer', 'median', r'median'),
])
def test_bad_config(field, value, match):
  with pytest.raises(ConfigError, match=match):
    qmethod('lora', **{field: value})


def test_targets_matching_nothing_lists_closest_paths():
  with pytest.raises(ConfigError, match=r"quant.targets='encoder/.*/qurey/kernel\$' matches no "
                                        r'parameter; closest weight paths: .*query/kernel'):
    qinit('lora', targets=r'encoder/.*/qurey/kernel$')


def test_effective_needs_a_mergeable_method():
  with pytest.raises(ConfigError, match=r"quant.of='effective' needs a mergeable method"):
    qinit('adapter', of='effective')


def test_calibration_with_zero_batches_is_an_error():
  m, params, _ = qinit('lora', activations='static')
  b = tinybert.built()
  with pytest.raises(ConfigError, match='calibration_batches'):
    m.calibrate(b.module, b.params, params, [], b.input_keys)


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name='out')(jnp.tanh(nn.Dense(8, name='hidden')(x)))


@pytest.mark.parametrize('activations', ['static', 'lsq'])
def test_one_qat_object_calibrates_two_models_and_keeps_nothing(activations):
  """Calibration returns its scales in the tree; the object's attributes never change."""
  m, _ = qmethod('lora', {'targets': r'kernel$', 'rank': 2}, targets=r'kernel$',
                 activations=activations)
  before = dict(vars(m))
  b, x = tinybert.built(), jax.random.normal(jax.random.key(3), (4, 5))
  mlp = _MLP()
  models = [(b.module, b.params, tinybert.inputs(), [tinybert.batch()], b.input_keys),
            (mlp, mlp.init(jax.random.key(0), x)['params'], {'x': x}, [{'x': x}], ('x',))]
  trees = []
  for module, params, inputs, batches, keys in models:
    p = m.init(jax.random.key(1), module, params, inputs)
    trees.append(m.calibrate(module, params, p, batches, keys))
  assert vars(m) == before and set(vars(m)) == {'cfg', 'inner', 'q', 'name'}
  for (module, params, inputs, batches, keys), p in zip(models, trees):
    fresh, _ = qmethod('lora', {'targets': r'kernel$', 'rank': 2}, targets=r'kernel$',
                       activations=activations)
    pf = fresh.calibrate(module, params, fresh.init(jax.random.key(1), module, params, inputs),
                         batches, keys)
    assert jax.tree.structure(p) == jax.tree.structure(pf)
    for u, v in zip(jax.tree.leaves(p), jax.tree.leaves(pf)):
      np.testing.assert_array_equal(u, v)
    part = 'static' if activations == 'static' else 'lsq'
    assert sorted(tree.flatten(p[part])) == sorted(
        f'{s.path}/{k}' for s in m.sites(module, params, inputs)
        for k in (('act_scale', 'act_zero') if part == 'static' else ('act_step',)))
    np.testing.assert_array_equal(peft.apply(module, m, params, p, inputs),
                                  peft.apply(module, fresh, params, pf, inputs))


def test_static_scales_have_zero_gradient_and_no_weight_decay():
  m, params, c, _ = _calibrated('lora', activations='static')
  grads = jax.grad(lambda p: jnp.sum(_fwd(m, tinybert.built().params, p) ** 2))(params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads['static']))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads['method']))
  history, _ = tinybert.steps(m, params, c, n=2, weight_decay=0.1)
  moved = tinybert.moved(history[0], history[-1])
  assert any('lora_b' in p for p in moved) and not any('/static/' in p for p in moved)
