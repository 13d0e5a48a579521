"""Prompt tuning: exact counts, the hook (None is a no-op, n + L outputs, padding masked), a jitted
step that moves only the prompts and the head, 'vocab'/'text' init, errors."""
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
from peftjax.models import BertConfig
from peftjax.models import BertEncoder
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
  with pytest.raises(ConfigError, match=r'peft.prompt.init_text=.*vocabulary'):
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
