"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

The method trains ``n = peft.prompt.length`` soft-prompt vectors ``(n, D)`` and nothing else of the
model (the head trains too, through ``peft.head``). They reach the model in one of two ways,
chosen per forward by looking at the model (an abstract trace, cached), never by its names:

1. **A ``prompt_embeds`` hook** -- when some module of the model declares a ``prompt_embeds``
   keyword in its ``__call__`` (peftjax's ``BertEncoder``), an interceptor fills it in (the
   outermost such module) and the model decides what to do with them. BERT's hook (see
   ``peftjax/models/bert.py``):

   * the prompts are prepended to the embedding sum of the real tokens, before the embedding
     LayerNorm; real tokens keep their positions, prompts get no position/type embedding;
   * the attention mask is extended with ones, so every token attends to every prompt, while
     padding stays masked;
   * the encoder output is ``(B, n + L, D)``; ``BertClassifier`` pools over the ``L`` real
     tokens only (mean or [CLS]), as the pretrained model pools.

2. **The generic input-embedding hook** -- any other model with an embedding layer (linen
   ``nn.Embed``, or an NNX ``Embed`` seen through :mod:`peftjax.models.nnx_bridge`):

   * the *input embedding* is the first embedding layer the model calls on one of its integer
     inputs (the *token input*, e.g. ``input_ids``); the prompts' width ``D`` is its table's;
   * every ``__call__`` of that layer on the token input returns the ``n`` prompts prepended
     along the sequence axis (the token input's last axis): ``(B, L, D) -> (B, n + L, D)``;
   * *the mask rule*: every model input whose name contains ``'mask'`` (any case) and whose
     shape equals the token input's (``attention_mask``, ``padding_mask``...) is extended the
     same way with ones, so the prompts are real, attended positions and padding stays masked;
     other inputs are passed unchanged;
   * the model then returns ``n`` more positions wherever it returns per-token outputs,
     prompts first; a pooled output (a mask-aware mean pool counts the prompts as tokens) or a
     per-sequence head needs nothing. A task that reads per-token outputs strips them with
     :func:`drop_prompts` (``out[:, n:]``).

   A model that cannot run with ``n`` extra positions (it adds a position table sized from the
   ids' length, or combines the embeddings with another per-token input) is refused at
   ``init`` with a :class:`~peftjax.errors.ConfigError`; give it a ``prompt_embeds`` hook
   (prepend where the model can, e.g. after adding positions, as ``bert.py`` does).

Initialisation (``peft.prompt.init``), from the input embedding's table (the one the model
embeds its tokens with, found as above):

* ``'vocab'`` -- copies of ``n`` random rows of the table (Lester et al. found vocabulary init
  far better than uniform random);
* ``'text'`` -- the table's rows of ``peft.prompt.init_text``'s tokens, tokenized with the
  bundled MiniLM tokenizer (``peftjax.data.minilm_dir() / 'tokenizer.json'``, whose ids are the
  bundled encoder's vocabulary) without [CLS]/[SEP], repeated or cut to ``n``. E.g. a
  task description: ``--config.peft.prompt.init_text='classify the sentiment of this review'``.

The parameter tree is ``{'prompt': (n, D)}``. The model is *not* unchanged at init (the prompts
are new tokens the model attends to), and prompts cannot be merged into the weights:
:meth:`PromptTuning.merge` raises.

This module also holds what prompt and prefix tuning share: :func:`survey` (which module types a
forward calls, which hook keywords they declare, the input embedding and the mask inputs) and
:func:`hook_scope` (filling a hook keyword in).
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
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft import intercept
from peftjax.peft import layers
from peftjax.peft import sections
from peftjax.peft.base import Method
from peftjax.peft.base import register
from peftjax.peft.base import takes_deterministic

PROMPT_INITS = ('vocab', 'text')
HOOKS = ('prompt_embeds', 'prefix_kv')  # the hook keywords peftjax's methods fill in


@functools.cache
def accepts_kwarg(module_type: type, name: str) -> bool:
  """Whether ``module_type.__call__`` declares a keyword ``name`` (a hook point)."""
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
  """Whether the module of this call declares the hook keyword ``name`` in its ``__call__``."""
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


def _quiet() -> bool:
  return getattr(_QUIET, 'on', False)


@contextlib.contextmanager
def _quietly():
  before = _quiet()
  _QUIET.on = True
  try:
    yield
  finally:
    _QUIET.on = before


def _first_arg(args, kwargs):
  if args:
    return args[0]
  return next(iter(kwargs.values()), None)


def _is_int_array(x) -> bool:
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
        self._embed(mod, _first_arg(args, kwargs))
    return next_fun(*args, **kwargs)

  def _embed(self, mod, x):
    if (self.embed is not None and self.embed[3]) or not _is_int_array(x):
      return
    named = [k for k, v in self.inputs.items() if v is x]
    if named:
      by_identity = True
    else:  # e.g. ids cast or reshaped to the same shape: matched by shape, kept only if first
      named = [k for k, v in self.inputs.items() if _is_int_array(v) and v.shape == x.shape]
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


def _mode(module) -> dict:
  """``deterministic=True`` if the model takes it (as :func:`peftjax.peft.apply` passes it)."""
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
    with _quietly(), intercept.intercept_methods(rec):
      return module.apply({'params': params}, **named, **_mode(module))

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


def _named_args(fun, args, kwargs) -> dict:
  """The arguments of a call by parameter name (positional ones bound by ``fun``'s signature)."""
  if not args:
    return dict(kwargs)
  try:
    sig = inspect.signature(fun)
  except (TypeError, ValueError):
    return dict(kwargs)
  names = [p.name for p in sig.parameters.values()
           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return {**dict(zip(names, args)), **kwargs}


def _replace_args(fun, args, kwargs, new: dict):
  """``(args, kwargs)`` with the arguments named in ``new`` replaced (positional or keyword)."""
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


def _root_plan(context, args, kwargs) -> Survey:
  """What to do in this forward, decided at the model's own call (the root module)."""
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
    rec.inputs = _named_args(type(root).__call__, (None,) + tuple(a), k)
    rec.inputs.pop('self', None)
    with _quietly(), intercept.intercept_methods(rec):
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
  named = _named_args(context.orig_method, args, kwargs)
  ints = [k for k, v in named.items() if _is_int_array(v) and 'mask' not in k.lower()]
  if not ints:
    return Survey(type(inner or root).__name__, (), hooks)
  token_shape = tuple(named[ints[0]].shape)
  masks = tuple(k for k, v in named.items()
                if 'mask' in k.lower() and tuple(np.shape(v)) == token_shape)
  return Survey(type(inner or root).__name__, (), hooks, None, None, ints[0], token_shape, True,
                masks)


# ---------------------------------------------------------------------------- hooks


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
    if (inside[0] or _quiet() or context.method_name != '__call__'
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


def _prepend(x, rows, axis: int):
  """``rows`` ``(n, D)`` in front of ``x`` ``(..., L, D)`` along ``axis`` (the sequence axis)."""
  shape = list(x.shape)
  shape[axis] = rows.shape[0]
  rows = jnp.asarray(rows, x.dtype).reshape((1,) * axis + rows.shape)
  return jnp.concatenate([jnp.broadcast_to(rows, shape), x], axis=axis)


def _ones_first(mask, n: int):
  """``mask`` with ``n`` ones in front of its last (sequence) axis: prompts are never padding."""
  ones = jnp.ones(mask.shape[:-1] + (n,), mask.dtype)
  return jnp.concatenate([ones, mask], axis=-1)


@contextlib.contextmanager
def prompt_scope(prompts, report: dict | None = None):
  """Context under which the model runs with ``prompts`` ``(n, D)`` (see the module docstring).

  At the model's own call (the root module) it surveys the model (abstractly, once per model
  and input shapes): a declared ``prompt_embeds`` hook is filled in; otherwise the mask inputs
  are extended with ones and the input embedding's output gets the prompts in front.
  ``report``, if given, is filled with what was done (``'mode'``, ``'embedded'`` -- the
  embedding calls that got the prompts --, ``'masks'``), for :meth:`PromptTuning.init`'s checks.

  >>> with prompt_scope(prompts):                              # doctest: +SKIP
  ...   logits = model.apply({'params': params}, **inputs)   # (B, n + L) positions inside
  """
  report = {} if report is None else report
  report.update(mode=None, embedded=[], masks=[])
  n = int(np.shape(prompts)[0])
  state = {'depth': 0, 'plan': None, 'token': None, 'hooked': False, 'embed_path': None}

  def embed_call(next_fun, args, kwargs, mod):
    plan, x = state['plan'], _first_arg(args, kwargs)
    if not _is_int_array(x):
      return None
    path = layers.path(mod)
    if plan is None:  # no root call seen (layers run on their own): the first integer embedding
      state['embed_path'] = state['embed_path'] or path
    elif not (x is state['token'] if plan.by_identity else tuple(x.shape) == plan.token_shape):
      return None
    elif state['embed_path'] is None:  # a static plan: the first embedding of the token input
      state['embed_path'] = path
    if path != state['embed_path']:
      return None
    out = next_fun(*args, **kwargs)
    report['embedded'].append(path)
    return _prepend(out, prompts, x.ndim - 1)

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if _quiet() or context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    root = state['depth'] == 0 and layers.kind(mod) is None
    if root:
      plan = None if declares(mod, 'prompt_embeds') else _root_plan(context, args, kwargs)
      if plan is None or 'prompt_embeds' in plan.hooks:
        state['plan'], report['mode'] = 'hook', 'hook'
      else:
        state['plan'], report['mode'] = plan, 'generic'
        state['embed_path'] = plan.embed_path
        method = type(mod).__call__ if isinstance(mod, nn.Module) else context.orig_method
        offset = (None,) if isinstance(mod, nn.Module) else ()
        named = _named_args(method, offset + tuple(args), kwargs)
        state['token'] = named.get(plan.token_input)
        new = {k: _ones_first(named[k], n) for k in plan.mask_inputs if k in named}
        report['masks'].extend(new)
        if new:
          a, kwargs = _replace_args(method, offset + tuple(args), kwargs, new)
          args = a[len(offset):]
    plan = state['plan']
    state['depth'] += 1
    try:
      if plan == 'hook':
        if not state['hooked'] and declares(mod, 'prompt_embeds'):
          state['hooked'] = True
          try:
            return next_fun(*args, **{**kwargs, 'prompt_embeds': prompts})
          finally:
            state['hooked'] = False
      elif layers.kind(mod) == 'embed' and (plan is None or plan.token_input is not None):
        out = embed_call(next_fun, args, kwargs, mod)
        if out is not None:
          return out
      return next_fun(*args, **kwargs)
    finally:
      state['depth'] -= 1
      if root:  # the model's call is over: the next one is surveyed afresh
        state['plan'] = state['token'] = state['embed_path'] = None

  with intercept.intercept_methods(interceptor):
    yield


def drop_prompts(per_token, num_tokens: int, axis: int = 1):
  """The real tokens' part of a per-token output of a prompt-tuned model (prompts come first).

  >>> drop_prompts(jnp.zeros((2, 5 + 8, 4)), 8).shape
  (2, 8, 4)
  """
  start = per_token.shape[axis] - num_tokens
  return jax.lax.slice_in_dim(per_token, start, per_token.shape[axis], axis=axis)


def input_embedding(module, base_params, inputs, s: Survey | None = None):
  """``(path, table)``: the model's input embedding (see the module docstring) and its table.

  Raises a :class:`~peftjax.errors.ConfigError` if the model embeds none of its inputs.
  """
  s = s or survey(module, base_params, inputs)
  if s.embed_path is None:
    ints = [k for k, v in inputs.items() if _is_int_array(v)]
    raise ConfigError(
        f'peft.method=prompt needs an input embedding: an embedding layer (nn.Embed, NNX Embed) '
        f'called on one of the model\'s integer inputs ({", ".join(ints) or "none"}); '
        f'{s.model} calls none (called: {s.called_text()}). Valid: a model that embeds its '
        'token ids with such a layer, or one with a `prompt_embeds` hook and such a layer')
  flat = tree_lib.flatten(base_params)
  table = flat.get(f'{s.embed_path}/embedding') if s.embed_path else None
  if table is None or tuple(table.shape) != s.embed_shape:
    table = _captured_table(module, base_params, inputs, s.embed_path)
  return s.embed_path, table


def _captured_table(module, base_params, inputs, path):
  """The table the layer at ``path`` uses, read inside a forward (a model whose parameter tree
  does not mirror its layer paths); jit keeps only the read, not the forward."""
  def grab(params, named):
    box = []

    def rec(next_fun, args, kwargs, context):
      mod = context.module
      if (not box and context.method_name == '__call__' and layers.kind(mod) == 'embed'
          and layers.path(mod) == path):
        box.append(layers.params(mod)['embedding'])
      return next_fun(*args, **kwargs)

    with _quietly(), intercept.intercept_methods(rec):
      module.apply({'params': params}, **named, **_mode(module))
    return box[0]

  return jax.jit(grab)(base_params, dict(inputs))


def text_token_ids(text: str) -> np.ndarray:
  """Token ids of ``text`` under the bundled MiniLM tokenizer, without [CLS] and [SEP].

  >>> text_token_ids('hello world')  # doctest: +SKIP
  array([7592, 2088], dtype=int32)
  """
  from peftjax.data import Tokenizer  # pylint: disable=g-import-not-at-top  (only for 'text')
  from peftjax.data import minilm_dir  # pylint: disable=g-import-not-at-top
  enc = Tokenizer(minilm_dir() / 'tokenizer.json', max_length=512).encode([text])
  ids = enc['input_ids'][0][enc['attention_mask'][0] > 0]
  return ids[1:-1]  # drop [CLS] and [SEP]: the prompt is content, not a second sentence


@register('prompt')
class PromptTuning(Method):
  """Soft prompts from config ``peft.prompt``: ``length``, ``init``, ``init_text``.

  >>> method = peft.build(config.peft)                        # doctest: +SKIP  (method='prompt')
  >>> prompts = method.init(rng, model, params, inputs)       # doctest: +SKIP  {'prompt': (20, D)}
  >>> logits = peft.apply(model, method, params, prompts, inputs)  # doctest: +SKIP
  """

  def __init__(self, peft_cfg):
    super().__init__(peft_cfg)
    sections.check_prompt(peft_cfg.prompt)

  def init(self, rng, module, base_params, inputs) -> dict:
    """``{'prompt': (n, D)}``: rows of the input embedding's table (random or the text's tokens).

    Also runs the model abstractly with the prompts, so a model that cannot take them fails
    here with a :class:`~peftjax.errors.ConfigError`, not in the first training step.
    """
    s = survey(module, base_params, inputs)
    _, table = input_embedding(module, base_params, inputs, s)
    n = self.cfg.prompt.length
    if self.cfg.prompt.init == 'vocab':
      ids = jax.random.randint(rng, (n,), 0, table.shape[0])
    else:
      ids = text_token_ids(self.cfg.prompt.init_text)
      if ids.size == 0:
        raise ConfigError(f'peft.prompt.init_text={self.cfg.prompt.init_text!r} has no tokens')
      if ids.max() >= table.shape[0]:
        raise ConfigError(f'peft.prompt.init_text={self.cfg.prompt.init_text!r} has token id '
                          f'{int(ids.max())} >= the model vocabulary ({table.shape[0]}); '
                          "'text' init needs the bundled tokenizer's vocabulary; use 'vocab'")
      ids = np.resize(ids, n)  # repeat cyclically, or cut, to n
    prompts = jnp.asarray(table, jnp.float32)[ids]
    self._dry_run(module, base_params, inputs, prompts, s)
    return {'prompt': prompts}

  def _dry_run(self, module, base_params, inputs, prompts, s: Survey) -> None:
    """The model traced with the prompts in: a failure is the model not taking ``n`` more
    positions; a silent miss (prompts or masks never reached) is refused too."""
    report = {}

    def forward(params, named, p):
      with prompt_scope(p, report):
        return module.apply({'params': params}, **named, **_mode(module))

    n = prompts.shape[0]
    how = (f'the {n} prompts are prepended to the output of its input embedding '
           f'{s.embed_path!r} (and ones to {", ".join(s.mask_inputs) or "no mask input"})')
    fix = ('Fix: give the model a `prompt_embeds` hook -- a keyword of its __call__ taking the '
           '(n, D) prompts and prepending them where the model can (e.g. after adding position '
           'embeddings; see peftjax/models/bert.py) -- or use a method that adds no positions '
           '(peft.method=lora, ia3, adapter, prefix on a model with a prefix_kv hook)')
    try:
      jax.eval_shape(forward, base_params, dict(inputs), prompts)
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any failure: a model/shape error)
      if 'prompt_embeds' in s.hooks:
        raise ConfigError(f'peft.method=prompt: {s.model} fails with prompts in its '
                          f'`prompt_embeds` hook (at {s.hooks["prompt_embeds"]!r}, '
                          f'peft.prompt.length={n}): {type(e).__name__}: {e}') from e
      raise ConfigError(
          f'peft.method=prompt: {s.model} cannot run with {n} extra positions '
          f'(peft.prompt.length={n}): {how}, and the model then fails with '
          f'{type(e).__name__}: {_short(e)}. It has no `prompt_embeds` hook (e.g. it adds a '
          f'position table sized from the ids\' length). {fix}') from e
    if report['mode'] == 'generic':
      missing = [k for k in s.mask_inputs if k not in report['masks']]
      if set(report['embedded']) != {s.embed_path} or missing:
        what = (f'its mask input(s) {missing} were not reached' if missing else
                f'the forward put them after {sorted(set(report["embedded"])) or "no layer"}')
        raise ConfigError(f'peft.method=prompt: {s.model}: {how}, but {what} (the model\'s own '
                          f'call is not visible to the method). {fix}')

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    del rng, deterministic  # the embedding dropout already covers the prompts
    return prompt_scope(peft_params['prompt'])

  def merge(self, base_params, peft_params) -> dict:
    raise NotImplementedError(
        'prompt tuning cannot be merged into the base weights: the prompts are extra input '
        'positions, not a change of any weight. Serve with peft.apply (or pass '
        "prompt_embeds=peft_params['prompt'] to BertEncoder) and export the prompts on their own.")

  def logical_specs(self, base_specs, peft_params):
    """The prompts shard their embedding axis like the word embeddings do."""
    del base_specs, peft_params
    return {'prompt': P(None, 'embed')}


def _short(e: Exception, limit: int = 300) -> str:
  text = ' '.join(str(e).split())
  return text if len(text) <= limit else text[:limit] + '...'
