"""Flax NNX models in peftjax: an ``nnx.Module`` seen as a linen-like module over a plain dict.

peftjax's methods are pure functions over a parameter tree and reach a model's layers by
interception (:mod:`peftjax.intercept`). :func:`from_nnx` makes an NNX model fit that
contract without editing it:

* its ``nnx.Param`` leaves become a plain nested dict (str keys; list indices ``'0'``,
  ``'1'``...), its sharding metadata (``nnx.with_partitioning``) the logical specs;
* :class:`NNXModel` (the ``Built.module``) keeps the graphdef and the other state (rng streams,
  batch statistics) and offers linen's ``apply({'params': params}, *args, rngs=, mutable=,
  deterministic=)``: each call rebuilds a fresh model from the dict, so nothing the user holds
  changes;
* leaves of ``params`` that the model does not have (a method's ``lora_a``, ``ia3_out/scale``...)
  are attached to the layer at their path as ``nnx.Param`` attributes before the forward, so the
  layer sees them beside its kernel and ``nnx.scan`` / ``nnx.vmap`` slice them like its weights;
* every module call (``__call__``, and ``nnx.Embed.attend``) runs through
  :func:`peftjax.intercept.run` when an interceptor is registered: the fresh instances'
  classes are swapped for cached subclasses that do so, and the interceptor's
  ``context.module`` is an :class:`NNXLayer` answering :mod:`peftjax.peft.layers`' questions.

Methods merge on the dict (``method.merge(built.params, peft)``); :func:`to_nnx` turns a dict
(e.g. merged weights) back into a live NNX model for serving.

>>> built = from_nnx(MyModel(rngs=nnx.Rngs(0)), input_keys=('input_ids',))  # doctest: +SKIP
>>> logits = built.module.apply({'params': built.params}, input_ids=ids)  # doctest: +SKIP

Limits: ``capture_intermediates`` returns an empty ``'intermediates'`` collection (plus what the
model ``sow``-ed); a collection the model does not have (``'moe'``) comes back as ``{}``; dropout
follows ``deterministic`` through the model's modules that have a ``deterministic`` attribute
(``nnx.Dropout``, ``nnx.MultiHeadAttention``) and draws from the model's rng streams re-keyed from
``rngs`` (``'dropout'`` also feeds a ``'default'`` stream); a model whose ``__call__`` takes
``deterministic`` gets it too.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import zlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import graphlib
from jax.sharding import PartitionSpec as P

from peftjax.errors import ConfigError
from peftjax.models.build import Built
from peftjax import intercept

_PATH_ATTR = '_peft_path'
_SHADOWS: dict[type, type] = {}   # user class -> its interceptable subclass
_ORIGINAL: dict[type, type] = {}  # and back


class _Leaves(nnx.Module):
  """A container for a method's nested leaves (``ia3_out/scale``, ``adapter/down/kernel``)."""


# ------------------------------------------------------------------ trees and paths
def _key_str(k) -> str:
  return str(k)


def _flat_dict(tree, prefix=()) -> dict[tuple, Any]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat_dict(v, (*prefix, k)))
    else:
      out[(*prefix, k)] = v
  return out


def _nest(flat: dict[tuple, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def _str_keys(tree):
  if not isinstance(tree, dict):
    return tree
  return {_key_str(k): _str_keys(v) for k, v in tree.items()}


def _children(node) -> dict:
  impl = graphlib.get_node_impl(node)
  if impl is None:
    return {}
  return dict(impl.node_dict(node))


def _modules(root):
  """(path string, module) of every module, each once, at the path its variables are stored
  under (the graph's flatten order: keys sorted, ints first)."""
  seen: set[int] = set()
  out = []

  def visit(node, path):
    if id(node) in seen or isinstance(node, nnx.Variable):
      return
    impl = graphlib.get_node_impl(node)
    if impl is None:
      return
    seen.add(id(node))
    if isinstance(node, nnx.Module):
      out.append(('/'.join(map(_key_str, path)), node))
    for k, child in sorted(_children(node).items(), key=graphlib._type_aware_sort):  # pylint: disable=protected-access
      if not isinstance(k, str) or not k.startswith('_pytree__'):
        visit(child, (*path, k))

  visit(root, ())
  return out


def _copy(x):
  if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(jnp.array(jax.random.key_data(x)), impl=jax.random.key_impl(x))
  return jnp.array(x)


def _spec(var) -> P:
  meta = var.get_metadata()
  names = meta.get('out_sharding') or meta.get('sharding_names')
  return P(*names) if names else P()


# ------------------------------------------------------------------ the layer view
def _parse_einsum(spec: str):
  """``(x labels, kernel labels, out labels, ellipsis)`` of a two-operand einsum string."""
  spec = spec.replace(' ', '')
  lhs, out = spec.split('->')
  x, k = lhs.split(',')
  ell = x.startswith('...')
  strip = lambda s: s[3:] if s.startswith('...') else s
  return strip(x), k, strip(out), ell, ('...' in x[3:] or '...' in k or
                                       '...' in strip(out) or ell != out.startswith('...'))


def einsum_why_not(spec: str) -> str | None:
  """Why an ``nnx.Einsum`` equation is not a matmul a method can adapt (``None`` if it is).

  Matmul-shaped: output = the input's uncontracted labels, then the kernel's output labels;
  kernel = the contracted labels (in the input's order), then the output labels; no label in
  all three.

  >>> einsum_why_not('btd,dh->bth') is None
  True
  >>> einsum_why_not('bhd,hdk->bk')[:30]
  "its output 'bk' is not the inpu"
  """
  x, k, out, ell, bad_ell = _parse_einsum(spec)
  if bad_ell:
    return 'an ellipsis is only supported as the leading labels of the input and the output'
  if len(set(x)) != len(x) or len(set(k)) != len(k) or len(set(out)) != len(out):
    return 'a label repeats within an operand'
  shared = set(x) & set(k) & set(out)
  if shared:
    return f'labels {"".join(sorted(shared))!r} are in the input, the kernel and the output'
  contracted = ''.join(c for c in x if c in k)
  kernel_out = ''.join(c for c in k if c not in x)
  if k != contracted + kernel_out:
    return (f'its kernel {k!r} is not the contracted labels {contracted!r} (in the input\'s '
            f'order) followed by the output labels {kernel_out!r}')
  want = ''.join(c for c in x if c not in k) + kernel_out
  if out != want:
    return (f'its output {out!r} is not the input\'s uncontracted labels then the kernel\'s '
            f'output labels ({want!r})')
  if not contracted or not kernel_out:
    return 'it contracts no label or produces no kernel output label'
  return None


def _base_class(mod) -> type:
  return _ORIGINAL.get(type(mod), type(mod))


class NNXLayer:
  """What an interceptor sees of an NNX layer call (``context.module``): the ``peft_*``
  protocol of :mod:`peftjax.peft.layers`, over the live module of this call (inside ``nnx.scan``
  the one layer's slice).

  ``module`` is the NNX module itself; ``path`` / ``variables`` mirror linen's for code that
  reads them.
  """

  def __init__(self, module, method_name: str = '__call__', einsum_str: str | None = None):
    self.module = module
    self.method_name = method_name
    self._einsum = einsum_str

  def __repr__(self):
    return f'NNXLayer({_base_class(self.module).__name__} at {self.peft_path()!r})'

  @property
  def path(self) -> tuple:
    p = self.peft_path()
    return tuple(p.split('/')) if p else ()

  @property
  def variables(self) -> dict:
    return {'params': self.peft_params()}

  def _einsum_str(self) -> str:
    return (self._einsum or self.module.einsum_str).replace(' ', '')

  def peft_why_not(self) -> str | None:
    """Why a method cannot adapt this layer's kernel (``None`` if it can, or it has none)."""
    if isinstance(self.module, nnx.Einsum):
      why = einsum_why_not(self._einsum_str())
      if why:
        return f'nnx.Einsum {self._einsum_str()!r} at {self.peft_path()!r} is not matmul-shaped: {why}'
    return None

  def peft_kind(self) -> str | None:
    m = self.module
    if isinstance(m, nnx.Embed):
      return 'embed'
    if isinstance(m, nnx.Conv):
      return 'conv'
    if isinstance(m, (nnx.Linear, nnx.LinearGeneral)):
      return 'dense'
    if isinstance(m, nnx.Einsum):
      return 'dense' if einsum_why_not(self._einsum_str()) is None else None
    return None

  def peft_path(self) -> str:
    return getattr(self.module, _PATH_ATTR, '')

  def peft_params(self) -> dict:
    return _str_keys(nnx.to_pure_dict(nnx.state(self.module, nnx.Param)))

  def peft_contracted_axes(self, x_ndim: int) -> tuple:
    """The input axes contracted (non-negative, ascending): the kernel's stored order.

    ``nnx.LinearGeneral`` contracts its ``axis`` sorted (as linen does), whatever order it is
    listed in; ``in_features`` must follow that sorted order. A matmul-shaped ``nnx.Einsum``'s
    kernel lists its contracted labels in the input's order.
    """
    m = self.module
    if isinstance(m, nnx.LinearGeneral):
      if m.batch_axis:
        raise ConfigError(f'{self.peft_path()}: LinearGeneral with batch_axis is not supported')
      return tuple(sorted(a % x_ndim for a in m.axis))
    if isinstance(m, nnx.Einsum):
      x, k, _, ell, _ = _parse_einsum(self._einsum_str())
      offset = x_ndim - len(x) if ell else 0
      return tuple(offset + x.index(c) for c in k if c in x)
    return (x_ndim - 1,)

  def peft_out_ndim(self) -> int:
    m = self.module
    if isinstance(m, nnx.LinearGeneral):
      return len(m.out_features)
    if isinstance(m, nnx.Einsum):
      x, k, _, _, _ = _parse_einsum(self._einsum_str())
      return sum(c not in x for c in k)
    return 1

  def peft_conv_with(self, x, kernel):
    """The layer's convolution of ``x`` with ``kernel`` (its strides, padding, dilation), no bias."""
    m = self.module
    if m.feature_group_count != 1:
      raise ConfigError(f'{self.peft_path()}: LoRA on a grouped convolution (feature_group_count='
                        f'{m.feature_group_count}) is not supported')
    base = _base_class(m)
    twin = object.__new__(base)
    twin.__dict__.update(vars(m))
    twin.__dict__.update(kernel=kernel, kernel_shape=tuple(kernel.shape), mask=None, bias=None,
                         use_bias=False, out_features=int(kernel.shape[-1]))
    return base.__call__(twin, x)


# ------------------------------------------------------------------ interception
def _intercepted(name: str, fun_of):
  def method(self, *args, **kwargs):
    fun = fun_of(self)
    if not intercept.active():
      return fun(*args, **kwargs)
    einsum = kwargs.get('einsum_str', args[1] if len(args) > 1 else None) \
        if isinstance(self, nnx.Einsum) else None
    view = NNXLayer(self, name, einsum if isinstance(einsum, str) else None)
    return intercept.run(view, name, fun, args, kwargs)
  method.__name__ = name
  return method


def _shadow(cls: type) -> type:
  """``cls``'s subclass whose ``__call__`` (and ``attend``) go through the interceptors."""
  if cls in _SHADOWS:
    return _SHADOWS[cls]
  body = {}
  if any('__call__' in vars(k) for k in cls.__mro__[:-1]):
    body['__call__'] = _intercepted('__call__', lambda self: cls.__call__.__get__(self))
  if issubclass(cls, nnx.Embed):
    body['attend'] = _intercepted('attend', lambda self: cls.attend.__get__(self))
  body.update(__module__=cls.__module__, __qualname__=cls.__qualname__, __doc__=cls.__doc__)
  shadow = types.new_class(cls.__name__, (cls,), {'pytree': cls._pytree__is_pytree},  # pylint: disable=protected-access
                           lambda ns: ns.update(body))
  _SHADOWS[cls], _ORIGINAL[shadow] = shadow, cls
  return shadow


# ------------------------------------------------------------------ the wrapper
def _attach(root, path: tuple, value):
  """Sets ``value`` as an ``nnx.Param`` at ``path`` (str keys) under the deepest existing
  module on it, creating containers for the rest."""
  node, i = root, 0
  while i < len(path) - 1:
    kids = {_key_str(k): c for k, c in _children(node).items()}
    child = kids.get(path[i])
    if child is None or not graphlib.is_node(child):
      break
    node, i = child, i + 1
  if not isinstance(node, nnx.Module):
    raise ValueError(f'params leaf {"/".join(path)}: {"/".join(path[:i])} is not a module, '
                     'so the leaf cannot be attached to it')
  for k in path[i:-1]:
    if isinstance(vars(node).get(k), nnx.Variable):
      raise ValueError(f'params leaf {"/".join(path)}: {k} is a variable, not a module')
    if k not in vars(node):
      setattr(node, k, _Leaves())
    node = getattr(node, k)
  if isinstance(vars(node).get(path[-1]), nnx.Variable):
    raise ValueError(f'params leaf {"/".join(path)} clashes with a non-Param variable')
  setattr(node, path[-1], nnx.Param(value))


def _rekey(rest_flat, rngs) -> list:
  """The rest state with each rng stream's key drawn from ``rngs`` (by the stream's tag;
  ``'dropout'`` also feeds ``'default'``), distinct per stream and per stacked layer."""
  if not rngs:
    return rest_flat
  out = []
  for path, tag, value in rest_flat:
    key = None if tag is None else rngs.get(tag, rngs.get('dropout') if tag == 'default' else None)
    if key is not None:
      key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
      if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
      key = jax.random.fold_in(key, zlib.crc32('/'.join(map(_key_str, path)).encode()))
      value = jax.random.split(key, value.shape) if value.shape else key
    out.append((path, tag, value))
  return out


def _takes_deterministic(cls) -> bool:
  try:
    params = inspect.signature(cls.__call__).parameters
  except (TypeError, ValueError):
    return False
  return 'deterministic' in params


@dataclasses.dataclass(frozen=True, eq=False)
class NNXModel:
  """A linen-like view of an NNX model (the ``Built.module`` of :func:`from_nnx`).

  Holds the graphdef, the paths of the model's ``nnx.Param`` leaves (dict key path -> graph
  path) and its other state (rng streams, batch statistics) as values. Hashes by identity.

  >>> out = built.module.apply({'params': params}, input_ids=ids, deterministic=True)  # doctest: +SKIP
  """
  graphdef: Any
  param_paths: dict          # ('layers', '0', 'kernel') -> ('layers', 0, 'kernel')
  rest: tuple                # ((graph path, rng-key stream tag or None, value), ...)
  takes_deterministic: bool  # the model's own __call__ has a `deterministic` argument
  initial_params: Any = None

  def __call__(self, *args, deterministic: bool = True, **kwargs):
    """Not callable: use ``apply({'params': params}, ...)``. (The signature tells
    :func:`peftjax.peft.base.apply` that ``deterministic`` is accepted.)"""
    raise TypeError('an NNXModel runs with .apply({"params": params}, ...), as a linen module')

  def init(self, rng=None, *args, **kwargs) -> dict:
    """The parameters the model was wrapped with (``rng`` and inputs are ignored)."""
    del rng, args, kwargs
    return {'params': self.initial_params}

  def live(self, params: dict, *, rngs=None, deterministic: bool | None = None,
           shadow: bool = True):
    """A fresh NNX model holding ``params``; with ``shadow`` its layers are interceptable and
    the leaves of ``params`` the model lacks are attached to their layers."""
    flat = _flat_dict(params)
    missing = [p for p in self.param_paths if p not in flat]
    if missing:
      raise ValueError(f'params lack {len(missing)} leaves of the NNX model, e.g. '
                       f'{["/".join(p) for p in missing[:3]]}')
    known = [(self.param_paths[p], v) for p, v in flat.items() if p in self.param_paths]
    extra = {p: v for p, v in flat.items() if p not in self.param_paths}
    if extra and not shadow:
      raise ValueError(f'params hold leaves the NNX model does not have, e.g. '
                       f'{["/".join(p) for p in list(extra)[:3]]}; merge the method first')
    rest = [(path, value) for path, _, value in _rekey(self.rest, rngs or {})]
    model = nnx.merge(self.graphdef, nnx.from_flat_state(known),
                      nnx.from_flat_state(rest))
    if deterministic is not None:
      for _, mod in _modules(model):
        if 'deterministic' in vars(mod):
          mod.deterministic = deterministic
    if shadow:
      for path, mod in _modules(model):
        object.__setattr__(mod, _PATH_ATTR, path)
        mod.__class__ = _shadow(type(mod))
      for p, v in extra.items():
        _attach(model, p, v)
    return model

  def apply(self, variables: dict, *args, rngs=None, mutable=False, capture_intermediates=False,
            deterministic: bool | None = None, method=None, **kwargs):
    """Linen's ``apply``: ``out``, or ``(out, collections)`` when ``mutable`` names some.

    ``rngs`` re-key the model's rng streams; ``deterministic`` sets its dropout layers (and is
    passed to the model's ``__call__`` if it takes it); ``method`` (a name or a function of the
    model) runs instead of ``__call__``. ``mutable`` collections: ``'batch_stats'`` (the
    updated ``nnx.BatchStat`` values), ``'intermediates'`` (what the model ``sow``-ed;
    ``capture_intermediates`` adds nothing), any other (``'moe'``) ``{}``.
    """
    model = self.live(variables['params'], rngs=rngs, deterministic=deterministic)
    if deterministic is not None and method is None and self.takes_deterministic:
      kwargs['deterministic'] = deterministic
    if method is None:
      out = model(*args, **kwargs)
    elif isinstance(method, str):
      out = getattr(model, method)(*args, **kwargs)
    else:
      out = method(model, *args, **kwargs)
    if not mutable and not capture_intermediates:
      return out
    names = ['intermediates'] if mutable is True else list(mutable or ())
    if capture_intermediates and 'intermediates' not in names:
      names.append('intermediates')
    return out, {n: self._collection(model, n) for n in names}

  @staticmethod
  def _collection(model, name: str) -> dict:
    kind = {'batch_stats': nnx.BatchStat, 'intermediates': nnx.Intermediate}.get(name)
    if kind is None:
      return {}
    return _str_keys(nnx.to_pure_dict(nnx.state(model, kind)))


def from_nnx(model: nnx.Module, *, input_keys, source: str = 'nnx') -> Built:
  """A :class:`~peftjax.models.build.Built` for an NNX model: every peftjax method, the
  trainer, checkpoints and delta adapters then take it as they take a linen model.

  ``input_keys`` are the batch keys passed to the model's ``__call__`` as keyword arguments.
  The model is not changed (its state is copied).

  >>> built = from_nnx(Classifier(rngs=nnx.Rngs(0)), input_keys=('input_ids',))  # doctest: +SKIP
  """
  graphdef, params_state, rest_state = nnx.split(model, nnx.Param, ...)
  params, specs, paths = {}, {}, {}
  for path, var in nnx.to_flat_state(params_state):
    key = tuple(map(_key_str, path))
    if key in paths:
      raise ValueError(f'two parameters of the NNX model map to {"/".join(key)}')
    paths[key] = tuple(path)
    params[key] = _copy(var.get_value())  # a copy: a training step may donate its buffers
    specs[key] = _spec(var)
  # Raw values: nnx.merge rebuilds fresh Variables from the graphdef, so the user's model and
  # this copy never share (and mutate) one.
  rest = tuple((tuple(path), var.get_metadata().get('tag') if isinstance(var, nnx.RngKey) else None,
                _copy(var.get_raw_value())) for path, var in nnx.to_flat_state(rest_state))
  params = _nest(params)
  module = NNXModel(graphdef, paths, rest, _takes_deterministic(type(model)), params)
  return Built(module, params, tuple(input_keys), _nest(specs), source)


def to_nnx(built_or_module, params: dict) -> nnx.Module:
  """A live NNX model (the user's own classes) holding ``params``, e.g. merged weights for
  serving: ``to_nnx(built, method.merge(built.params, peft))``.

  >>> served = to_nnx(built, lora.merge(built.params, trained))  # doctest: +SKIP
  """
  module = getattr(built_or_module, 'module', built_or_module)
  if not isinstance(module, NNXModel):
    raise TypeError(f'to_nnx takes a Built of from_nnx or its NNXModel, not {type(module).__name__}')
  return module.live(params, shadow=False)


__all__ = ['NNXModel', 'NNXLayer', 'from_nnx', 'to_nnx', 'einsum_why_not']
