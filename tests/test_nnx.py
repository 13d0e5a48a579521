"""Flax NNX models through :mod:`peftjax.models.nnx_bridge`: the params dict and specs mirror the
model, every layer call is intercepted with this call's weights and a method's own leaves (inside
``nnx.scan`` the one layer's slice), the layer protocol answers like the layers compute, dropout
follows ``deterministic`` and ``rngs``, the methods' implicit forward equals their merge served as
a live NNX model, and ``train_and_evaluate`` trains, checkpoints, resumes and exports LoRA on an
NNX text classifier defined here."""
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import peftjax
import zoo_nnx
from configs import tiny
from peftjax import delta
from peftjax import peft
from peftjax import tasks
from peftjax import train
from peftjax.errors import ConfigError
from peftjax.models.nnx_bridge import NNXModel, einsum_why_not, from_nnx, to_nnx
from peftjax import intercept
from peftjax.peft import layers
from peftjax.tasks.classification import Classification

ENTRY = {e.name: e for e in zoo_nnx.ENTRIES}
shapes = lambda t: jax.tree.map(lambda a: tuple(a.shape), t)


def _entry(name):
  return ENTRY[name].build()


def _perturb(tree, seed=3, scale=0.3):
  """Non-zero values for every leaf (B = 0 at init would hide a wrong forward)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


# ------------------------------------------------------------------ the wrapper
def test_params_and_specs_mirror_the_model_and_apply_equals_its_forward():
  model = zoo_nnx.ScanStack(nnx.Rngs(0, dropout=1))
  built = from_nnx(model, input_keys=('ids',))
  assert isinstance(built.module, NNXModel) and built.source == 'nnx'
  assert built.input_keys == ('ids',)
  p = shapes(built.params)
  assert p['layers']['q'] == {'kernel': (zoo_nnx.L, zoo_nnx.D, zoo_nnx.D), 'bias': (2, 16)}
  assert 'bias' not in p['layers']['k'] and p['embed'] == {'embedding': (zoo_nnx.V, zoo_nnx.D)}
  # Logical names from nnx.with_partitioning, the vmap's layer axis first; P() where none.
  assert built.logical_specs['layers']['q']['kernel'] == P('layers', 'embed', 'heads')
  assert built.logical_specs['layers']['up']['bias'] == P('layers', 'mlp')
  assert built.logical_specs['embed']['embedding'] == P()
  assert jax.tree.structure(built.params) == jax.tree.structure(
      built.logical_specs, is_leaf=lambda x: isinstance(x, P))
  ids = zoo_nnx._ids()  # pylint: disable=protected-access
  out = jax.jit(lambda q: built.module.apply({'params': q}, ids=ids, deterministic=True))(
      built.params)
  eval_model = nnx.clone(model)
  eval_model.eval()
  np.testing.assert_allclose(out, eval_model(ids), rtol=1e-5, atol=1e-6)
  # List indices are str keys; the user's model is never changed by apply.
  lm = zoo_nnx.TiedLM(nnx.Rngs(0))
  lm_built = from_nnx(lm, input_keys=('ids',))
  assert set(lm_built.params['blocks']) == {'0', '1'}
  extra = jax.tree.map(lambda x: x, lm_built.params)
  extra['blocks']['0']['q']['lora_a'] = jnp.zeros((zoo_nnx.D, 2))
  with intercept.intercept_methods(lambda f, a, k, c: f(*a, **k)):
    jax.eval_shape(lambda q: lm_built.module.apply({'params': q}, ids=ids), extra)
  assert type(lm.blocks[0].q) is nnx.Linear and not hasattr(lm.blocks[0].q, 'lora_a')


def test_every_layer_call_is_intercepted_with_its_slice_and_the_injected_leaves():
  """Inside nnx.scan the layer sees its own slice of the stacked kernel and of the method's
  leaves (flat and nested); nnx.Embed.attend is intercepted as 'attend'."""
  module, params, inputs = _entry('nnx_scan_stack')
  p = jax.tree.map(lambda x: x, params)
  p['layers']['q'].update(lora_a=jnp.zeros((zoo_nnx.L, zoo_nnx.D, 2)),
                          ia3_out={'scale': jnp.ones((zoo_nnx.L, zoo_nnx.D))})
  p['layers']['down']['adapter'] = {'down': {'kernel': jnp.zeros((zoo_nnx.L, zoo_nnx.D, 4))}}
  seen = {}

  def spy(next_fun, args, kwargs, context):
    mod = context.module
    seen[(context.method_name, layers.path(mod))] = (layers.kind(mod), shapes(layers.params(mod)))
    return next_fun(*args, **kwargs)

  with intercept.intercept_methods(spy):
    jax.eval_shape(lambda q: module.apply({'params': q}, **inputs, deterministic=True), p)
  d = zoo_nnx.D
  assert seen[('__call__', 'layers/q')] == (
      'dense', {'kernel': (d, d), 'bias': (d,), 'lora_a': (d, 2), 'ia3_out': {'scale': (d,)}})
  assert seen[('__call__', 'layers/down')] == (
      'dense', {'kernel': (zoo_nnx.F, d), 'bias': (d,), 'adapter': {'down': {'kernel': (d, 4)}}})
  assert seen[('__call__', 'embed')] == ('embed', {'embedding': (zoo_nnx.V, d)})
  assert seen[('__call__', 'layers/drop')] == (None, {})
  assert seen[('__call__', '')][0] is None  # the model itself, as linen's root module
  assert len(seen) == 14  # root, embed, layers, its 10 modules, ln_f, head... each once per path
  lm, lm_params, lm_inputs = _entry('nnx_tied_lm')
  seen.clear()
  with intercept.intercept_methods(spy):
    jax.eval_shape(lambda q: lm.apply({'params': q}, **lm_inputs), lm_params)
  assert seen[('attend', 'embed')] == ('embed', {'embedding': (zoo_nnx.V, zoo_nnx.D)})
  assert ('__call__', 'blocks/1/v') in seen


def _mini_lora(scale):
  """A LoRA written only against layers.* (not peftjax's): y = layer(x) + s·(x·A)·B."""
  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    w = layers.params(mod) if layers.kind(mod) == 'dense' else {}
    y = next_fun(*args, **kwargs)
    if 'lora_a' not in w:
      return y
    return y + scale * (args[0] @ w['lora_a']) @ w['lora_b']
  return interceptor


def test_injected_leaves_act_inside_nnx_scan_per_layer_and_get_gradients():
  module, params, inputs = _entry('nnx_scan_stack')
  l, d, r = zoo_nnx.L, zoo_nnx.D, 2
  lora = {'layers': {'v': {'lora_a': jax.random.normal(jax.random.key(1), (l, d, r)),
                           'lora_b': jax.random.normal(jax.random.key(2), (l, r, d))}}}
  combined = jax.tree.map(lambda x: x, params)
  combined['layers']['v'].update(lora['layers']['v'])

  def implicit(c):
    with intercept.intercept_methods(_mini_lora(0.5)):
      return module.apply({'params': c}, **inputs, deterministic=True)

  merged = jax.tree.map(lambda x: x, params)  # W_l + s·A_l·B_l for each layer l
  merged['layers']['v']['kernel'] = params['layers']['v']['kernel'] + 0.5 * jnp.einsum(
      'lir,lro->lio', lora['layers']['v']['lora_a'], lora['layers']['v']['lora_b'])
  want = jax.jit(lambda q: module.apply({'params': q}, **inputs, deterministic=True))(merged)
  got, grads = jax.jit(jax.value_and_grad(lambda c: implicit(c).sum()))(combined)
  np.testing.assert_allclose(jax.jit(implicit)(combined), want, rtol=1e-4, atol=1e-5)
  assert np.isclose(got, want.sum(), rtol=1e-4)
  g = grads['layers']['v']['lora_b']
  assert g.shape == (l, r, d) and all(np.abs(g[i]).sum() > 0 for i in range(l))
  assert np.abs(grads['layers']['q']['kernel']).sum() > 0


# ------------------------------------------------------------------ the layer protocol
def _views(module, params, inputs):
  found = {}

  def spy(next_fun, args, kwargs, context):
    found[layers.path(context.module)] = (context.module, (*args, *kwargs.values())[0])
    return next_fun(*args, **kwargs)

  with intercept.intercept_methods(spy):
    module.apply({'params': params}, **inputs)
  return found


def test_linear_general_and_einsum_contract_the_axes_their_kernels_store():
  """Rebuilding each layer's output from peft_contracted_axes/out_ndim and its kernel proves
  the axes pair with the kernel's dims (equal dims included, where a wrong order is silent)."""
  for name in ('nnx_linear_general', 'nnx_einsum'):
    module, params, inputs = _entry(name)
    for path, (view, x) in _views(module, params, inputs).items():
      if layers.kind(view) != 'dense' or path == 'head':
        continue
      w = layers.params(view)
      axes = layers.contracted_axes(view, x.ndim)
      assert list(axes) == sorted(axes)
      assert layers.out_ndim(view) == w['kernel'].ndim - len(axes)
      y = jax.lax.dot_general(x, w['kernel'], ((axes, tuple(range(len(axes)))), ((), ())))
      if 'bias' in w:
        y = y + w['bias']
      np.testing.assert_allclose(y, view.module(x), rtol=1e-5, atol=1e-5, err_msg=path)
  views = _views(*_entry('nnx_einsum'))
  assert layers.contracted_axes(views['out'][0], 4) == (2, 3)
  assert layers.kind(views['per_head'][0]) is None
  assert 'matmul' in views['per_head'][0].peft_why_not()
  assert einsum_why_not('btd,dh->bth') is None and einsum_why_not('...d,dh->...h') is None
  assert 'kernel' in einsum_why_not('btd,hd->bth')  # the kernel lists its output label first


def test_conv_with_is_the_layers_own_convolution_with_another_kernel():
  module, params, inputs = _entry('nnx_conv')
  views = _views(module, params, inputs)
  for path in ('stem', 'conv'):
    view, x = views[path]
    assert layers.kind(view) == 'conv' and layers.out_ndim(view) == 1
    a = jax.random.normal(jax.random.key(5), (3, 3, x.shape[-1], 2))
    stride, pad = ((2, 2), 'SAME') if path == 'stem' else ((1, 1), 'VALID')
    want = jax.lax.conv_general_dilated(x, a, stride, pad,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    np.testing.assert_allclose(layers.conv_with(view, x, a), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ linen's conventions
def test_dropout_follows_deterministic_and_rngs():
  module, params, inputs = _entry('nnx_mlp')
  run = jax.jit(lambda det, key: module.apply({'params': params}, **inputs, deterministic=det,
                                              rngs={'dropout': key}), static_argnums=0)
  k0, k1 = jax.random.key(0), jax.random.key(1)
  plain = zoo_nnx.Mlp(nnx.Rngs(0, dropout=1))
  np.testing.assert_allclose(run(True, k0), plain(inputs['x'], deterministic=True), rtol=1e-5)
  np.testing.assert_array_equal(run(False, k0), run(False, k0))
  assert not np.allclose(run(False, k0), run(False, k1))
  assert not np.allclose(run(False, k0), run(True, k0))
  # Stacked dropout streams inside nnx.scan are re-keyed per layer (the model has no
  # `deterministic` argument: its Dropout layers get it).
  stack, sp, si = _entry('nnx_scan_stack')
  srun = jax.jit(lambda det, key: stack.apply({'params': sp}, **si, deterministic=det,
                                              rngs={'dropout': key}), static_argnums=0)
  assert not np.allclose(srun(False, k0), srun(False, k1))
  np.testing.assert_array_equal(srun(True, k0), srun(True, k1))


def test_linen_return_conventions():
  module, params, inputs = _entry('nnx_conv')
  out = module.apply({'params': params}, **inputs)
  out2, state = module.apply({'params': params}, **inputs, mutable=['moe'])
  np.testing.assert_array_equal(out, out2)
  assert state == {'moe': {}}
  _, state = module.apply({'params': params}, **inputs, mutable=['moe', 'intermediates'],
                          capture_intermediates=True)
  assert state == {'moe': {}, 'intermediates': {}}
  assert peft.takes_deterministic(module)
  with pytest.raises(TypeError, match='apply'):
    module(**inputs)
  with pytest.raises(ValueError, match='head/bias'):
    module.apply({'params': {k: v for k, v in params.items() if k != 'head'}}, **inputs)


# ------------------------------------------------------------------ peftjax's methods
def _method(entry, name):
  cfg = peftjax.config('quickstart')
  cfg.peft.method = name
  cfg.peft.head = entry.head or '^$'
  cfg.peft.update_from_flattened_dict(entry.overrides(name))
  return peft.build(cfg.peft)


@pytest.mark.parametrize('entry,method', [
    ('nnx_scan_stack', 'lora'), ('nnx_tied_lm', 'lora'), ('nnx_linear_general', 'ia3'),
    ('nnx_conv', 'lora'), ('nnx_einsum', 'lora'), ('nnx_mlp', 'dora')])
def test_methods_implicit_forward_equals_their_merge_served_as_a_live_nnx_model(entry, method):
  e = ENTRY[entry]
  module, params, inputs = e.build()
  m = _method(e, method)
  init = m.init(jax.random.key(0), module, params, inputs)
  base = jax.jit(lambda p: module.apply({'params': p}, **inputs, deterministic=True))
  fwd = jax.jit(lambda p, q: peft.apply(module, m, p, q, inputs))
  np.testing.assert_allclose(fwd(params, init), base(params), rtol=1e-5, atol=1e-5)  # identity
  trained = _perturb(init)
  merged = m.merge(params, trained)
  implicit = fwd(params, trained)
  assert not np.allclose(implicit, base(params), atol=1e-3)
  np.testing.assert_allclose(implicit, base(merged), rtol=1e-4, atol=1e-4)
  served = to_nnx(module, merged)  # the user's own classes, the merged weights
  assert type(served) is e.build.model_class
  served.eval()
  mode = {'deterministic': True} if module.takes_deterministic else {}  # Mlp's own argument
  np.testing.assert_allclose(nnx.jit(lambda s, x: s(**x, **mode))(served, inputs), implicit,
                             rtol=1e-4, atol=1e-4)


def test_scanned_lora_factors_are_per_layer_and_shard_on_the_layer_axis():
  e = ENTRY['nnx_scan_stack']
  module, params, inputs = e.build()
  m = _method(e, 'lora')
  lora = m.init(jax.random.key(0), module, params, inputs)
  assert shapes(lora['layers']['q']) == {'lora_a': (2, 16, 2), 'lora_b': (2, 2, 16)}
  specs = from_nnx(zoo_nnx.ScanStack(nnx.Rngs(0)), input_keys=('ids',)).logical_specs
  lspecs = m.logical_specs(specs, lora)
  assert lspecs['layers']['q']['lora_a'] == P('layers', 'embed', None)
  assert lspecs['layers']['q']['lora_b'] == P('layers', None, 'heads')


def test_lora_on_a_batched_einsum_is_refused_naming_why():
  e = ENTRY['nnx_einsum_batched']
  module, params, inputs = e.build()
  with pytest.raises(ConfigError, match='matmul'):
    _method(e, 'lora').init(jax.random.key(0), module, params, inputs)


# ------------------------------------------------------------------ the trainer
VOCAB = 1024


class TextClassifier(nnx.Module):
  """A small NNX text classifier: embedding (ids mod VOCAB), a multi-axis projection and its
  inverse, an FFN with dropout, a masked mean pool, a head."""

  def __init__(self, num_classes: int, rngs: nnx.Rngs, width: int = 32):
    self.embed = nnx.Embed(VOCAB, width, rngs=rngs)
    self.split = nnx.LinearGeneral(width, (4, 8), rngs=rngs)
    self.join = nnx.LinearGeneral((4, 8), width, axis=(-2, -1), rngs=rngs)
    self.up = nnx.Linear(width, 2 * width, rngs=rngs)
    self.down = nnx.Linear(2 * width, width, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, input_ids, attention_mask):
    x = self.embed(input_ids % VOCAB)
    x = x + self.join(jnp.tanh(self.split(x)))
    x = x + self.down(self.drop(nnx.gelu(self.up(x))))
    m = attention_mask[..., None].astype(x.dtype)
    return self.head((x * m).sum(1) / jnp.maximum(m.sum(1), 1.0))


class NnxTextTask(Classification):
  """The classification task with the model above: the only thing a user writes."""
  name = 'nnx_text_test'

  def build_model(self, config, data):
    model = TextClassifier(data.info.num_classes, nnx.Rngs(config.seed, dropout=config.seed + 1))
    return from_nnx(model, input_keys=('input_ids', 'attention_mask'))

  def sample_inputs(self, built, data):  # the text task's dummy batch has token_type_ids too
    inputs = super().sample_inputs(built, data)
    return {k: inputs[k] for k in built.input_keys}


tasks.register('nnx_text_test', NnxTextTask)


def _nnx_config():
  c = tiny.get_config()
  c.task = 'nnx_text_test'
  c.peft.method = 'lora'
  c.peft.lora.targets = r'(join|up|down)/kernel$'
  c.peft.lora.rank = 4
  c.peft.head = r'^head/'
  c.optim.learning_rate = 3e-3
  c.train.eval_every = 0
  c.train.checkpoint_every = 4
  c.train.save_adapter = True
  c.train.eval_before = False
  c.data.max_eval_examples = 32
  return c


def test_train_and_evaluate_trains_checkpoints_resumes_and_exports_lora_on_an_nnx_model(tmp_path):
  config = _nnx_config()
  full = tmp_path / 'full'
  summary = train.train_and_evaluate(config, str(full))
  # LoRA on join (4x8 -> 32), up (32 -> 64), down (64 -> 32) at rank 4, and the head 32 -> 2.
  r = 4
  want = r * (32 + 32) + r * (32 + 64) + r * (64 + 32) + 32 * 2 + 2
  assert summary['trainable_params'] == want
  params, manifest = delta.load_delta(full / 'adapter.safetensors')
  assert manifest['method'] == 'lora' and manifest['params']['sha256'] == summary['trainable_sha256']
  lora = params['peft']
  assert set(lora) == {'join', 'up', 'down'}
  assert lora['join']['lora_a'].shape == (4, 8, r) and lora['join']['lora_b'].shape == (r, 32)
  assert np.abs(lora['up']['lora_b']).sum() > 0  # B left its zero init: LoRA trained
  # Resume: a run that has only the step-4 checkpoint continues to the same final weights.
  ckpts = sorted(p.name for p in (full / 'checkpoints').iterdir())
  assert '4' in ckpts, ckpts
  part = tmp_path / 'part'
  shutil.copytree(full, part, ignore=shutil.ignore_patterns('8', 'summary.json', 'adapter.*'))
  resumed = train.train_and_evaluate(config, str(part))
  assert resumed['trainable_sha256'] == summary['trainable_sha256']
  # The exported adapter served: merged into the base, as a live NNX model of the user's class,
  # equal to the implicit forward the run trained with.
  built = NnxTextTask(config).build_model(config, _Data(2))
  base = {**built.params, **params['base']}  # the trained head over the (seeded) frozen base
  method = peft.build(config.peft)
  served = to_nnx(built, method.merge(base, lora))
  assert type(served) is TextClassifier
  served.eval()
  inputs = {'input_ids': jnp.arange(32).reshape(2, 16) * 37, 'attention_mask': jnp.ones((2, 16))}
  implicit = peft.apply(built.module, method, base, lora, inputs)
  np.testing.assert_allclose(served(**inputs), implicit, rtol=1e-4, atol=1e-4)
  assert 0.0 <= summary['accuracy_after'] <= 1.0


class _Data:
  def __init__(self, num_classes):
    self.info = type('Info', (), {'num_classes': num_classes})()


def test_readme_example_a_users_nnx_model_in_a_few_lines():
  """The README's NNX snippet, run as the README prints it (plus checks on what it made)."""
  text = (pathlib.Path(__file__).resolve().parents[1] / 'README.md').read_text()
  section = text[text.index('### Flax NNX models'):]
  code = re.search(r'```python\n(.*?)```', section, flags=re.S).group(1)
  scope = {}
  exec(compile(code, 'README.md', 'exec'), scope)  # pylint: disable=exec-used
  lora, built, method, inputs, logits, served = (
      scope[k] for k in ('lora', 'built', 'method', 'inputs', 'logits', 'served'))
  pj, Classifier = scope['pj'], scope['Classifier']
  assert shapes(lora) == {'ffn': {'lora_a': (32, 8), 'lora_b': (8, 32)}}
  assert type(served) is Classifier
  np.testing.assert_allclose(served(**inputs), logits, rtol=1e-5, atol=1e-6)
  trained = _perturb(lora)
  np.testing.assert_allclose(to_nnx(built, pj.merge(method, built.params, trained))(**inputs),
                             pj.apply(built.module, method, built.params, trained, inputs),
                             rtol=1e-4, atol=1e-5)
