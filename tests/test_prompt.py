"""Prompt tuning: exact counts, the hook (None is a no-op, n + L outputs, padding masked), a jitted
step that moves only the prompts and the head, 'vocab'/'text' init, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tinybert
from peftjax import peft
from peftjax import tree
from peftjax.errors import ConfigError
from peftjax.models import BertClassifier
from peftjax.models import BertConfig
from peftjax.models import BertEncoder
from peftjax.peft import hooks
from peftjax.peft import prompt as prompt_lib
from tinybert import BERT
from tinybert import D


@pytest.fixture(scope='module')
def built():
  return tinybert.built()


def _encoder_params(built):
  return built.params['encoder']


def test_count_and_vocab_init(built):
  _, p, _ = tinybert.init('prompt', length=5)
  assert tree.count(p) == 5 * D
  assert p['prompt'].shape == (5, D)
  # Every prompt is a copy of some row of the word-embedding table.
  table = np.asarray(built.params['encoder']['embeddings']['word_embeddings']['embedding'])
  for row in np.asarray(p['prompt']):
    assert (np.abs(table - row).max(axis=1) == 0).any()


def test_hook_none_is_bit_identical(built):
  inputs = tinybert.inputs()
  enc = BertEncoder(BERT)
  ids, mask = inputs['input_ids'], inputs['attention_mask']
  plain = enc.apply({'params': _encoder_params(built)}, ids, mask)
  hooked = enc.apply({'params': _encoder_params(built)}, ids, mask, prompt_embeds=None)
  np.testing.assert_array_equal(plain, hooked)
  np.testing.assert_array_equal(built.module.apply({'params': built.params}, **inputs),
                                peft.apply(built.module, peft.Method(None), built.params, {},
                                           inputs))


def test_encoder_output_is_prompts_then_tokens(built):
  inputs = tinybert.inputs()
  ids, mask = inputs['input_ids'], inputs['attention_mask']
  prompts = jax.random.normal(jax.random.key(0), (3, D))
  enc = BertEncoder(BERT)
  out = enc.apply({'params': _encoder_params(built)}, ids, mask, prompt_embeds=prompts)
  assert out.shape == (4, 3 + 8, D)
  # A batched (B, n, D) prompt equal in every row gives the same result.
  batched = jnp.broadcast_to(prompts, (4, 3, D))
  np.testing.assert_array_equal(
      enc.apply({'params': _encoder_params(built)}, ids, mask, prompt_embeds=batched), out)
  # The prompts change the real tokens' states (they are attended to).
  plain = enc.apply({'params': _encoder_params(built)}, ids, mask)
  assert not np.allclose(out[:, 3:], plain, atol=1e-3)


def test_model_changes_with_prompts_and_padding_stays_masked(built):
  method, p, _ = tinybert.init('prompt', length=4)
  inputs = tinybert.inputs()
  base = built.module.apply({'params': built.params}, **inputs)
  logits = peft.apply(built.module, method, built.params, p, inputs)
  assert logits.shape == (4, 3)
  assert not np.allclose(logits, base, atol=1e-4)  # prompt tuning is NOT the identity at init
  # Row 0 is padded from position 6: changing a padded token's id changes nothing.
  other = dict(inputs, input_ids=inputs['input_ids'].at[0, 7].set(42))
  np.testing.assert_allclose(peft.apply(built.module, method, built.params, p, other), logits,
                             atol=1e-6)
  # ... while changing a real token does.
  real = dict(inputs, input_ids=inputs['input_ids'].at[0, 2].set(42))
  assert not np.allclose(peft.apply(built.module, method, built.params, p, real)[0], logits[0],
                         atol=1e-4)


def test_jitted_step_moves_prompts_and_head_only(built):
  method, p, c = tinybert.init('prompt', length=4)
  (before, after), _ = tinybert.steps(method, p, c)
  assert tinybert.moved(before, after) == ['base/classifier/bias', 'base/classifier/kernel',
                                           'peft/prompt']
  assert tree.count(after) == 4 * D + D * 3 + 3


def test_text_init_equals_token_embeddings():
  text = 'a great movie'
  ids = prompt_lib.text_token_ids(text)
  assert ids.size == 3 and ids.min() > 102  # real word pieces, no [CLS]=101 / [SEP]=102
  # A model with the bundled tokenizer's vocabulary (tiny otherwise).
  cfg = BertConfig(vocab_size=30522, hidden_size=8, num_layers=1, num_heads=2,
                   intermediate_size=16, max_position=16)
  model = BertClassifier(cfg, num_classes=2)
  x = jnp.ones((2, 4), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), x, x)['params'])
  method, _ = tinybert.method('prompt', length=7, init='text',
                              init_text=text)
  p = method.init(jax.random.key(1), model, params, {'input_ids': x, 'attention_mask': x})
  table = params['encoder']['embeddings']['word_embeddings']['embedding']
  expected = table[np.array([ids[0], ids[1], ids[2], ids[0], ids[1], ids[2], ids[0]])]
  np.testing.assert_array_equal(p['prompt'], expected)
  # Cut to n when the text is longer.
  method, _ = tinybert.method('prompt', length=2, init='text', init_text=text)
  p = method.init(jax.random.key(1), model, params, {'input_ids': x, 'attention_mask': x})
  np.testing.assert_array_equal(p['prompt'], table[ids[:2]])


def test_text_init_out_of_vocab_is_a_config_error(built):
  with pytest.raises(ConfigError, match=r"init='text'.*MiniLM tokenizer \(30522 ids\).*100 rows"):
    tinybert.init('prompt', init='text', init_text='wonderful')


def test_config_errors():
  with pytest.raises(ConfigError, match=r'peft.prompt.length=0'):
    tinybert.method('prompt', length=0)
  with pytest.raises(ConfigError, match=r"peft.prompt.init='random'.*'vocab', 'text'"):
    tinybert.method('prompt', init='random')
  with pytest.raises(ConfigError, match=r'prompt.init_text'):
    tinybert.method('prompt', init='text')


def test_merge_raises(built):
  method, p, _ = tinybert.init('prompt')
  with pytest.raises(NotImplementedError, match='prompt tuning cannot be merged'):
    method.merge(built.params, p)


def test_logical_specs(built):
  method, p, _ = tinybert.init('prompt')
  assert tuple(method.logical_specs(built.logical_specs, p)['prompt']) == (None, 'embed')


# ---------------------------------------------------------------------------- the generic hook
# Models written only here, as users write them: no `prompt_embeds` hook, names unlike BERT's.

V, DT, C = 50, 8, 3  # vocabulary, width, classes of the small text model


class TextModel(nn.Module):
  """nn.Embed -> two Dense layers -> a mask-aware mean pool -> a head."""

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    x = nn.Embed(V, DT, name='tok')(input_ids)
    x = nn.gelu(nn.Dense(16, name='up')(x))
    x = nn.Dense(DT, name='down')(x)
    m = attention_mask[..., None].astype(x.dtype)
    pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    return nn.Dense(C, name='head')(pooled)


class PositionTable(nn.Module):
  """Adds a learned position table sized from the ids' length: cannot take extra positions."""

  @nn.compact
  def __call__(self, input_ids, attention_mask):
    x = nn.Embed(V, DT, name='tok')(input_ids)
    pos = self.param('pos', nn.initializers.normal(0.02), (16, DT))
    x = x + pos[:input_ids.shape[1]]
    return nn.Dense(C, name='head')((x * attention_mask[..., None]).mean(1))


def _text_setup(model=None):
  model = model or TextModel()
  ids = (jnp.arange(24, dtype=jnp.int32).reshape(4, 6) * 7) % V
  mask = jnp.ones_like(ids).at[0, 4:].set(0).at[2, 5:].set(0)
  params = model.init(jax.random.key(0), ids, mask)['params']
  return model, params, {'input_ids': ids, 'attention_mask': mask}


def _text_reference(params, prompts, inputs):
  """TextModel's forward written out by hand with the prompts prepended to the embeddings and
  ones to the mask."""
  ids, mask = inputs['input_ids'], inputs['attention_mask']
  n = prompts.shape[0]
  x = params['tok']['embedding'][ids]
  x = jnp.concatenate([jnp.broadcast_to(prompts, (ids.shape[0], n, DT)), x], axis=1)
  m = jnp.concatenate([jnp.ones((ids.shape[0], n)), mask], axis=1)[..., None]
  dense = lambda name, h: h @ params[name]['kernel'] + params[name]['bias']
  x = dense('down', nn.gelu(dense('up', x)))
  return dense('head', (x * m).sum(1) / m.sum(1))


def test_survey_finds_the_input_embedding_and_mask():
  model, params, inputs = _text_setup()
  s = hooks.survey(model, params, inputs)
  assert (s.embed_path, s.embed_shape, s.token_input, s.mask_inputs) == (
      'tok', (V, DT), 'input_ids', ('attention_mask',))
  assert s.hooks == {} and s.called[0] == 'TextModel'


def test_generic_hook_equals_hand_prepended_reference():
  model, params, inputs = _text_setup()
  method, _ = tinybert.method('prompt', length=3)
  p = method.init(jax.random.key(1), model, params, inputs)
  assert p['prompt'].shape == (3, DT)
  # 'vocab' init: random rows of the input embedding's table.
  table = np.asarray(params['tok']['embedding'])
  for row in np.asarray(p['prompt']):
    assert (np.abs(table - row).max(axis=1) == 0).any()
  base = model.apply({'params': params}, **inputs)
  out = peft.apply(model, method, params, p, inputs)
  assert not np.allclose(out, base, atol=1e-4)  # the prompts change the output at init
  np.testing.assert_allclose(out, _text_reference(params, p['prompt'], inputs), atol=1e-5)
  # Random prompts too (not only vocabulary rows), and under jit.
  q = {'prompt': jax.random.normal(jax.random.key(2), (3, DT))}
  jitted = jax.jit(lambda q_: peft.apply(model, method, params, q_, inputs))
  np.testing.assert_allclose(jitted(q), _text_reference(params, q['prompt'], inputs), atol=1e-5)
  # Padding stays masked: a padded token's id changes nothing.
  other = dict(inputs, input_ids=inputs['input_ids'].at[0, 5].set(3))
  np.testing.assert_allclose(peft.apply(model, method, params, p, other), out, atol=1e-6)


def test_generic_hook_gradients_and_training():
  model, params, inputs = _text_setup()
  method, _ = tinybert.method('prompt', length=3)
  p = method.init(jax.random.key(1), model, params, inputs)
  labels = jnp.array([0, 1, 2, 1])

  def loss(p_):
    logits = peft.apply(model, method, params, p_, inputs)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()

  g = jax.grad(loss)(p)['prompt']
  assert g.shape == (3, DT) and bool(jnp.all(g != 0))  # every prompt entry gets a gradient
  tx = optax.adam(0.1)

  @jax.jit
  def step(p_, opt):
    updates, opt = tx.update(jax.grad(loss)(p_), opt)
    return optax.apply_updates(p_, updates), opt

  opt, losses = tx.init(p), [float(loss(p))]
  for _ in range(5):
    p, opt = step(p, opt)
    losses.append(float(loss(p)))
  assert losses[-1] < losses[0] - 0.01, losses


def test_per_token_outputs_have_n_more_positions_and_drop_prompts_strips_them():
  class PerToken(nn.Module):
    @nn.compact
    def __call__(self, input_ids, attention_mask):
      return nn.Dense(2, name='out')(nn.Embed(V, DT, name='tok')(input_ids)) * attention_mask[
          ..., None]

  model, params, inputs = _text_setup(PerToken())
  method, _ = tinybert.method('prompt', length=3)
  p = method.init(jax.random.key(1), model, params, inputs)
  out = peft.apply(model, method, params, p, inputs)
  assert out.shape == (4, 3 + 6, 2)
  np.testing.assert_allclose(prompt_lib.drop_prompts(out, 6),
                             model.apply({'params': params}, **inputs), atol=1e-6)


def test_model_that_cannot_take_extra_positions_is_refused():
  model, params, inputs = _text_setup(PositionTable())
  method, _ = tinybert.method('prompt', length=3)
  with pytest.raises(ConfigError, match=r'PositionTable cannot run with 3 extra positions.*'
                     r"'tok'.*prompt_embeds"):
    method.init(jax.random.key(1), model, params, inputs)


def test_model_without_an_input_embedding_is_refused():
  class Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(x)

  x = jnp.ones((2, 4))
  model = Dense()
  params = model.init(jax.random.key(0), x)['params']
  method, _ = tinybert.method('prompt', length=3)
  with pytest.raises(ConfigError, match=r'needs an input embedding.*Dense calls none'):
    method.init(jax.random.key(1), model, params, {'x': x})


def test_bert_keeps_its_prompt_embeds_hook(built):
  """BERT declares the hook: it is used (real tokens keep their positions), not the generic
  prepend, and no mask input is extended by the method."""
  method, p, _ = tinybert.init('prompt', length=4)
  report = {}
  with prompt_lib.prompt_scope(p['prompt'], report):
    logits = built.module.apply({'params': built.params}, **tinybert.inputs())
  assert report == {'mode': 'hook', 'embedded': [], 'masks': []}
  np.testing.assert_array_equal(logits, peft.apply(built.module, method, built.params, p,
                                                   tinybert.inputs()))


def test_generic_hook_on_an_nnx_model():
  """The same text model in NNX, through peftjax.models.nnx_bridge: equal to the reference."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  nnx_bridge = pytest.importorskip('peftjax.models.nnx_bridge')

  class NText(nnx.Module):
    def __init__(self, rngs):
      self.tok = nnx.Embed(V, DT, rngs=rngs)
      self.up, self.down = nnx.Linear(DT, 16, rngs=rngs), nnx.Linear(16, DT, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.head = nnx.Linear(DT, C, rngs=rngs)

    def __call__(self, input_ids, attention_mask):
      x = self.down(nnx.gelu(self.up(self.tok(input_ids))))
      m = attention_mask[..., None].astype(x.dtype)
      return self.head(self.drop((x * m).sum(1) / jnp.maximum(m.sum(1), 1.0)))

  b = nnx_bridge.from_nnx(NText(nnx.Rngs(0)), input_keys=('input_ids', 'attention_mask'))
  _, _, inputs = _text_setup()
  method, _ = tinybert.method('prompt', length=3)
  p = method.init(jax.random.key(1), b.module, b.params, inputs)
  out = peft.apply(b.module, method, b.params, p, inputs)
  np.testing.assert_allclose(out, _text_reference(b.params, p['prompt'], inputs), atol=1e-5)
  # A training forward (dropout on) runs too, and the prompts get gradients.
  g = jax.grad(lambda q: peft.apply(b.module, method, b.params, q, inputs, rng=jax.random.key(3),
                                    deterministic=False).sum())(p)['prompt']
  assert bool(jnp.all(g != 0))
