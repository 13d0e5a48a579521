"""Prefix tuning: exact counts, the hook (None is a no-op, attention reference, padding masked),
reparameterized == materialized, a jitted step that moves only the prefix params and the head."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tinybert
from peftjax import peft
from peftjax import tree
from peftjax.errors import ConfigError
from peftjax.models import BertEncoder
from peftjax.models.bert import SelfAttention
from tinybert import BERT
from tinybert import D
from tinybert import H
from tinybert import L

DH = D // H


@pytest.fixture(scope='module')
def built():
  return tinybert.built()


def _randomize(tree_, seed=3):
  leaves, treedef = jax.tree.flatten(tree_)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def test_counts(built):
  n, hid = 3, 7
  _, p, _ = tinybert.init('prefix', length=n, hidden=hid)
  assert tree.count(p) == n * D + (D * hid + hid) + (hid * L * 2 * D + L * 2 * D)
  shapes = {k: v.shape for k, v in tree.flatten(p).items()}
  assert shapes == {'embedding': (n, D), 'mlp/hidden/kernel': (D, hid), 'mlp/hidden/bias': (hid,),
                    'mlp/out/kernel': (hid, L * 2 * D), 'mlp/out/bias': (L * 2 * D,)}
  _, p, _ = tinybert.init('prefix', length=n, reparam=False)
  assert {k: v.shape for k, v in tree.flatten(p).items()} == {'prefix': (L, 2, n, H, DH)}
  assert tree.count(p) == L * 2 * n * D


def test_hook_none_is_bit_identical(built):
  inputs = tinybert.inputs()
  enc = BertEncoder(BERT)
  ids, mask = inputs['input_ids'], inputs['attention_mask']
  params = {'params': built.params['encoder']}
  np.testing.assert_array_equal(enc.apply(params, ids, mask),
                                enc.apply(params, ids, mask, prefix_kv=None))


def test_attention_with_prefix_matches_reference(built):
  """softmax(q [Pk; k]^T / sqrt(dh) + [0; mask]) [Pv; v], written out by hand."""
  p = built.params['encoder']['layer_0']['attention']
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  mask = jnp.ones((2, 5)).at[0, 3:].set(0)
  bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
  pk, pv = jax.random.normal(jax.random.key(1), (2, 4, H, DH))
  out = SelfAttention(BERT).apply({'params': p}, x, bias, True, prefix_kv=(pk, pv))
  proj = lambda name: jnp.einsum('bld,dhk->blhk', x, p[name]['kernel']) + p[name]['bias']
  q, k, v = proj('query'), proj('key'), proj('value')
  k = jnp.concatenate([jnp.broadcast_to(pk, (2, 4, H, DH)), k], 1)
  v = jnp.concatenate([jnp.broadcast_to(pv, (2, 4, H, DH)), v], 1)
  full_mask = jnp.concatenate([jnp.ones((2, 4)), mask], 1)
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(DH)
  s = jnp.where(full_mask[:, None, None, :] > 0, s, -jnp.inf)
  ctx = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, -1), v)
  ref = jnp.einsum('bqhd,hde->bqe', ctx, p['out']['kernel']) + p['out']['bias']
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_encoder_accepts_stacked_or_per_layer_prefixes(built):
  inputs = tinybert.inputs()
  ids, mask = inputs['input_ids'], inputs['attention_mask']
  params = {'params': built.params['encoder']}
  stacked = jax.random.normal(jax.random.key(0), (L, 2, 3, H, DH))
  enc = BertEncoder(BERT)
  out = enc.apply(params, ids, mask, prefix_kv=stacked)
  assert out.shape == (4, 8, D)  # the output length is unchanged
  pairs = [(stacked[i, 0], stacked[i, 1]) for i in range(L)]
  np.testing.assert_array_equal(enc.apply(params, ids, mask, prefix_kv=pairs), out)
  batched = jnp.broadcast_to(stacked[:, :, None], (L, 2, 4, 3, H, DH))
  np.testing.assert_allclose(enc.apply(params, ids, mask, prefix_kv=batched), out, atol=1e-6)
  assert not np.allclose(out, enc.apply(params, ids, mask), atol=1e-3)
  with pytest.raises(ValueError, match='prefix_kv has 1 layers; the encoder has 2'):
    enc.apply(params, ids, mask, prefix_kv=stacked[:1])


@pytest.mark.parametrize('reparam', [True, False])
def test_padding_stays_masked(built, reparam):
  method, p, _ = tinybert.init('prefix', length=4, reparam=reparam)
  inputs = tinybert.inputs()
  logits = peft.apply(built.module, method, built.params, p, inputs)
  assert not np.allclose(logits, built.module.apply({'params': built.params}, **inputs),
                         atol=1e-4)
  other = dict(inputs, input_ids=inputs['input_ids'].at[0, 7].set(42))  # row 0 padded from 6
  np.testing.assert_allclose(peft.apply(built.module, method, built.params, p, other), logits,
                             atol=1e-6)


def test_reparam_equals_materialized(built):
  method, p, _ = tinybert.init('prefix', length=4, hidden=9)
  p = _randomize(p)
  inputs = tinybert.inputs()
  implicit = peft.apply(built.module, method, built.params, p, inputs)
  fixed = method.materialize(p, built.params)
  assert list(fixed) == ['prefix'] and fixed['prefix'].shape == (L, 2, 4, H, DH)
  # A fresh non-reparam method loads the materialized prefixes without its own init.
  serve, _ = tinybert.method('prefix', length=4, reparam=False)
  np.testing.assert_allclose(peft.apply(built.module, serve, built.params, fixed, inputs),
                             implicit, atol=1e-5)
  # Same rng: the two variants start from the same prefixes.
  m2, p2, _ = tinybert.init('prefix', length=4, hidden=9, reparam=False)
  m1, p1, _ = tinybert.init('prefix', length=4, hidden=9)
  np.testing.assert_allclose(p2['prefix'], m1.materialize(p1, built.params)['prefix'], atol=1e-6)
  assert m2.materialize(p2, built.params)['prefix'] is p2['prefix']


@pytest.mark.parametrize('reparam', [True, False])
def test_jitted_step_moves_prefix_and_head_only(built, reparam):
  method, p, c = tinybert.init('prefix', length=4, hidden=8, reparam=reparam)
  (before, after), _ = tinybert.steps(method, p, c)
  expected = ['base/classifier/bias', 'base/classifier/kernel'] + [f'peft/{k}' for k in
                                                                    tree.flatten(p)]
  assert tinybert.moved(before, after) == sorted(expected)
  assert tree.count(after) == tree.count(p) + D * 3 + 3


def test_merge_raises_and_errors(built):
  method, p, _ = tinybert.init('prefix')
  with pytest.raises(NotImplementedError, match='Prefix.materialize'):
    method.merge(built.params, p)
  with pytest.raises(ConfigError, match=r'peft.prefix.length=0'):
    tinybert.method('prefix', length=0)
  with pytest.raises(ConfigError, match=r'peft.prefix.hidden=-1'):
    tinybert.method('prefix', hidden=-1)
  serve, _ = tinybert.method('prefix', reparam=False)
  with pytest.raises(ValueError, match='Prefix.materialize'):
    peft.apply(built.module, serve, built.params, p, tinybert.inputs())


def test_logical_specs(built):
  method, p, _ = tinybert.init('prefix')
  specs = method.logical_specs(built.logical_specs, p)
  assert tuple(specs['embedding']) == (None, 'embed')
  assert tuple(specs['mlp']['out']['kernel']) == ()
  assert tuple(method.logical_specs(None, method.materialize(p, built.params))['prefix']) == (
      None, None, None, 'heads', 'kv')


@pytest.mark.parametrize('reparam', [True, False])
def test_init_prefixes_are_the_models_own_keys_and_values_of_real_tokens(built, reparam):
  """Li & Liang's init: layer l's prefix keys/values are what layer l computes for n tokens."""
  n = 4
  method, _ = tinybert.method('prefix', length=n, reparam=reparam)
  rng = jax.random.key(7)
  p = method.init(rng, built.module, built.params, tinybert.inputs())
  prefixes = method.materialize(p, built.params)['prefix']  # (L, 2, n, H, DH)
  ids = jax.random.randint(jax.random.split(rng, 3)[2], (1, n), 0, BERT.vocab_size)
  _, state = built.module.apply({'params': built.params}, ids, jnp.ones_like(ids),
                                jnp.zeros_like(ids), capture_intermediates=True,
                                mutable=['intermediates'])
  acts = state['intermediates']['encoder']
  for layer in range(L):
    att = acts[f'layer_{layer}']['attention']
    np.testing.assert_allclose(prefixes[layer, 0], att['key']['__call__'][0][0], atol=1e-4)
    np.testing.assert_allclose(prefixes[layer, 1], att['value']['__call__'][0][0], atol=1e-4)


# ---------------------------------------------------------------------------- refusals
# Models written only here: parameter names like BERT's, but no `prefix_kv` hook.


class LookAlike(nn.Module):
  """encoder/embeddings/word_embeddings + encoder/layer_i/attention/{query,key,value}, as BERT
  names them, but plain attention that takes no prefixes."""

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    x = nn.Embed(100, D, name='encoder/embeddings/word_embeddings')(input_ids)
    for i in range(L):
      proj = lambda name, i=i: nn.DenseGeneral((H, DH), name=f'encoder/layer_{i}/attention/{name}')
      q, k, v = proj('query')(x), proj('key')(x), proj('value')(x)
      s = jnp.einsum('bqhd,bkhd->bhqk', q, k) + jnp.where(attention_mask[:, None, None] > 0, 0.,
                                                          -1e9)
      x = x + jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s), v).reshape(x.shape)
    return nn.Dense(3, name='classifier')(x.mean(1))


class FixedLength(nn.Module):
  """peftjax's BERT encoder (it has the hook) behind a reshape to rows of 8 tokens: it runs on
  length-8 batches only."""

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    ids, mask = input_ids.reshape(-1, 8), attention_mask.reshape(-1, 8)
    hidden = BertEncoder(BERT, name='encoder')(ids, mask)
    return nn.Dense(3, name='classifier')(hidden.mean(1))


def _init_params(model):
  ids = jnp.ones((4, 8), jnp.int32)
  return nn.meta.unbox(model.init(jax.random.key(0), ids, ids)['params'])


def test_look_alike_without_prefix_kv_hook_is_refused():
  model = LookAlike()
  params = _init_params(model)
  # The names the old check relied on are all there ...
  assert 'encoder/layer_1/attention/key/kernel' in {'/'.join(k.split('/')[-5:]) for k in
                                                    tree.flatten(params)}
  method, _ = tinybert.method('prefix', length=4)
  # ... but no module declares the hook: refused at init, naming the hook, the model and what
  # is valid, instead of training prefixes that reach nothing (every gradient 0).
  with pytest.raises(ConfigError, match=r'`prefix_kv` hook.*LookAlike has none.*peftjax\'s '
                     r'BERT.*peft.method=prompt'):
    method.init(jax.random.key(1), model, params, tinybert.inputs())


def test_survey_records_the_hook_owner(built):
  from peftjax.peft import prefix as prefix_lib
  path, s = prefix_lib.hook_owner(built.module, built.params, tinybert.inputs())
  assert path == 'encoder' and s.model == 'BertClassifier'
  assert {'BertEncoder', 'SelfAttention'} <= set(s.called)


def test_init_on_a_length_the_model_refuses_is_a_config_error():
  model = FixedLength()
  params = _init_params(model)
  inputs = tinybert.inputs()
  method, _ = tinybert.method('prefix', length=3)
  with pytest.raises(ConfigError, match=r'peft.prefix.length=3 random tokens.*\(1, 3\).*'
                     r'FixedLength fails on it \(TypeError: cannot reshape'):
    method.init(jax.random.key(1), model, params, inputs)
  # A length it accepts works, and the prefixes change the output.
  method, _ = tinybert.method('prefix', length=8)
  p = method.init(jax.random.key(1), model, params, inputs)
  assert not np.allclose(peft.apply(model, method, params, p, inputs),
                         model.apply({'params': params}, **inputs), atol=1e-5)
