"""Bottleneck adapters: exact counts per kind, identity at init, a jitted step, errors, no merge."""
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
from tinybert import D
from tinybert import L

M = 4  # bottleneck width in these tests
KINDS = ('houlsby', 'pfeiffer', 'parallel')


@pytest.fixture(scope='module')
def built():
  return tinybert.built()


_batch = tinybert.batch


def _inputs(built):
  return tinybert.inputs()


def _init(built, **kw):
  return tinybert.init('adapter', **{'size': M, **kw})


def _randomize(tree_, seed=3):
  leaves, treedef = jax.tree.flatten(tree_)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


ONE = D * M + M + M * D + D  # down (kernel, bias) + up (kernel, bias)


@pytest.mark.parametrize('kind,sites', [
    ('houlsby', ('attention/out', 'output')),
    ('pfeiffer', ('output',)),
    ('parallel', ('output',)),
])
def test_sites_and_exact_count(built, kind, sites):
  _, ad, _ = _init(built, kind=kind)
  flat = tree.flatten(ad)
  expected = {}
  for i in range(L):
    for s in sites:
      pre = f'encoder/layer_{i}/{s}/adapter'
      expected.update({f'{pre}/down/kernel': (D, M), f'{pre}/down/bias': (M,),
                       f'{pre}/up/kernel': (M, D), f'{pre}/up/bias': (D,)})
  assert {p: x.shape for p, x in flat.items()} == expected
  assert tree.count(ad) == L * len(sites) * ONE
  assert all(np.all(np.asarray(x) == 0) for p, x in flat.items() if '/up/' in p)


@pytest.mark.parametrize('kind', KINDS)
@pytest.mark.parametrize('activation', ['gelu', 'relu'])
def test_output_unchanged_at_init(built, kind, activation):
  method, ad, _ = _init(built, kind=kind, activation=activation)
  inputs = _inputs(built)
  base = built.module.apply({'params': built.params}, **inputs)
  np.testing.assert_array_equal(peft.apply(built.module, method, built.params, ad, inputs), base)


def test_kinds_differ_once_trained(built):
  # With the same nonzero adapter weights, the three placements compute different functions.
  inputs = _inputs(built)
  outs = {}
  for kind in ('pfeiffer', 'parallel'):
    method, ad, _ = _init(built, kind=kind)
    outs[kind] = np.asarray(peft.apply(built.module, method, built.params, _randomize(ad), inputs))
  base = np.asarray(built.module.apply({'params': built.params}, **inputs))
  assert not np.allclose(outs['pfeiffer'], base, atol=1e-4)
  assert not np.allclose(outs['parallel'], base, atol=1e-4)
  assert not np.allclose(outs['pfeiffer'], outs['parallel'], atol=1e-4)


def test_parallel_reads_ffn_input(built):
  """The parallel branch equals a manual up(act(down(x))) on the FFN input, added to its output."""
  method, ad, _ = _init(built, kind='parallel', activation='relu')
  ad = _randomize(ad)
  inputs = _inputs(built)
  seen = {}

  def spy(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    path = '/'.join(context.module.path)
    if context.method_name == '__call__' and path in ('encoder/layer_1/intermediate',
                                                      'encoder/layer_1/output'):
      seen[path] = (args[0], y)
    return y

  # The outer interceptor wraps the inner one, so the spy (outer) sees the output *after* the
  # adapter interceptor (inner) added its branch.
  with nn.intercept_methods(spy), method.intercept(ad):
    built.module.apply({'params': built.params}, **inputs)
  x = seen['encoder/layer_1/intermediate'][0]
  h_in, y = seen['encoder/layer_1/output']
  out_p = tree.flatten(built.params)
  ffn = h_in @ out_p['encoder/layer_1/output/kernel'] + out_p['encoder/layer_1/output/bias']
  p = ad['encoder']['layer_1']['output']['adapter']
  hidden = jax.nn.relu(x @ p['down']['kernel'] + p['down']['bias'])
  branch = hidden @ p['up']['kernel'] + p['up']['bias']
  np.testing.assert_allclose(y, ffn + branch, atol=1e-5)


@pytest.mark.parametrize('kind', KINDS)
def test_jitted_step_moves_adapters_not_base(built, kind):
  method, ad, c = _init(built, kind=kind)
  # No decay: decay alone would move `down` while its gradient is zero.
  (before, after, after2), _ = tinybert.steps(method, ad, c, n=2, weight_decay=0.0)
  # Everything moves except `down`, whose gradient is exactly zero while `up` is still zero.
  assert tinybert.moved(before, after) == sorted(
      p for p in tree.flatten(before) if '/adapter/down/' not in p)
  assert sorted(tree.flatten(before['base'])) == ['classifier/bias', 'classifier/kernel']
  # A second step: `down` now gets a gradient too.
  assert all(p in tinybert.moved(after, after2) for p in tree.flatten(after)
             if '/adapter/down/kernel' in p)


def test_no_match_is_an_error(built):
  with pytest.raises(ConfigError, match=r"peft.adapter.ffn_targets='/outptu\$'.*closest module "
                                        r"paths: \[.*output"):
    _init(built, ffn_targets='/outptu$')
  with pytest.raises(ConfigError, match=r'peft.adapter.attn_targets'):
    _init(built, attn_targets='attention/output$')
  with pytest.raises(ConfigError, match=r'peft.adapter.ffn_inputs'):
    _init(built, kind='parallel', ffn_inputs='/interm$')


@pytest.mark.parametrize('field,value', [('kind', 'serial'), ('size', 0), ('activation', 'tanh')])
def test_bad_config_values(built, field, value):
  with pytest.raises(ConfigError, match=f'peft.adapter.{field}={value!r}'):
    _init(built, **{field: value})


def test_merge_is_not_supported(built):
  method, ad, _ = _init(built)
  with pytest.raises(NotImplementedError, match="'adapter'.*cannot be merged"):
    method.merge(built.params, ad)


def test_logical_specs(built):
  method, ad, _ = _init(built)
  specs = tree.flatten(method.logical_specs(built.logical_specs, ad))
  assert tuple(specs['encoder/layer_0/attention/out/adapter/down/kernel']) == ('embed', None)
  assert tuple(specs['encoder/layer_0/output/adapter/up/kernel']) == (None, 'embed')
  assert tuple(specs['encoder/layer_0/output/adapter/up/bias']) == ('embed',)


@pytest.mark.parametrize('kind,n_sites', [('houlsby', 2), ('pfeiffer', 1), ('parallel', 1)])
def test_minilm_count(minilm, kind, n_sites):
  cfg, _ = minilm
  model = BertClassifier(cfg, num_classes=2)
  ids = jnp.ones((2, 8), jnp.int32)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), ids, ids)['params'])
  method, _ = tinybert.method('adapter', kind=kind, size=64)
  ad = jax.eval_shape(lambda: method.init(jax.random.key(0), model, params,
                                          {'input_ids': ids, 'attention_mask': ids}))
  assert tree.count(ad) == 6 * n_sites * (384 * 64 + 64 + 64 * 384 + 384)
