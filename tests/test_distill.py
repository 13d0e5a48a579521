"""Distillation: KD loss vs numpy, the T^2 gradient scale, students built from teacher layers,
a teacher without gradients inside the jitted step, hidden/attention matching, bad input."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tinybert
from peftjax import tree
from peftjax.compress import distill
from peftjax.errors import ConfigError
from peftjax.errors import UserInputError
from peftjax.models import BertClassifier
from peftjax.models import mean_pool
from peftjax.models.bert import Embeddings
from peftjax.models.bert import Layer
from peftjax.moe.layer import MoeConfig

TEACHER = dataclasses.replace(tinybert.BERT, num_layers=4)  # 4 layers: every_other keeps (0, 2)


@functools.cache
def teacher():
  """(module, params) of a random 4-layer tiny classifier, 3 classes.

  Shapes from ``eval_shape``, values from numpy: no init program to compile. The scale (0.3, not
  BERT's 0.02) makes attention far from uniform, so the attention terms test something.
  """
  module = BertClassifier(TEACHER, num_classes=3)
  ids = jnp.ones((4, 8), jnp.int32)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), ids, ids)['params'])
  rng = np.random.default_rng(7)
  fill = lambda path, x: jnp.asarray(
      (1.0 if path.endswith('/scale') else 0.0) + 0.3 * rng.standard_normal(x.shape), x.dtype)
  return module, tree.map_with_path(fill, shapes)


# Jitted once, hyperparameters traced: every T and alpha runs the same compiled program (eager
# dispatch would compile each primitive, which dominates a file of tiny computations).
_kd = jax.jit(lambda s, t, y, T, a, w=None: distill.kd_loss(s, t, y, temperature=T, alpha=a,
                                                           weight=w))
_hidden = jax.jit(distill.hidden_loss, static_argnums=2)
_attention = jax.jit(distill.attention_loss, static_argnums=2)


@functools.cache
def forwards():
  """The every_other student's Taps, the layer-by-layer reference, the teacher's Taps.

  One jitted program for all three: compiling is most of this file's run time.
  """
  module, params = teacher()
  student = distill.student_from_teacher(TEACHER, params)
  s_module = BertClassifier(student.cfg, num_classes=3)

  def run(s_params, t_params, b):
    inputs = {k: b[k] for k in distill.BERT_INPUT_KEYS}
    return (distill.run_bert(s_module, s_params, inputs),
            _kept_layers_reference(t_params, b, (0, 2)),
            distill.run_bert(module, t_params, inputs))

  return jax.jit(run)(student.params, params, tinybert.batch())


def _inputs():
  b = tinybert.batch()
  return {k: b[k] for k in distill.BERT_INPUT_KEYS}


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kd_reference(s, t, y, temperature, alpha, weight=None):
  s, t = np.float64(s), np.float64(t)
  log_ps, log_pt = _log_softmax(s / temperature), _log_softmax(t / temperature)
  soft = temperature ** 2 * (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
  hard = -_log_softmax(s)[np.arange(len(y)), y]
  w = np.ones(len(y)) if weight is None else np.float64(weight)
  mean = lambda x: (w * x).sum() / w.sum()
  return alpha * mean(soft) + (1 - alpha) * mean(hard), mean(soft), mean(hard)


def _logits(seed, shape=(6, 5), scale=2.0):
  # numpy, not jax.random: every new shape would compile a random-number program.
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ----------------------------------------------------------------------------- kd_loss


@pytest.mark.parametrize('temperature', [1.0, 2.0, 5.0])
@pytest.mark.parametrize('alpha', [0.0, 0.3, 1.0])
def test_kd_loss_matches_numpy(temperature, alpha):
  s, t = _logits(0), _logits(1)
  y = jnp.array([0, 1, 2, 3, 4, 0])
  loss, parts = _kd(s, t, y, temperature, alpha)
  ref, soft, hard = _kd_reference(s, t, y, temperature, alpha)
  np.testing.assert_allclose([loss, parts['soft'], parts['hard']], [ref, soft, hard], rtol=2e-6)


def test_kd_loss_weight_and_dtype():
  s, t = _logits(0).astype(jnp.bfloat16), _logits(1)
  y = jnp.array([0, 1, 2, 3, 4, 0])
  w = jnp.array([1.0, 1.0, 0.0, 2.0, 0.5, 0.0])
  loss, parts = _kd(s, t, y, 3.0, 0.6, w)
  assert loss.dtype == jnp.float32  # bfloat16 logits, float32 loss
  ref, soft, hard = _kd_reference(np.float32(s), t, y, 3.0, 0.6, w)
  np.testing.assert_allclose([loss, parts['soft'], parts['hard']], [ref, soft, hard], rtol=2e-6)
  # Rows with weight 0 do not matter at all.
  s2 = s.at[2].set(100.0).at[5].set(-100.0)
  np.testing.assert_array_equal(_kd(s2, t, y, 3.0, 0.6, w)[0], loss)


def test_alpha_zero_is_plain_cross_entropy():
  s, t = _logits(2), _logits(3)
  y = jnp.array([4, 3, 2, 1, 0, 1])
  loss, _ = _kd(s, t, y, 4.0, 0.0)
  np.testing.assert_array_equal(loss, optax.softmax_cross_entropy_with_integer_labels(s, y).mean())


def test_soft_gradient_is_analytic_and_comparable_across_temperatures():
  b, c, alpha = 6, 5, 0.7
  # Zero-mean logits: Hinton's high-temperature limit of the soft gradient is then
  # alpha * (s - t) / (c * b), independent of T -- the T^2 factor is what makes it so.
  s, t = _logits(4, (b, c), 1.0), _logits(5, (b, c), 1.0)
  s, t = s - s.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True)
  y = jnp.zeros((b,), jnp.int32)
  soft = lambda s_, t_, T: alpha * distill.kd_loss(s_, t_, y, temperature=T, alpha=alpha)[1]['soft']
  grad = jax.jit(jax.grad(soft, argnums=(0, 1)))
  limit = alpha * (s - t) / (c * b)
  norms = {}
  for temperature in (1.0, 2.0, 4.0, 8.0, 16.0, 64.0):
    g, g_teacher = grad(s, t, temperature)
    analytic = (jax.nn.softmax(s / temperature) - jax.nn.softmax(t / temperature)) * (
        temperature * alpha / b)
    # float32 cancellation in softmax differences: tolerance relative to the largest entry.
    np.testing.assert_allclose(g, analytic, rtol=1e-5, atol=1e-5 * float(jnp.abs(analytic).max()))
    np.testing.assert_array_equal(g_teacher, jnp.zeros_like(t))  # the teacher is a target
    norms[temperature] = float(jnp.linalg.norm(g) / jnp.linalg.norm(limit))
  # The deviation from the limit is O(1/T): 1.3% of the largest entry at T = 64.
  np.testing.assert_allclose(g, limit, rtol=0, atol=0.02 * float(jnp.abs(limit).max()))
  # From T = 2 on the magnitude stays within 10% of the limit (0.94 .. 0.99 here); without the
  # T^2 factor it would shrink 64x between T = 2 and T = 16.
  assert all(0.9 < norms[T] < 1.1 for T in (2.0, 4.0, 8.0, 16.0, 64.0)), norms


# ----------------------------------------------------------------------------- students


def test_student_every_other_copies_teacher_layers_exactly():
  _, params = teacher()
  student = distill.student_from_teacher(TEACHER, params, 'every_other')
  assert student.cfg == dataclasses.replace(TEACHER, num_layers=2)
  assert student.layer_map == (1, 3)
  flat_s, flat_t = tree.flatten(student.params), tree.flatten(params)
  expected = {p for p in flat_t if not any(f'/layer_{j}/' in p for j in (1, 3))}
  assert {p.replace('/layer_1/', '/layer_2/') for p in flat_s} == expected
  for p, leaf in flat_s.items():  # student layer_1 is teacher layer_2; the rest keep their paths
    np.testing.assert_array_equal(leaf, flat_t[p.replace('/layer_1/', '/layer_2/')], err_msg=p)
  # New buffers: donating the student's state (as the train step does) keeps the teacher alive.
  jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(student.params)
  assert all(x.is_deleted() for x in jax.tree.leaves(student.params))
  assert not any(x.is_deleted() for x in jax.tree.leaves(params))


def _kept_layers_reference(params, b, kept):
  """The teacher's own modules, run layer by layer over the ``kept`` layers only."""
  enc = params['encoder']
  x = Embeddings(TEACHER).apply({'params': enc['embeddings']}, b['input_ids'],
                                b['token_type_ids'], True)
  mask_bias = jnp.where(b['attention_mask'][:, None, None, :] > 0, 0.0,
                        jnp.finfo(jnp.float32).min)
  hiddens = []
  for j in kept:
    x = Layer(TEACHER).apply({'params': enc[f'layer_{j}']}, x, mask_bias, True)
    hiddens.append(x)
  pooled = mean_pool(x, b['attention_mask'])
  return nn.Dense(3).apply({'params': params['classifier']}, pooled), hiddens


def test_student_forward_equals_teacher_kept_layers():
  module, params = teacher()
  taps, (logits, hiddens), teacher_taps = forwards()
  np.testing.assert_allclose(taps.logits, logits, rtol=1e-5, atol=1e-6)
  for h, ref in zip(taps.hiddens, hiddens):
    np.testing.assert_allclose(h, ref, rtol=1e-5, atol=1e-5)
  # Layer 0 and everything before it are the teacher's: the same first hidden state.
  np.testing.assert_allclose(taps.hiddens[0], teacher_taps.hiddens[0], rtol=1e-6, atol=1e-6)
  assert len(teacher_taps.hiddens) == len(teacher_taps.attentions) == 4
  probs = teacher_taps.attentions[1]
  assert probs.shape == (4, tinybert.H, 8, 8)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  assert float(probs[0, :, :, 6:].max()) == 0.0  # row 0's padding keys get no attention
  # The sow is a no-op unless 'intermediates' is mutable: the plain forward is unchanged.
  _, state = jax.eval_shape(lambda p: module.apply({'params': p}, **_inputs(), mutable=['moe']),
                            params)
  assert 'intermediates' not in state


def test_student_layers_map_and_moe_renumbering():
  leaf = lambda v: {'kernel': np.full((2,), v, np.float32)}
  params = {'encoder': {'embeddings': leaf(-1), **{f'layer_{j}': leaf(j) for j in range(6)}},
            'classifier': leaf(9)}
  cfg = dataclasses.replace(TEACHER, num_layers=6, moe=MoeConfig(), moe_layers=(1, 3, 5))
  student = distill.student_from_teacher(cfg, params, (1, 3, 4))
  assert [int(student.params['encoder'][f'layer_{i}']['kernel'][0]) for i in range(3)] == [1, 3, 4]
  assert student.layer_map == (2, 3, 5)
  assert student.cfg.moe_layers == (0, 1)
  assert distill.student_from_teacher(cfg, params, range(6)).layer_map == tuple(range(6))
  assert distill.student_from_teacher(cfg, params).layer_map == (1, 3, 5)
  # An encoder tree works as well as a classifier tree.
  from_encoder = distill.student_from_teacher(cfg, params['encoder'], (0,)).params
  assert from_encoder['layer_0']['kernel'][0] == 0
  assert distill.uniform_layer_map(4, 6) == (0, 2, 3, 5)


def test_fresh_student():
  _, params = teacher()
  built = []

  def fresh(key):  # under eval_shape: the same structure, no init program compiled
    built.append(distill.fresh_student(TEACHER, 2, num_classes=3, rng=key))
    return built[-1].params

  shapes = jax.eval_shape(fresh, jax.random.key(3))
  copied = distill.student_from_teacher(TEACHER, params)
  assert built[0].cfg == copied.cfg and built[0].layer_map == (1, 3)
  as_shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert as_shapes(shapes) == as_shapes(copied.params)


# ----------------------------------------------------------------------------- hidden / attention


def test_hidden_loss_matches_numpy():
  rng = np.random.default_rng(0)
  mask = np.ones((3, 5), np.int32)
  mask[0, 3:] = 0
  mask[2, 1:] = 0
  s = [rng.normal(size=(3, 5, 4)).astype(np.float32) for _ in range(2)]
  t = [rng.normal(size=(3, 5, 4)).astype(np.float32) for _ in range(3)]
  got = _hidden(s, t, (1, 2), mask)
  m = mask[..., None].astype(np.float64)
  ref = np.mean([(((s[i] - t[j]) ** 2) * m).sum() / (m.sum() * 4) for i, j in enumerate((1, 2))])
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  # Padding positions do not count.
  s[0][0, 4] += 100.0
  np.testing.assert_allclose(_hidden(s, t, (1, 2), mask), ref, rtol=1e-6)


def test_attention_loss_matches_numpy():
  rng = np.random.default_rng(1)
  b, h, n = 3, 2, 5
  mask = np.ones((b, n), np.int32)
  mask[0, 3:] = 0
  mask[1, 4:] = 0

  def probs():  # like the model: softmax over real keys, exactly 0 on padding keys
    z = rng.normal(size=(b, h, n, n)) * 2
    z = np.where(mask[:, None, None, :] > 0, z, -np.inf)
    return np.float32(np.exp(_log_softmax(z)))

  s, t = [probs() for _ in range(2)], [probs() for _ in range(3)]
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, rest, t_: distill.attention_loss([p, rest], t_, (0, 2), mask)))
  got, g = loss_and_grad(s[0], s[1], t)
  ref = []
  for i, j in enumerate((0, 2)):
    total = 0.0
    for bi in range(b):
      real = mask[bi] > 0
      ps, pt = np.float64(s[i][bi][:, real][:, :, real]), np.float64(t[j][bi][:, real][:, :, real])
      total += (pt * np.log(pt / ps)).sum()
    ref.append(total / (h * mask.sum()))
  np.testing.assert_allclose(got, np.mean(ref), rtol=1e-5)
  # The gradient w.r.t. the student's probabilities is finite despite the zeros at padding keys.
  assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).max()) > 0


def test_losses_are_zero_for_identical_models():
  taps = forwards()[2]
  ident, mask = (0, 1, 2, 3), tinybert.batch()['attention_mask']
  assert float(_hidden(taps.hiddens, taps.hiddens, ident, mask)) == 0.0
  assert float(_attention(taps.attentions, taps.attentions, ident, mask)) == 0.0


# ----------------------------------------------------------------------------- the jitted step


def test_teacher_has_zero_gradient_inside_jitted_step():
  t_module, t_params = teacher()
  student = distill.student_from_teacher(TEACHER, t_params)
  s_module = BertClassifier(student.cfg, num_classes=3)
  loss_fn = distill.make_distill_loss(
      functools.partial(distill.run_bert, s_module), functools.partial(distill.run_bert, t_module),
      temperature=2.0, alpha=0.5, hidden_weight=1.0, attention_weight=1.0,
      layer_map=student.layer_map)
  # Eval mode keeps the program small (dropout's rng plumbing is tested on the linear pair).
  step = jax.jit(jax.value_and_grad(functools.partial(loss_fn, deterministic=True),
                                    argnums=(0, 1), has_aux=True))
  b = tinybert.batch()
  (loss, metrics), (g_student, g_teacher) = step(student.params, t_params, b)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(g_teacher))
  flat = tree.flatten(g_student)
  moving = [p for p, g in flat.items() if np.any(np.asarray(g))]
  assert moving == list(flat)  # every student leaf gets a gradient
  assert set(metrics) >= {'loss', 'soft_loss', 'hard_loss', 'hidden_loss', 'attention_loss',
                          'accuracy', 'agreement'}
  assert float(loss) == float(metrics['loss'])  # no aux_loss
  np.testing.assert_allclose(
      loss, 0.5 * metrics['soft_loss'] + 0.5 * metrics['hard_loss'] + metrics['hidden_loss']
      + metrics['attention_loss'], rtol=1e-6)
  # The teacher's params are an argument, not constants baked into the program: other values
  # change the loss without a recompile.
  other = jax.tree.map(lambda x: x * 1.5, t_params)
  (loss2, _), _ = step(student.params, other, b)
  assert float(loss2) != float(loss)
  assert step._cache_size() == 1


def _toy(params, inputs, rng=None, deterministic=True):
  """A toy encoder with Taps (one-head attention per 'layer'): cheap to compile."""
  x = inputs['x']
  mask = inputs.get('attention_mask', jnp.ones(x.shape[:2]))  # the batch may lack one
  bias = jnp.where(mask[:, None, :] > 0, 0.0, -1e9)
  hiddens, attentions = [], []
  for w in params['layers']:
    probs = jax.nn.softmax(jnp.einsum('bqd,bkd->bqk', x, x) + bias, axis=-1)
    x = jnp.tanh(jnp.einsum('bqk,bkd->bqd', probs, x) @ w)
    hiddens.append(x)
    attentions.append(probs[:, None])  # (batch, heads=1, query, key)
  return distill.Taps(x.mean(1) @ params['head'], tuple(hiddens), tuple(attentions))


def test_distill_loss_terms_and_default_layer_map():
  x = _logits(12, (3, 5, 4), 1.0)
  batch = {'x': x, 'attention_mask': jnp.ones((3, 5), jnp.int32).at[0, 3:].set(0),
           'label': jnp.array([0, 1, 2])}
  layer = lambda seed: _logits(seed, (4, 4), 0.5)
  teacher_p = {'layers': [layer(13), layer(14)], 'head': _logits(15, (4, 3))}
  student_p = {'layers': [layer(16)], 'head': _logits(17, (4, 3))}
  loss_fn = distill.make_distill_loss(_toy, _toy, temperature=3.0, alpha=0.8, hidden_weight=0.5,
                                      attention_weight=2.0, input_keys=('x', 'attention_mask'))
  # One student layer, two teacher layers: the default map is uniform, (1,) -- the last layer.
  loss, metrics = jax.jit(loss_fn, static_argnames='deterministic')(
      student_p, teacher_p, batch, deterministic=True)

  @jax.jit  # the terms one by one (jitted: eager dispatch would compile every primitive)
  def terms(student_p, teacher_p, batch):
    s, t = _toy(student_p, batch), _toy(teacher_p, batch)
    mask = batch['attention_mask']
    kd, _ = distill.kd_loss(s.logits, t.logits, batch['label'], temperature=3.0, alpha=0.8)
    return (kd, distill.hidden_loss(s.hiddens, t.hiddens, (1,), mask),
            distill.attention_loss(s.attentions, t.attentions, (1,), mask))

  kd, hidden, attention = terms(student_p, teacher_p, batch)
  np.testing.assert_allclose([metrics['hidden_loss'], metrics['attention_loss']],
                             [hidden, attention], rtol=1e-5)
  np.testing.assert_allclose(loss, kd + 0.5 * hidden + 2.0 * attention, rtol=1e-5)
  assert float(hidden) > 0 and float(attention) > 0
  # Hidden/attention matching without the attention mask in the batch: a clear error.
  no_mask = {k: v for k, v in batch.items() if k != 'attention_mask'}
  with pytest.raises(UserInputError, match="needs the attention mask: the batch has no "
                                           "'attention_mask'"):
    jax.eval_shape(distill.make_distill_loss(_toy, _toy, temperature=3.0, alpha=0.8,
                                             hidden_weight=0.5, input_keys=('x',)),
                   student_p, teacher_p, no_mask)


def test_any_model_logits_only_and_aux_loss_hook():
  """A non-BERT pair (linear maps with dropout, returning plain logits), an MoE-style aux loss
  hook, and the example weights taken from ``batch['weight']``."""
  def linear(w, inputs, rng=None, deterministic=True):
    x = inputs['x']
    if not deterministic:
      x = x * 2.0 * jax.random.bernoulli(rng, 0.5, x.shape)
    return x @ w

  x, y = _logits(8, (6, 4)), jnp.array([0, 1, 2, 0, 1, 2])
  w = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
  w_student, w_teacher = _logits(9, (4, 3)), _logits(10, (4, 3))
  hook = lambda aux: (jnp.float32(0.25), {'router_z': jnp.float32(1.0)})
  loss_fn = distill.make_distill_loss(linear, linear, temperature=2.0, alpha=0.4, aux_loss=hook,
                                      input_keys=('x',))
  batch = {'x': x, 'label': y, 'weight': w}
  rng = jax.random.key(11)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
      w_student, w_teacher, batch, rng)
  # Training mode: the student gets the rng and drops inputs, the teacher runs in eval mode.
  dropped = x * 2.0 * jax.random.bernoulli(rng, 0.5, x.shape)
  ref, soft, hard = _kd_reference(dropped @ w_student, x @ w_teacher, y, 2.0, 0.4, w)
  np.testing.assert_allclose([metrics['loss'], metrics['soft_loss'], metrics['hard_loss']],
                             [ref, soft, hard], rtol=2e-6)
  np.testing.assert_allclose(loss, metrics['loss'] + 0.25, rtol=1e-6)
  assert float(metrics['router_z']) == 1.0
  assert np.any(np.asarray(grads[0])) and not np.any(np.asarray(grads[1]))
  # Hidden matching needs Taps with hidden states: a clear error, not a None deep inside.
  bad = distill.make_distill_loss(linear, linear, temperature=2.0, alpha=0.5, hidden_weight=1.0,
                                  layer_map=(0,), input_keys=('x',))
  with pytest.raises(UserInputError,
                     match="hidden matching: the student's forward returned no per-layer values"):
    jax.eval_shape(bad, w_student, w_teacher, batch, rng)
  # A forward returning (logits, aux), as train's does with with_aux=True, must be wrapped in Taps.
  pair = lambda w, inputs, **_: (inputs['x'] @ w, {})
  with pytest.raises(UserInputError, match='returned a tuple; valid: the logits array or Taps'):
    jax.eval_shape(distill.make_distill_loss(pair, linear, temperature=2.0, alpha=0.5,
                                             input_keys=('x',)), w_student, w_teacher, batch)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('kwargs, match', [
    (dict(temperature=0.0, alpha=0.5), r'compress\.distill\.temperature=0\.0; valid: a number > 0'),
    (dict(temperature=-1, alpha=0.5), r'compress\.distill\.temperature=-1; valid'),
    (dict(temperature=float('nan'), alpha=0.5), r'compress\.distill\.temperature=nan'),
    (dict(temperature='hot', alpha=0.5), r"compress\.distill\.temperature='hot'; valid: a number"),
    (dict(temperature=2.0, alpha=-0.1), r'distill\.alpha=-0\.1; valid: a number in \[0, 1\]'),
    (dict(temperature=2.0, alpha=1.5), r'compress\.distill\.alpha=1\.5'),
])
def test_bad_hyperparameters(kwargs, match):
  s = _logits(0)
  with pytest.raises(ConfigError, match=match):
    distill.kd_loss(s, s, jnp.zeros((6,), jnp.int32), **kwargs)
  fwd = lambda p, x, **_: p
  with pytest.raises(ConfigError, match=match):
    distill.make_distill_loss(fwd, fwd, **kwargs)


def test_bad_weights_at_build_time():
  fwd = lambda p, x, **_: p
  with pytest.raises(ConfigError,
                     match=r'compress\.distill\.hidden_weight=-1\.0; valid: a number >= 0'):
    distill.make_distill_loss(fwd, fwd, temperature=2.0, alpha=0.5, hidden_weight=-1.0)
  with pytest.raises(ConfigError,
                     match=r'compress\.distill\.layer_map=\(2, 1\): 1 after 2 is not increasing'):
    distill.make_distill_loss(fwd, fwd, temperature=2.0, alpha=0.5, layer_map=(2, 1))


def test_teacher_logits_shape_mismatch_names_both_shapes():
  with pytest.raises(UserInputError, match=r'logits: the student has shape \(6, 5\), the teacher '
                                           r'\(6, 2\)'):
    distill.kd_loss(_logits(0), _logits(1, (6, 2)), jnp.zeros((6,), jnp.int32), temperature=2.0,
                    alpha=0.5)
  # Inside a jitted step it fails while tracing, before anything runs.
  module, params = teacher()
  two_class = BertClassifier(TEACHER, num_classes=2)
  two_params = dict(params, classifier={'kernel': params['classifier']['kernel'][:, :2],
                                        'bias': params['classifier']['bias'][:2]})
  loss_fn = distill.make_distill_loss(functools.partial(distill.run_bert, module),
                                      functools.partial(distill.run_bert, two_class),
                                      temperature=2.0, alpha=0.5)
  with pytest.raises(UserInputError, match=r'student has shape \(4, 3\), the teacher \(4, 2\)'):
    jax.jit(loss_fn)(params, two_params, tinybert.batch(), jax.random.key(0))


@pytest.mark.parametrize('layers, match', [
    ((0, 4), r'compress\.distill\.student_layers=\(0, 4\): index 4 is out of range; valid: '
             r'strictly increasing teacher layer indices in 0\.\.3'),
    ((-1, 2), r'index -1 is out of range'),
    ((2, 1), r'compress\.distill\.student_layers=\(2, 1\): 1 after 2 is not increasing'),
    ((1, 1), r'1 after 1 is not increasing'),
    ((), r'compress\.distill\.student_layers=\(\); valid: at least one'),
    ((0.0, 1.0), r'not all integers'),
    ('every_third', r"student_layers='every_third'; valid: 'every_other' or a tuple"),
])
def test_bad_layers(layers, match):
  _, params = teacher()
  with pytest.raises(ConfigError, match=match):
    distill.student_from_teacher(TEACHER, params, layers)


def test_bad_layer_maps_and_shapes():
  h = [jnp.zeros((2, 3, 4))] * 2
  mask = jnp.ones((2, 3))
  with pytest.raises(ConfigError, match=r'compress\.distill\.layer_map=\(0, 2\): index 2 is out '
                                        r'of range; valid: .* in 0\.\.1'):
    distill.hidden_loss(h, h, (0, 2), mask)
  with pytest.raises(ConfigError, match=r'compress\.distill\.layer_map=\(0,\) has 1 entries; '
                                        r'valid: one teacher layer index per student layer \(2\)'):
    distill.hidden_loss(h, h, (0,), mask)
  with pytest.raises(UserInputError, match=r'hidden states of student layer 0 / teacher layer 0: '
                                           r'the student has shape \(2, 3, 4\), the teacher '
                                           r'\(2, 3, 8\)'):
    distill.hidden_loss(h, [jnp.zeros((2, 3, 8))] * 2, (0, 1), mask)
  with pytest.raises(ConfigError, match=r'student num_layers=5; valid: 1\.\.4'):
    distill.fresh_student(TEACHER, 5, num_classes=3, rng=jax.random.key(0))
  with pytest.raises(UserInputError, match=r'teacher params have encoder layers \[0, 1\]; the '
                                           r'teacher config has num_layers=4'):
    distill.student_from_teacher(TEACHER, {'encoder': {'layer_0': {}, 'layer_1': {}}})
