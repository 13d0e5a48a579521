"""Every (model, method) pair of the zoo (``tests/zoo.py``, ``tests/zoo_nnx.py``): what a method
claims it holds on any model, checked against references computed here from the factors.

For every claimed pair: identity at init; after perturbing the method's parameters, the implicit
forward (``peft.apply``) equals the base model run on a merge computed *in this file* from the
documented parameter layouts (``W + s·A·B`` per layer of a stack, ``W * l`` for IA3, DoRA's
``m ⊙ V / ||V||_c``; adapters, which do not merge, against a branch added here) and equals
``method.merge``'s; the trainable partition holds exactly the expected leaves, with the layout's
shapes; every trainable leaf gets a non-zero gradient once the optimizer has moved; five Adam
steps lower the loss. Every refused pair raises a ``ConfigError`` naming what is missing. The
README's table of pairs is rendered from the same entries.
"""
from __future__ import annotations

import functools
import importlib.util
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
import zoo
from peftjax import peft
from peftjax import tree
from peftjax.errors import ConfigError

ALL: list = list(zoo.ENTRIES)
if importlib.util.find_spec('zoo_nnx') is not None:  # H1's NNX entries, when they exist
  import zoo_nnx  # pylint: disable=g-import-not-at-top
  ALL += list(zoo_nnx.ENTRIES)
ENTRIES = {(e.family, e.name): e for e in ALL}
assert len(ENTRIES) == len(ALL), 'zoo entries must have distinct (family, name)'

METHOD_ORDER = ('lora', 'dora', 'pissa', 'ia3', 'adapter', 'bitfit', 'full', 'linear_probe',
                'prompt', 'prefix')
IDENTITY = ('lora', 'dora', 'pissa', 'ia3', 'adapter')  # the model is unchanged at init
EXACT = ('lora', 'ia3', 'adapter')  # ... exactly (they add 0 or scale by 1); the others to 1e-5
MERGEABLE = ('lora', 'dora', 'pissa', 'ia3')
# Leaves whose gradient is zero by the model's math, whatever the method: softmax is invariant
# to a per-query shift, so a key projection's bias never changes the attention weights.
ZERO_BY_SYMMETRY = re.compile(r'(^|/)key/bias$')
README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def _id(e, m=None) -> str:
  name = e.name if e.family == 'linen' or e.name.startswith(e.family) else f'{e.family}_{e.name}'
  return name if m is None else f'{name}-{m}'


CLAIMED = [pytest.param(k, m, id=_id(e, m)) for k, e in ENTRIES.items() for m in e.claims]
REFUSED = [pytest.param(k, m, id=_id(e, m)) for k, e in ENTRIES.items() for m in e.refuses]


def claimed_among(methods) -> list:
  """The claimed pairs whose method is one of ``methods``."""
  return [p for p in CLAIMED if p.values[1] in methods]


# ------------------------------------------------------------------------------------------------
# building and caching (one init, one base forward, one training run per pair)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope='module')
def _persist_small_programs():
  """Puts every program this file compiles in the run's persistent compilation cache (conftest's
  ``JAX_COMPILATION_CACHE_DIR``), not only those compiling in over a second: these tiny models'
  programs compile in less, and a hundred of them are most of the file's time."""
  old = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  yield
  jax.config.update('jax_persistent_cache_min_compile_time_secs', old)


@functools.cache
def _quickstart():
  return peftjax.config('quickstart')


def build_method(entry, name: str):
  """``peft.build`` of the quickstart config with ``peft.method=name`` and the entry's overrides."""
  cfg = _quickstart().copy_and_resolve_references()
  cfg.peft.method = name
  cfg.peft.head = entry.head
  for key, value in entry.overrides(name).items():
    *parents, leaf = key.split('.')
    node = cfg.peft
    for p in parents:
      node = node[p]
    assert leaf in node, f'{entry.name}: override {key!r} names no field of cfg.peft'
    node[leaf] = value
  return peft.build(cfg.peft)


@functools.cache
def built(key):
  """``(module, params, inputs)`` of an entry, built once per worker; plain dicts of arrays."""
  module, params, inputs = ENTRIES[key].build()
  assert isinstance(params, dict) and isinstance(inputs, dict), key
  assert not any(isinstance(x, nn.meta.AxisMetadata) for x in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))), f'{key}: boxed params'
  return module, params, inputs


def forward(module, params, inputs):
  """The plain model as ``peft.apply`` runs it in evaluation (``deterministic=True`` when the
  model's ``__call__`` takes it)."""
  mode = {'deterministic': True} if peft.takes_deterministic(module) else {}
  return module.apply({'params': params}, **inputs, **mode)


@functools.cache
def jitted_forward(key):
  """The plain model of an entry as a function of its params, compiled once and shared by
  every method's merge checks (the shapes of a merged base are the base's)."""
  module, _, inputs = built(key)
  return jax.jit(lambda p: forward(module, p, inputs))


@functools.cache
def base_output(key):
  module, params, inputs = built(key)
  return forward(module, params, inputs)


@functools.cache
def initialized(key, name: str):
  """``(method, peft_params, prepared base)`` of a claimed pair."""
  module, params, inputs = built(key)
  method = build_method(ENTRIES[key], name)
  peft_params = method.init(jax.random.key(0), module, params, inputs)
  base = method.prepare_base(params, peft_params, module=module, inputs=inputs)
  return method, peft_params, base


def _scoped(entry):
  """The interceptor registration that sees this entry's layers (NNX layers need peftjax's)."""
  if entry.family == 'linen':
    return nn.intercept_methods
  from peftjax import intercept  # pylint: disable=g-import-not-at-top
  return intercept.intercept_methods


def _layer(mod):
  """``(path, kind, this call's weights, number of input axes of the weight)`` of a layer, or
  None: read off flax's own modules for linen, through peftjax's layer view for NNX."""
  if isinstance(mod, nn.Module):
    if isinstance(mod, nn.Embed):
      kind, n_in = 'embed', 1
    elif isinstance(mod, nn.Conv):
      kind, n_in = 'conv', None  # (kh, kw, cin) in, cout out
    elif isinstance(mod, nn.DenseGeneral):
      kind, n_in = 'dense', 1 if isinstance(mod.axis, int) else len(tuple(mod.axis))
    elif isinstance(mod, nn.Dense):
      kind, n_in = 'dense', 1
    else:
      return None
    weights = mod.variables.get('params', {})
    w = weights['embedding' if kind == 'embed' else 'kernel']
    return '/'.join(mod.path), kind, weights, (w.ndim - 1 if n_in is None else n_in)
  from peftjax.peft import layers  # pylint: disable=g-import-not-at-top
  kind = layers.kind(mod)
  if kind is None:
    return None
  weights = layers.params(mod)
  w = weights['embedding' if kind == 'embed' else 'kernel']
  return layers.path(mod), kind, weights, w.ndim - layers.out_ndim(mod)


@functools.cache
def layer_calls(key) -> dict:
  """Module path -> ``(kind, lead, in_shape, out_shape)`` for every layer the forward calls;
  ``lead`` is the stacked axes (the stored weight's leading axes that a call does not see)."""
  module, params, inputs = built(key)
  flat = tree.flatten(params)
  calls = {}

  def spy(next_fun, args, kwargs, context):
    info = _layer(context.module) if context.method_name == '__call__' else None
    if info is not None:
      path, kind, weights, n_in = info
      w = weights['embedding' if kind == 'embed' else 'kernel']
      stored = flat[f"{path}/{'embedding' if kind == 'embed' else 'kernel'}"].shape
      lead = tuple(stored[:len(stored) - w.ndim])
      calls.setdefault(path, (kind, lead, tuple(w.shape[:n_in]), tuple(w.shape[n_in:])))
    return next_fun(*args, **kwargs)

  with _scoped(ENTRIES[key])(spy):
    jax.eval_shape(lambda p: forward(module, p, inputs), params)
  return calls


def perturb(peft_params, seed: int = 3):
  """The method's parameters moved far from init: B random, A moved, scales and magnitudes
  multiplied by e^N(0, 0.5²) (positive, far from 1), adapters random."""
  out = {}
  for i, (path, x) in enumerate(sorted(tree.flatten(peft_params).items())):
    n = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), x.shape, jnp.float32)
    leaf = path.rsplit('/', 1)[-1]
    if leaf == 'lora_b':
      v = 0.3 * n
    elif leaf == 'lora_a':
      v = x + 0.1 * n
    elif leaf in ('magnitude', 'scale'):
      v = x * jnp.exp(0.5 * n)
    else:
      v = 0.3 * n
    out[path] = v.astype(x.dtype)
  return tree.unflatten(out)


# ------------------------------------------------------------------------------------------------
# references computed here from the documented layouts (not by method.merge)
# ------------------------------------------------------------------------------------------------

def _lora_scale(cfg) -> float:
  r = float(cfg.lora.rank)
  return float(cfg.lora.alpha) / (np.sqrt(r) if cfg.lora.rslora else r)


def reference_merge(name: str, method, base, peft_params) -> dict:
  """The base with the method folded in, from the factors alone.

  LoRA/PiSSA: ``W + s·A·B`` per layer of a stack, A ``(*lead, *in, r)``, B ``(*lead, r, *out)``
  (a conv kernel's in is ``(kh, kw, cin)``; an embedding table is ``(V, D)``, used by both the
  lookup and ``attend``). DoRA: ``m ⊙ V / ||V||`` over the input axes, ``V = W + s·A·B``.
  IA3: ``W * l_out`` (and the bias), ``W * l_in`` on the input rows.
  """
  flat, pp = dict(tree.flatten(base)), tree.flatten(peft_params)
  if name in ('lora', 'pissa', 'dora'):
    s = _lora_scale(method.cfg)
    for site in sorted(p[:-len('/lora_a')] for p in pp if p.endswith('/lora_a')):
      a, b = pp[f'{site}/lora_a'], pp[f'{site}/lora_b']
      wp = f'{site}/embedding' if f'{site}/embedding' in flat else f'{site}/kernel'
      w = flat[wp]
      n_lead = a.ndim + b.ndim - 2 - w.ndim
      lead, r = w.shape[:n_lead], a.shape[-1]
      v = w + s * (a.reshape(*lead, -1, r) @ b.reshape(*lead, r, -1)).reshape(w.shape)
      if name == 'dora':
        n_in = a.ndim - 1 - n_lead
        norm = jnp.sqrt(jnp.sum(v * v, axis=tuple(range(n_lead, n_lead + n_in)), keepdims=True))
        v = v * pp[f'{site}/magnitude'].reshape(norm.shape) / norm
      flat[wp] = v
  elif name == 'ia3':
    for p, vec in pp.items():
      site, which = re.fullmatch(r'(.*)/ia3_(out|in)/scale', p).groups()
      w = flat[f'{site}/kernel']
      if which == 'out':  # (*out), or (*lead, 1..., *out) in a stack: broadcasts against W
        flat[f'{site}/kernel'] = w * vec
        if f'{site}/bias' in flat:
          bias = flat[f'{site}/bias']
          flat[f'{site}/bias'] = bias * vec.reshape(bias.shape)
      else:  # (*lead, *in): scales W's input rows
        flat[f'{site}/kernel'] = w * vec.reshape(*vec.shape, *(1,) * (w.ndim - vec.ndim))
  else:
    raise AssertionError(name)
  return tree.unflatten(flat)


_ACT = {'gelu': functools.partial(jax.nn.gelu, approximate=False), 'relu': jax.nn.relu}


def adapter_reference(key, method, base, peft_params):
  """The model with ``y + up(act(down(y)))`` added after every adapted layer, computed here.

  The adapter leaves go in the ``params`` collection beside the layer's weights (as the brief's
  injection does), so a scan slices them per layer and a call reads its own.
  """
  entry = ENTRIES[key]
  module, _, inputs = built(key)
  act = _ACT[method.cfg.adapter.activation]
  suffix = '/adapter/down/kernel'
  paths = {p[:-len(suffix)] for p in tree.flatten(peft_params) if p.endswith(suffix)}
  combined = tree.unflatten({**tree.flatten(base), **tree.flatten(peft_params)})

  def add_branch(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    info = _layer(context.module) if context.method_name == '__call__' else None
    if info is None or info[0] not in paths:
      return y
    _, _, weights, n_in = info
    n_out = weights['kernel'].ndim - n_in
    ad = weights['adapter']
    h = y.reshape(*y.shape[:y.ndim - n_out], -1)
    z = act(h @ ad['down']['kernel'] + ad['down']['bias'])
    return y + (z @ ad['up']['kernel'] + ad['up']['bias']).reshape(y.shape)

  with _scoped(entry)(add_branch):
    return forward(module, combined, inputs)


def expected_peft_shapes(key, method) -> dict:
  """Path -> shape of every leaf the method's tree should hold, from the brief's layouts."""
  _, params, _ = built(key)
  calls, c, name = layer_calls(key), method.cfg, method.name
  out = {}
  if name in ('lora', 'dora', 'pissa'):
    rx, r = re.compile(c.lora.targets), int(c.lora.rank)
    for wp in tree.flatten(params):
      path = wp.rpartition('/')[0]
      if not rx.search(wp) or path not in calls:
        continue
      _, lead, i, o = calls[path]
      out[f'{path}/lora_a'], out[f'{path}/lora_b'] = (*lead, *i, r), (*lead, r, *o)
      if name == 'dora':
        out[f'{path}/magnitude'] = (*lead, *o)
  elif name == 'ia3':
    for which, pattern in (('out', c.ia3.targets), ('in', c.ia3.ffn_targets)):
      for path, (kind, lead, i, o) in calls.items():
        if not pattern or kind not in ('dense', 'conv') or not re.search(pattern, path):
          continue
        if which == 'out':
          shape = (*lead, *(1,) * len(i), *o) if lead else o
        else:
          shape = (*lead, i[-1]) if kind == 'conv' else (*lead, *i)
        out[f'{path}/ia3_{which}/scale'] = shape
  elif name == 'prompt':  # n vectors as wide as the input embedding's rows
    (width,), = {o for kind, _, _, o in calls.values() if kind == 'embed'}
    out['prompt'] = (int(c.prompt.length), width)
  elif name == 'adapter':
    a = c.adapter
    patterns = [a.ffn_targets] + ([a.attn_targets] if a.kind == 'houlsby' else [])
    m = int(a.size)
    for path, (kind, lead, _, o) in calls.items():
      if kind == 'dense' and any(re.search(p, path) for p in patterns):
        d = int(np.prod(o))
        out.update({f'{path}/adapter/down/kernel': (*lead, d, m),
                    f'{path}/adapter/down/bias': (*lead, m),
                    f'{path}/adapter/up/kernel': (*lead, m, d),
                    f'{path}/adapter/up/bias': (*lead, d)})
  return out


def expected_base_leaves(key, method) -> set:
  """The base leaves that should train: all (full), biases and the head (bitfit), the head."""
  _, params, _ = built(key)
  head = method.cfg.head
  picks = []
  for p in tree.flatten(params):
    if (method.name == 'full' or (head and re.search(head, p))
        or (method.name == 'bitfit' and re.search(r'(^|/)bias$', p))):
      picks.append(p)
  return set(picks)


# ------------------------------------------------------------------------------------------------
# training: one jitted step per pair, five Adam updates on a fixed batch and target
# ------------------------------------------------------------------------------------------------

STEPS = 5
FAST_COMPILE = {'xla_backend_optimization_level': 0}


@functools.cache
def trained(key, name: str):
  """``(losses, gradients after one update, initial trainable tree)``; ``losses[i]`` is the loss
  after ``i`` updates (``STEPS + 1`` values)."""
  module, _, inputs = built(key)
  method, peft_params, base = initialized(key, name)
  base_tr, frozen = tree.partition(base, method.trainable_base)
  trainable = {'base': base_tr, 'peft': peft_params}
  out = base_output(key)
  target = jax.random.normal(jax.random.key(7), out.shape, jnp.float32)

  def loss_fn(tr, frozen):
    y = peft.apply(module, method, tree.combine(tr['base'], frozen), tr['peft'], inputs)
    return jnp.mean(jnp.square(y.astype(jnp.float32) - target))

  tx = optax.adam(1e-2)

  def step(tr, opt_state, frozen):
    loss, grads = jax.value_and_grad(loss_fn)(tr, frozen)
    updates, opt_state = tx.update(grads, opt_state, tr)
    return optax.apply_updates(tr, updates), opt_state, loss, grads

  opt_state, losses, grads_after_one = tx.init(trainable), [], None
  # XLA's backend optimizations would take about half the compile time of these tiny steps.
  step = jax.jit(step).lower(trainable, opt_state, frozen).compile(FAST_COMPILE)
  tr = trainable
  for i in range(STEPS + 1):
    tr, opt_state, loss, grads = step(tr, opt_state, frozen)
    losses.append(float(loss))
    if i == 1:
      grads_after_one = tree.flatten(grads)
  return losses, grads_after_one, trainable


# ------------------------------------------------------------------------------------------------
# the tests
# ------------------------------------------------------------------------------------------------

def test_entries_are_well_formed():
  names = set(peft.method_names())
  for e in ALL:
    assert e.family in ('linen', 'nnx'), e.name
    assert set(e.claims) <= names and set(e.refuses) <= names, e.name
    assert not set(e.claims) & set(e.refuses), e.name
    assert e.claims or e.refuses, e.name


@pytest.mark.parametrize('key,name', CLAIMED)
def test_claimed_pair(key, name):
  """Every claim of one pair, in one test: the pair's init, compiled step and forwards are
  made once (on one worker) and serve all of its checks."""
  if name == 'prompt':  # new positions the model attends to: not the model at init, by design
    check_prompts_change_the_model(key, name)
  else:
    check_identity_at_init(key, name)
  if name in IDENTITY:
    check_implicit_equals_reference(key, name)
  check_trainable_partition_is_exact(key, name)
  check_every_trainable_leaf_gets_a_gradient(key, name)
  check_training_lowers_the_loss(key, name)


def check_prompts_change_the_model(key, name):
  module, _, inputs = built(key)
  method, peft_params, base = initialized(key, name)
  got = np.asarray(peft.apply(module, method, base, peft_params, inputs))
  assert got.shape == np.shape(base_output(key))  # a pooled output: no extra positions
  assert np.max(np.abs(got - np.asarray(base_output(key)))) > 1e-4, 'the prompts changed nothing'


def check_identity_at_init(key, name):
  module, params, inputs = built(key)
  method, peft_params, base = initialized(key, name)
  got = peft.apply(module, method, base, peft_params, inputs)
  want = base_output(key)
  if name in EXACT or name not in IDENTITY:  # no parameters of its own: trivially the model
    np.testing.assert_array_equal(got, want, err_msg='not the model at init')
  else:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg='not the model at init')


def check_implicit_equals_reference(key, name):
  """After moving the method's parameters: implicit == the merge computed here == method.merge."""
  module, _, inputs = built(key)
  method, peft_params, base = initialized(key, name)
  moved = perturb(peft_params)
  got = np.asarray(peft.apply(module, method, base, moved, inputs))
  base_out = np.asarray(base_output(key))
  size = float(np.max(np.abs(base_out)))
  # The method does something visible (a silently inert method passes every other check),
  # ten times more than the tolerance of the comparisons below.
  assert np.max(np.abs(got - base_out)) > 1e-3 * size, 'perturbing the method changed nothing'
  tol = dict(rtol=1e-4, atol=1e-4 * size)
  if name not in MERGEABLE:  # adapters are a nonlinear branch: against the branch added here
    np.testing.assert_allclose(got, adapter_reference(key, method, base, moved), **tol,
                               err_msg='implicit != the branch added in the test')
    return
  ref = jitted_forward(key)(reference_merge(name, method, base, moved))
  np.testing.assert_allclose(got, ref, **tol, err_msg='implicit != merge computed in the test')
  merged = jitted_forward(key)(method.merge(base, moved))
  np.testing.assert_allclose(got, merged, **tol, err_msg='implicit != method.merge')


def check_trainable_partition_is_exact(key, name):
  method, peft_params, base = initialized(key, name)
  shapes = {p: tuple(x.shape) for p, x in tree.flatten(peft_params).items()}
  assert shapes == expected_peft_shapes(key, method)
  if name in IDENTITY:
    assert shapes, f'{name} found nothing to adapt'
  base_tr, frozen = tree.partition(base, method.trainable_base)
  assert set(tree.flatten(base_tr)) == expected_base_leaves(key, method)
  assert set(tree.flatten(base_tr)) | set(tree.flatten(frozen)) == set(tree.flatten(base))


def check_every_trainable_leaf_gets_a_gradient(key, name):
  _, grads, trainable = trained(key, name)
  assert set(grads) == set(tree.flatten(trainable)) and grads
  dead = [p for p, g in grads.items()
          if not ZERO_BY_SYMMETRY.search(p) and not np.any(np.asarray(g) != 0)]
  assert not dead, f'zero gradient after one update: {dead}'


def check_training_lowers_the_loss(key, name):
  losses, _, _ = trained(key, name)
  assert all(np.isfinite(losses)), losses
  assert losses[-1] < losses[0], f'five Adam steps did not lower the loss: {losses}'


@pytest.mark.parametrize('key,name', REFUSED)
def test_refusal(key, name):
  entry = ENTRIES[key]
  module, params, inputs = built(key)
  with pytest.raises(ConfigError, match=entry.refuses[name]):
    method = build_method(entry, name)
    method.init(jax.random.key(0), module, params, inputs)


# ------------------------------------------------------------------------------------------------
# the README's table of pairs
# ------------------------------------------------------------------------------------------------

def render_table(entries=None) -> str:
  """The (model, method) table as markdown: 'yes' claimed, 'refused' refused, else blank."""
  entries = ALL if entries is None else entries
  used = {m for e in entries for m in (*e.claims, *e.refuses)}
  methods = [m for m in METHOD_ORDER if m in used] + sorted(used - set(METHOD_ORDER))
  lines = ['| model | family | ' + ' | '.join(methods) + ' |',
           '|---|---|' + '---|' * len(methods)]
  for e in entries:
    cells = ['yes' if m in e.claims else 'refused' if m in e.refuses else '' for m in methods]
    lines.append(f'| {e.name} | {e.family} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def test_readme_has_the_zoo_table():
  table = render_table()
  text = README.read_text()
  start, end = '<!-- zoo-table -->', '<!-- /zoo-table -->'
  assert start in text and end in text, f'README.md has no {start} ... {end} section'
  inside = text.split(start, 1)[1].split(end, 1)[0]
  assert inside.strip() == table.strip(), f'README zoo table is stale; it should read:\n{table}'
