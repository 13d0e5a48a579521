"""Compression and quantization on the decoder LM (scanned layers, tied embedding), lm_tiny
size: fake-quant forward == the dequantized-weights forward with one scale per layer and
channel; int8 decoding == the dequantized float model (weight-only) and == the fake-quant model
(per-token int8 activations), greedy, at batch 3 and 1; QLoRA's int8 base frozen with gradients
on LoRA only; the 2:4 pattern exact after training; the distilled student's layers equal the
teacher's; the KD loss by hand, and in a train step; bad variants. The variants end to end:
tests/test_lm_compress_runs.py."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from configs import lm_compress
from peftjax import generation
from peftjax import peft
from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.models.llama import LlamaConfig
from peftjax.models.llama import LlamaForCausalLM
from peftjax.models.llama import init_cache
from peftjax.quant import int8
from peftjax.quant import qat
from peftjax.quant import stacked

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position=64)
MODEL = LlamaForCausalLM(CFG)
PROMPTS = np.random.default_rng(3).integers(1, 97, (3, 9)).astype(np.int32)
LENGTHS = np.array([9, 5, 7], np.int32)


@functools.cache
def params():
  """A random 3-layer scanned LM. The scale (0.3, not 0.02) makes greedy decoding change token
  from step to step, so equal tokens test something."""
  ids = jnp.ones((1, 4), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(MODEL.init, jax.random.key(0), ids)['params'])
  rng = np.random.default_rng(7)
  fill = lambda path, x: jnp.asarray(
      (1.0 if path.endswith('/scale') else 0.0) + 0.3 * rng.standard_normal(x.shape), x.dtype)
  return tree_lib.map_with_path(fill, shapes)


def _quant(activations='none', **kw):
  q = common.get_config().quant
  q.targets, q.embeddings, q.activations = lm_compress.LAYER_KERNELS, True, activations
  for k, v in kw.items():
    q[k] = v
  return q


def _qat_method(q, method='full'):
  c = common.get_config()
  c.peft.method, c.peft.head = method, ''
  c.peft.lora.targets = r'attn/(q|k|v|o)_proj/kernel$'
  q.qat = True
  return qat.wrap(peft.build(c.peft), q)


def _generate(step, prompts=PROMPTS, lengths=LENGTHS, n=12):
  return generation.generate(step, functools.partial(init_cache, CFG), prompts, lengths,
                             max_new_tokens=n).ids


def _dequantized(p, sites, q):
  """The float model whose weights are the int8 grid: ``int8 * scale`` of every site."""
  flat = tree_lib.flatten(p)
  for s in sites:
    wq, scale = qat.quantize_weight(flat[s.weight_path], s, q)
    flat[s.weight_path] = wq.astype(jnp.float32) * scale
  return tree_lib.unflatten(flat)


# ---------------------------------------------------------------------------- QAT and int8


def test_every_layer_and_channel_has_its_own_scale_and_the_tied_table_one_per_row():
  q = _quant()
  sites = {s.path: s for s in qat.find_quant_sites(MODEL, params(), {'input_ids': PROMPTS}, q)}
  assert sorted(sites) == ['embed', *(f'layers/{m}' for m in (
      'attn/k_proj', 'attn/o_proj', 'attn/q_proj', 'attn/v_proj', 'mlp/down_proj',
      'mlp/gate_proj', 'mlp/up_proj'))]
  flat = tree_lib.flatten(params())
  for path, s in sites.items():
    w = flat[s.weight_path]
    wq, scale = qat.quantize_weight(w, s, q)
    if s.kind == 'embed':
      assert s.lead == () and scale.shape == (CFG.vocab_size, 1)
      want = np.max(np.abs(np.asarray(w)), axis=1, keepdims=True) / 127
    else:
      assert s.lead == (3,) and scale.shape == (3, 1, w.shape[2])
      # Layer i alone, quantized as an unstacked layer: the stacked scales are its own.
      for i in range(3):
        one = dataclasses.replace(s, lead=())
        wq_i, scale_i = qat.quantize_weight(w[i], one, q)
        np.testing.assert_array_equal(scale[i], scale_i)
        np.testing.assert_array_equal(wq[i], wq_i)
      want = np.max(np.abs(np.asarray(w)), axis=1, keepdims=True) / 127
    np.testing.assert_allclose(scale, want, rtol=1e-6)
    assert np.abs(np.asarray(wq)).max() == 127, path  # each channel's max lands on the grid


def test_fake_quant_forward_equals_the_dequantized_weights_forward():
  q = _quant()
  method = _qat_method(q, 'lora')
  inputs = {'input_ids': jnp.asarray(PROMPTS)}
  lora = method.init(jax.random.key(1), MODEL, params(), inputs)
  # B = 0 at init: give the LoRA a value so it is part of the comparison.
  lora = jax.tree.map(lambda x: x + 0.05, lora)
  got = peft.apply(MODEL, method, params(), lora, inputs)
  sites = qat.find_quant_sites(MODEL, params(), inputs, q)
  deq = _dequantized(params(), sites, q)
  want = peft.apply(MODEL, method.inner, deq, lora, inputs)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  float_out = peft.apply(MODEL, method.inner, params(), lora, inputs)
  assert not np.allclose(got, float_out, atol=1e-3)  # the grid is not the float model
  # Gradients reach LoRA through the fake-quantized base (straight-through).
  g = jax.grad(lambda lp: peft.apply(MODEL, method, params(), lp, inputs).sum())(lora)
  assert all(np.abs(np.asarray(v)).sum() > 0 for v in jax.tree.leaves(g))


@pytest.mark.parametrize('activations', ['per_token', 'dynamic'])
def test_int8_model_equals_the_fake_quant_model(activations):
  q = _quant(activations)
  inputs = {'input_ids': jnp.asarray(PROMPTS)}
  model = int8.convert(MODEL, params(), inputs, q)
  flat = tree_lib.flatten(model.params)
  assert all(flat[s.weight_path].dtype == jnp.int8 for s in model.sites)
  ref = peft.apply(MODEL, _qat_method(q), params(), {}, inputs)
  np.testing.assert_allclose(model.jit()(inputs), ref, atol=2e-5, rtol=1e-5)


def test_int8_decode_weight_only_equals_the_dequantized_float_model():
  q = _quant('none')
  model = int8.convert(MODEL, params(), {'input_ids': jnp.asarray(PROMPTS)}, q)
  deq = _dequantized(params(), model.sites, q)
  want = _generate(generation.model_step(MODEL, deq))
  assert len(set(want[0].tolist())) > 3  # tokens change along the row
  np.testing.assert_array_equal(_generate(model.step()), want)
  np.testing.assert_array_equal(_generate(model.step(), PROMPTS[:1], LENGTHS[:1]), want[:1])
  # The int8 model runs the grid, not the float weights (8-bit weights keep these tokens).
  inputs = {'input_ids': jnp.asarray(PROMPTS)}
  np.testing.assert_allclose(model.jit()(inputs), MODEL.apply({'params': deq}, PROMPTS),
                             atol=2e-5, rtol=1e-5)
  assert np.abs(model.jit()(inputs) - MODEL.apply({'params': params()}, PROMPTS)).max() > 1e-3


def test_int8_decode_per_token_equals_the_fake_quant_model_at_any_batch():
  q = _quant('per_token')
  model = int8.convert(MODEL, params(), {'input_ids': jnp.asarray(PROMPTS)}, q)
  ref = generation.method_step(MODEL, _qat_method(q), params(), {})
  want = _generate(ref)
  np.testing.assert_array_equal(_generate(model.step()), want)
  # Batch 1 (the int8 matmul pads its lone row): per-token scales, so the same tokens.
  for b in range(3):
    np.testing.assert_array_equal(
        _generate(model.step(), PROMPTS[b:b + 1], LENGTHS[b:b + 1]), want[b:b + 1])


def test_static_ranges_are_calibrated_per_layer_on_the_unrolled_twin():
  q = _quant('static')
  inputs = {'input_ids': jnp.asarray(PROMPTS)}
  sites = qat.find_quant_sites(MODEL, params(), inputs, q)
  batches = [{'input_ids': jnp.asarray(PROMPTS)}]
  ranges = stacked.calibrate(MODEL, params(), sites, batches, q, ('input_ids',))
  lo, hi = ranges['layers/mlp/down_proj']
  assert lo.shape == hi.shape == (3,) and len(set(np.asarray(hi).tolist())) == 3
  # Layer 1's range is the range of layer 1's input, seen in the unrolled model.
  twin = stacked.unrolled_module(MODEL)
  seen = {}

  def spy(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and '/'.join(context.module.path) == \
        'layer_1/mlp/down_proj':
      seen['x'] = args[0]
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(spy):
    twin.apply({'params': stacked.unroll(params(), 3)}, PROMPTS)
  assert float(hi[1]) == pytest.approx(float(seen['x'].max()))
  assert float(lo[1]) == pytest.approx(float(seen['x'].min()))
  # The int8 model with these static scales equals the fake-quant model using them.
  model = int8.convert(MODEL, params(), inputs, q, ranges=ranges)
  method = _qat_method(q)
  scales = qat.static_scales(ranges, q)
  static = tree_lib.unflatten({f'{p}/{k}': v for p, sz in scales.items()
                               for k, v in zip(('act_scale', 'act_zero'), sz)})
  ref = peft.apply(MODEL, method, params(), {'method': {}, 'static': static}, inputs)
  np.testing.assert_allclose(model.jit()(inputs), ref, atol=2e-5, rtol=1e-5)
  # Static QAT calibrates the same per-layer scales; LSQ starts one step per layer from them.
  got = method.calibrate(MODEL, params(), {}, batches, ('input_ids',))['static']
  for p, v in tree_lib.flatten(static).items():
    np.testing.assert_allclose(tree_lib.flatten(got)[p], v, rtol=1e-6)
  lsq = _qat_method(_quant('lsq'))
  steps = lsq.calibrate(MODEL, params(), lsq.init(jax.random.key(0), MODEL, params(), inputs),
                        batches, ('input_ids',))['lsq']
  step = tree_lib.flatten(steps)['layers/mlp/down_proj/act_step']
  np.testing.assert_allclose(step, np.maximum(-np.asarray(lo), np.asarray(hi)) / 127, rtol=1e-6)


# ---------------------------------------------------------------------------- distillation


def test_student_is_the_teachers_every_other_layer_exactly():
  from peftjax.compress import lm_distill
  teacher = params()
  student = lm_distill.student_from_teacher(CFG, teacher, (0, 2))
  assert student.cfg.num_layers == 2 and student.layer_map == (1, 2)
  assert dataclasses.replace(student.cfg, num_layers=3) == CFG
  t, s = tree_lib.flatten(teacher), tree_lib.flatten(student.params)
  assert sorted(t) == sorted(s)
  for p, v in t.items():
    if p.startswith('layers/'):
      np.testing.assert_array_equal(s[p], np.asarray(v)[[0, 2]])
    else:
      np.testing.assert_array_equal(s[p], v)
    assert s[p] is not v
  # The student computes the teacher with layer 1 skipped (its unrolled twin, layer by layer).
  twin = stacked.unrolled_module(MODEL)
  flat = tree_lib.flatten(stacked.unroll(teacher, 3))
  skip = {p.replace('layer_2/', 'layer_1/'): v for p, v in flat.items()
          if not p.startswith('layer_1/')}
  two = twin.clone(cfg=dataclasses.replace(twin.cfg, num_layers=2))
  np.testing.assert_allclose(
      LlamaForCausalLM(student.cfg).apply({'params': student.params}, PROMPTS),
      two.apply({'params': tree_lib.unflatten(skip)}, PROMPTS), atol=1e-5)
  # SmolLM2's 30 layers, every other: 15, mapped to the last teacher layer of each pair.
  smol = dataclasses.replace(CFG, num_layers=30)
  deep = jax.tree.map(lambda x: jnp.repeat(x, 10, axis=0) if x.shape[:1] == (3,) else x,
                      teacher)
  s30 = lm_distill.student_from_teacher(smol, deep, 'every_other')
  assert s30.cfg.num_layers == 15 and s30.layer_map == tuple(range(1, 30, 2))
  np.testing.assert_array_equal(tree_lib.flatten(s30.params)['layers/attn/q_proj/kernel'][7],
                                tree_lib.flatten(deep)['layers/attn/q_proj/kernel'][14])


def test_kd_loss_equals_a_hand_computation():
  from peftjax.compress import lm_distill
  rng = np.random.default_rng(0)
  s, t = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
  targets = rng.integers(0, 5, (2, 3))
  mask = np.array([[0, 1, 1], [0, 0, 1]])
  loss, parts = lm_distill.kd_loss(s, t, targets, mask, temperature=2.0, alpha=0.3)

  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  soft, hard = [], []
  for b, i in zip(*np.nonzero(mask)):
    pt, lps = np.exp(log_softmax(t[b, i] / 2)), log_softmax(s[b, i] / 2)
    soft.append(4 * np.sum(pt * (np.log(pt) - lps)))
    hard.append(-log_softmax(s[b, i])[targets[b, i]])
  assert float(parts['soft']) == pytest.approx(np.mean(soft), rel=1e-5)
  assert float(parts['hard']) == pytest.approx(np.mean(hard), rel=1e-5)
  assert float(loss) == pytest.approx(0.3 * np.mean(soft) + 0.7 * np.mean(hard), rel=1e-5)


def test_a_kd_train_step_reports_the_hand_computed_loss():
  from peftjax import run as run_lib
  from peftjax import step as step_lib
  from peftjax.compress import lm_distill
  c = _tiny('distill15')
  setup = run_lib.build_setup(c)
  teacher = setup.plan.teacher
  assert teacher.module.cfg.num_layers == 4 and setup.built.module.cfg.num_layers == 2
  batch = {k: jnp.asarray(v) for k, v in setup.data.train_batches(4, 0)[0].items()}
  keys = setup.built.input_keys
  s_logits = setup.built.module.apply({'params': setup.base()}, **{k: batch[k] for k in keys})
  t_logits = teacher.module.apply({'params': teacher.params}, **{k: batch[k] for k in keys})
  want, _ = lm_distill.kd_loss(np.asarray(s_logits, np.float64), np.asarray(t_logits, np.float64),
                               np.asarray(batch['targets']), np.asarray(batch['loss_mask']),
                               temperature=2.0, alpha=0.5)
  tx, state = run_lib.initial_state(c, setup, setup.trainable)
  consts, _ = run_lib.consts(setup)
  train_step = jax.jit(step_lib.make_train_step(run_lib.setup_forward(setup), tx, setup.task,
                                                setup.components))
  _, metrics = train_step(state, setup.frozen, batch, consts)
  assert float(metrics['loss']) == pytest.approx(float(want), rel=1e-4)
  assert float(metrics['soft_loss']) > 0 and float(metrics['hard_loss']) > 0
  assert float(metrics['loss']) == pytest.approx(
      0.5 * float(metrics['soft_loss']) + 0.5 * float(metrics['hard_loss']), rel=1e-5)


# ---------------------------------------------------------------------------- configs


def _tiny(variant, **over):
  """``variant`` on lm_tiny's random LM, one step, scored on 2 test prompts by generation only
  (``over``: 'train__steps'-style overrides)."""
  c = lm_compress.get_config(f'{variant},tiny')
  c.train.steps, c.optim.warmup_steps = 1, 0
  c.train.eval_every, c.train.eval_before, c.train.checkpoint_every = 0, False, 1
  c.data.eval_split = ''
  c.generate.max_eval_examples, c.generate.teacher_forced = 2, False
  for k, v in over.items():
    *parents, leaf = k.split('__')
    section = c
    for p in parents:
      section = section[p]
    section[leaf] = v
  return c


def test_bad_variants_are_refused_and_ptq_of_a_lora_run_reports():
  with pytest.raises(ConfigError, match='unknown size'):
    lm_compress.get_config('qat,huge')
  with pytest.raises(ConfigError, match='unknown variant'):
    lm_compress.get_config('qtt')
  from peftjax import run as run_lib
  # The end-of-run report merges the trained LoRA into the base before converting it.
  c = _tiny('qlora', quant__qlora=False, quant__ptq=True)
  assert [x.name for x in run_lib.build_setup(c).components] == ['quant_report']


def test_wanda_scores_weigh_each_weight_by_its_inputs_norm_per_layer():
  from peftjax.compress import prune
  from peftjax.compress import wanda
  batches = [{'input_ids': jnp.asarray(PROMPTS),
              'attention_mask': jnp.asarray((np.arange(9) < LENGTHS[:, None]).astype(np.int32))}]
  scores = wanda.wanda_scores(MODEL, params(), lm_compress.LAYER_KERNELS, batches,
                              ('input_ids', 'attention_mask'))
  # Layer 2's down_proj by hand: its input in the unrolled twin, real tokens only.
  twin, seen = stacked.unrolled_module(MODEL), {}

  def spy(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and '/'.join(context.module.path) == \
        'layer_2/mlp/down_proj':
      seen['x'] = np.asarray(args[0])
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(spy):
    twin.apply({'params': stacked.unroll(params(), 3)}, **batches[0])
  real = seen['x'][np.asarray(batches[0]['attention_mask']) > 0]
  w = np.asarray(tree_lib.flatten(params())['layers/mlp/down_proj/kernel'][2])
  got = tree_lib.flatten(scores)['layers/mlp/down_proj/kernel']
  assert got.shape == (3, CFG.intermediate_size, CFG.hidden_size)
  np.testing.assert_allclose(got[2], np.abs(w) * np.sqrt((real ** 2).sum(0))[:, None],
                             rtol=1e-5)
  masks = tree_lib.flatten(prune.nm_masks(scores, n=2, m=4, targets=lm_compress.LAYER_KERNELS))
  by_weight = tree_lib.flatten(prune.nm_masks(params(), n=2, m=4,
                                              targets=lm_compress.LAYER_KERNELS))
  assert sorted(masks) == sorted(by_weight)
  assert any(not np.array_equal(masks[p], by_weight[p]) for p in masks)  # another ranking


def test_bad_prune_scores_are_refused():
  from peftjax.compress import plan
  c = lm_compress.get_config('prune24_lora')
  c.compress.prune.score = 'first_order'
  with pytest.raises(ConfigError, match="compress.prune.score='first_order' with kind='nm'"):
    plan.validate(c.compress)
  c.compress.prune.score, c.compress.prune.kind, c.compress.prune.end_step = 'wanda', \
      'magnitude', 10
  with pytest.raises(ConfigError, match="score='wanda' with end_step=10"):
    plan.validate(c.compress)
