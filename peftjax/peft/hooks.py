"""How methods that need a model's hook points find them and fill them in, for linen and NNX
models alike.

A *hook point* is a keyword of some module's ``__call__`` that a method fills in (:data:`HOOKS`:
``prompt_embeds`` for prompt tuning, ``prefix_kv`` for prefix tuning); peftjax's ``BertEncoder``
declares both. A model is never read by its names: it is traced abstractly (no compute) and
the trace reports what it calls.

* :func:`survey` -- which module types a forward calls, which hook keywords they declare (and
  the outermost declarer of each), the input embedding and the mask inputs (a :class:`Survey`);
* :func:`root_plan` -- the same facts decided inside a forward, at the model's own call: a linen
  model is re-traced (cached per model and shapes); an NNX model (through
  :mod:`peftjax.models.nnx_bridge`) is read off its graph and arguments, without re-running it;
* :func:`hook_scope` -- fills a hook keyword in on the outermost module declaring it.

Surveys run with the methods' interceptors muted (:func:`quietly`), so a survey inside a
forward sees the model as it is, not with the prompts already in.

>>> s = survey(model, params, inputs)                  # doctest: +SKIP
>>> with hook_scope('prefix_kv', prefixes):            # doctest: +SKIP
...   logits = model.apply({'params': params}, **inputs)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import intercept
from peftjax.peft import layers
from peftjax.peft.base import takes_deterministic

HOOKS = ('prompt_embeds', 'prefix_kv')  # the hook keywords peftjax's methods fill in


@functools.cache
def accepts_kwarg(module_type: type, name: str) -> bool:
  """Whether ``module_type.__call__`` declares a keyword ``name`` (a hook point).

  >>> accepts_kwarg(BertEncoder, 'prompt_embeds')  # doctest: +SKIP
  True
  """
  try:
    return name in inspect.signature(module_type.__call__).parameters
  except (TypeError, ValueError):
    return False


def _classes(mod):
  """The classes whose ``__call__`` answers for ``mod``: a linen module's own; for a non-linen
  view (the NNX bridge's ``NNXLayer``) those of the model object it wraps, whose interceptable
  subclass declares only ``*args, **kwargs``."""
  if isinstance(mod, nn.Module):
    return (type(mod),)
  inner = getattr(mod, 'module', mod)
  return tuple(c for c in type(inner).__mro__ if '__call__' in vars(c))


def declares(mod, name: str) -> bool:
  """Whether the module of this call (an interceptor's ``context.module``) declares the hook
  keyword ``name`` in its ``__call__``.

  >>> declares(context.module, 'prefix_kv')  # doctest: +SKIP
  True
  """
  return any(accepts_kwarg(c, name) for c in _classes(mod))


def _type_name(mod) -> str:
  return type(getattr(mod, 'module', mod) if not isinstance(mod, nn.Module) else mod).__name__


# ---------------------------------------------------------------------------- the survey


@dataclasses.dataclass(frozen=True)
class Survey:
  """What one abstract forward of a model shows: the facts prompt and prefix tuning rely on.

  ``hooks`` maps each hook keyword of :data:`HOOKS` some called module declares to the path of
  the outermost such module (the one the hook is filled in on). ``embed_*`` describe the input
  embedding (``None`` if the model has none); ``by_identity`` is whether that layer receives
  the token input itself (else an integer array of its shape, e.g. a cast copy).
  """
  model: str
  called: tuple[str, ...]
  hooks: dict
  embed_path: str | None = None
  embed_shape: tuple | None = None
  token_input: str | None = None
  token_shape: tuple | None = None
  by_identity: bool = True
  mask_inputs: tuple[str, ...] = ()

  def called_text(self, limit: int = 8) -> str:
    more = f', ... ({len(self.called)} types)' if len(self.called) > limit else ''
    return ', '.join(self.called[:limit]) + more


_QUIET = threading.local()  # set while a survey runs inside a forward: the prompts stay out


def quiet() -> bool:
  """Whether a survey is running: the methods' interceptors then pass every call through.

  >>> quiet()
  False
  """
  return getattr(_QUIET, 'on', False)


@contextlib.contextmanager
def quietly():
  """Context under which :func:`quiet` is true (a survey traced inside a method's forward).

  >>> with quietly():
  ...   quiet()
  True
  """
  before = quiet()
  _QUIET.on = True
  try:
    yield
  finally:
    _QUIET.on = before


def first_arg(args, kwargs):
  """The first argument of a call, positional or (failing that) keyword.

  >>> first_arg((), {'inputs': 3})
  3
  """
  if args:
    return args[0]
  return next(iter(kwargs.values()), None)


def is_int_array(x) -> bool:
  """Whether ``x`` is an integer array (token ids, a mask...), concrete or traced.

  >>> is_int_array(jnp.zeros((2, 3), jnp.int32)), is_int_array(jnp.zeros(3))
  (True, False)
  """
  return hasattr(x, 'shape') and hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.integer)


def _safe_path(mod) -> str:
  try:
    return layers.path(mod)
  except Exception:  # pylint: disable=broad-except  (a non-layer NNX object: no path to report)
    return type(mod).__name__


class _Recorder:
  """An interceptor noting module types, hook declarers and the input embedding."""

  def __init__(self, model_name: str):
    self.model_name = model_name
    self.inputs = {}  # the forward's named inputs (tracers), set inside the traced function
    self.called, self.hooks = {}, {}
    self.embed = None  # (path, table shape, token input name, by identity)

  def __call__(self, next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == '__call__':
      self.called.setdefault(_type_name(mod), None)
      for name in HOOKS:
        if name not in self.hooks and declares(mod, name):
          self.hooks[name] = _safe_path(mod)  # calls enter outer first: the outermost wins
      if layers.kind(mod) == 'embed':
        self._embed(mod, first_arg(args, kwargs))
    return next_fun(*args, **kwargs)

  def _embed(self, mod, x):
    if (self.embed is not None and self.embed[3]) or not is_int_array(x):
      return
    named = [k for k, v in self.inputs.items() if v is x]
    if named:
      by_identity = True
    else:  # e.g. ids cast or reshaped to the same shape: matched by shape, kept only if first
      named = [k for k, v in self.inputs.items() if is_int_array(v) and v.shape == x.shape]
      by_identity = False
      if not named or self.embed is not None:
        return
    table = layers.params(mod)['embedding']
    self.embed = (layers.path(mod), tuple(table.shape), named[0], by_identity)

  def result(self) -> Survey:
    if self.embed is None:
      return Survey(self.model_name, tuple(self.called), dict(self.hooks))
    path, shape, token, by_identity = self.embed
    token_shape = tuple(self.inputs[token].shape)
    masks = tuple(k for k, v in self.inputs.items()
                  if 'mask' in k.lower() and tuple(np.shape(v)) == token_shape)
    return Survey(self.model_name, tuple(self.called), dict(self.hooks), path, shape, token,
                  token_shape, by_identity, masks)


def mode(module) -> dict:
  """``deterministic=True`` if the model takes it (as :func:`peftjax.peft.apply` passes it).

  >>> model.apply({'params': params}, **inputs, **mode(model))  # doctest: +SKIP
  """
  return {'deterministic': True} if takes_deterministic(module) else {}


def survey(module, base_params, inputs) -> Survey:
  """Traces ``module`` on ``inputs`` abstractly (no compute) and reports what it calls.

  >>> s = survey(BertClassifier(cfg, 3), params, inputs)  # doctest: +SKIP
  >>> s.hooks, s.embed_path, s.mask_inputs                # doctest: +SKIP
  ({'prompt_embeds': 'encoder', 'prefix_kv': 'encoder'},
   'encoder/embeddings/word_embeddings', ('attention_mask',))
  """
  rec = _Recorder(type(module).__name__)

  def forward(params, named):
    rec.inputs = named
    with quietly(), intercept.intercept_methods(rec):
      return module.apply({'params': params}, **named, **mode(module))

  jax.eval_shape(forward, base_params, dict(inputs))
  return rec.result()


def _split_static(tree):
  """``(arrays, rebuild)``: the array leaves of ``tree``, and a function putting them back (the
  other leaves -- ``deterministic=True``... -- stay Python values, as the model expects)."""
  leaves, treedef = jax.tree.flatten(tree)
  is_array = [hasattr(x, 'shape') and hasattr(x, 'dtype') for x in leaves]
  arrays = [x for x, a in zip(leaves, is_array) if a]

  def rebuild(new_arrays):
    it = iter(new_arrays)
    return treedef.unflatten([next(it) if a else x for x, a in zip(leaves, is_array)])

  static = tuple((a, None if a else x) for x, a in zip(leaves, is_array))
  return arrays, rebuild, (treedef, static)


def named_args(fun, args, kwargs) -> dict:
  """The arguments of a call by parameter name (positional ones bound by ``fun``'s signature).

  >>> named_args(lambda ids, mask=None: None, (1,), {'mask': 2})
  {'ids': 1, 'mask': 2}
  """
  if not args:
    return dict(kwargs)
  try:
    sig = inspect.signature(fun)
  except (TypeError, ValueError):
    return dict(kwargs)
  names = [p.name for p in sig.parameters.values()
           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return {**dict(zip(names, args)), **kwargs}


def replace_args(fun, args, kwargs, new: dict):
  """``(args, kwargs)`` with the arguments named in ``new`` replaced (positional or keyword).

  >>> replace_args(lambda ids, mask=None: None, (1, 2), {}, {'mask': 5})
  ((1, 5), {})
  """
  kwargs = {**kwargs, **{k: v for k, v in new.items() if k in kwargs}}
  if args:
    try:
      sig = inspect.signature(fun)
      names = [p.name for p in sig.parameters.values()
               if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
      args = tuple(new.get(n, a) if n not in kwargs else a for n, a in zip(names, args)) + tuple(
          args[len(names):])
    except (TypeError, ValueError):
      pass
  return args, kwargs


_ROOT_SURVEYS: dict = {}  # (root, abstract call) -> Survey; each model/shape is traced once


def root_plan(context, args, kwargs) -> Survey:
  """What to do in this forward, decided at the model's own call (the root module): a linen
  model's survey, or an NNX model's plan read without re-running it. Called from an
  interceptor, on the root module's call.

  >>> plan = root_plan(context, args, kwargs)  # doctest: +SKIP
  >>> plan.hooks, plan.token_input, plan.mask_inputs  # doctest: +SKIP
  ({}, 'input_ids', ('attention_mask',))
  """
  if isinstance(context.module, nn.Module):
    return _root_survey(context, args, kwargs)
  return _static_plan(context, args, kwargs)


def _root_survey(context, args, kwargs) -> Survey:
  """The survey of a linen model's own call, inside its forward (cached per model and shapes):
  the unbound model re-traced abstractly on the same variables and arguments."""
  root = context.module
  arrays, rebuild, static = _split_static((root.variables, args, kwargs))
  unbound = root.clone(parent=None)
  try:
    key = (unbound, static, tuple((tuple(x.shape), str(x.dtype)) for x in arrays))
    hash(key)
  except TypeError:  # an unhashable field or argument: trace every time
    key = None
  if key is not None and key in _ROOT_SURVEYS:
    return _ROOT_SURVEYS[key]
  rec = _Recorder(type(root).__name__)
  rngs = {name: jax.random.key(0) for name in getattr(root.scope, 'rngs', {})}

  def forward(new_arrays):
    v, a, k = rebuild(new_arrays)
    rec.inputs = named_args(type(root).__call__, (None,) + tuple(a), k)
    rec.inputs.pop('self', None)
    with quietly(), intercept.intercept_methods(rec):
      return unbound.apply(v, *a, **k, rngs=rngs, mutable=True)

  jax.eval_shape(forward, arrays)
  result = rec.result()
  if key is not None:
    if len(_ROOT_SURVEYS) > 64:
      _ROOT_SURVEYS.clear()
    _ROOT_SURVEYS[key] = result
  return result


def _static_plan(context, args, kwargs) -> Survey:
  """The plan for a non-linen model (an NNX model through the bridge), without re-running it
  (its layers hold rng state a second trace must not touch): a hook if any module of its graph
  declares ``prompt_embeds``; else the token input is its first integer input not named like a
  mask, the input embedding the first embedding layer called on that very array (learned in
  the forward), the masks by the mask rule. ``init`` checks this against the full survey."""
  root = context.module
  inner = getattr(root, 'module', None)
  hooks = {}
  try:
    from flax import nnx  # pylint: disable=g-import-not-at-top  (only NNX models get here)
    nodes = [m for _, m in nnx.iter_graph(inner)] if isinstance(inner, nnx.Module) else []
  except Exception:  # pylint: disable=broad-except
    nodes = []
  for node in nodes:
    for name in HOOKS:
      if name not in hooks and any(
          accepts_kwarg(c, name) for c in type(node).__mro__ if '__call__' in vars(c)):
        hooks[name] = ''
  named = named_args(context.orig_method, args, kwargs)
  ints = [k for k, v in named.items() if is_int_array(v) and 'mask' not in k.lower()]
  if not ints:
    return Survey(type(inner or root).__name__, (), hooks)
  token_shape = tuple(named[ints[0]].shape)
  masks = tuple(k for k, v in named.items()
                if 'mask' in k.lower() and tuple(np.shape(v)) == token_shape)
  return Survey(type(inner or root).__name__, (), hooks, None, None, ints[0], token_shape, True,
                masks)


@contextlib.contextmanager
def hook_scope(name: str, value):
  """Context under which the *outermost* ``__call__`` declaring keyword ``name`` receives ``value``.

  Only the outermost: a hook point is passed down by the module that owns it (``BertEncoder``
  hands each layer its slice of ``prefix_kv``; its ``Layer``/``SelfAttention`` declare the same
  keyword for that), so nested calls keep what their parent gave them.

  ``value`` may be a function of the hooked (bound) module, for a value that depends on the
  model's weights (prefix tuning reads its layer and head layout so).

  >>> with hook_scope('prompt_embeds', prompts):                      # doctest: +SKIP
  ...   logits = model.apply({'params': params}, ids, mask)  # the encoder gets the prompts
  """
  inside = [False]  # trace-time state: is a hooked call on the Python stack?

  def interceptor(next_fun, args, kwargs, context):
    if (inside[0] or quiet() or context.method_name != '__call__'
        or not declares(context.module, name)):
      return next_fun(*args, **kwargs)
    inside[0] = True
    try:
      given = value(context.module) if callable(value) else value
      return next_fun(*args, **{**kwargs, name: given})
    finally:
      inside[0] = False

  with intercept.intercept_methods(interceptor):
    yield
