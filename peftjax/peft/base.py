"""The PEFT method interface, its registry, and running a model through a method.

A method is a functional transform over the parameter pytree:

* ``init(rng, module, base_params, inputs) -> peft_params`` — its own trainable tree
  (``{}`` for methods that only unfreeze base leaves);
* ``trainable_base`` — a selector of *base* leaves that also train (a fresh head, biases...);
* ``intercept(peft_params, rng, deterministic)`` — a context manager under which
  ``module.apply`` runs with the method in effect; the model's code is never edited;
* ``prepare_base(base_params, peft_params, *, module=None, inputs=None)`` — the base the method
  trains against, made once after ``init`` (identity for most methods; PiSSA keeps the residual
  of W there; QLoRA stores it in int8 and needs the model to find its layers);
* ``forward_base(base_params, peft_params, *, module=None, inputs=None)`` — the weights a forward
  pass uses, made inside the step (identity; QAT fake-quantizes them); :func:`apply` passes the
  model;
* ``merge(base_params, peft_params)`` — fold the method into the base weights, where possible;
* ``layer_tree(peft_params)`` — the method's per-layer leaves, which :func:`apply` puts beside
  the weights they adapt, so lifted transforms (``nn.scan``) slice them per layer;
* ``logical_specs(base_specs, peft_params)`` — logical axis names for its parameters, so they
  shard like the weights they adapt.

Methods are pure: the object holds only its config. What ``init`` discovers about a model (the
layers it adapts) is recovered from what it returns — the tree's paths and shapes, the base,
and the layer being called — and what calibration produces is returned in the tree, so one
method object serves any number of models.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

import jax

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft import layers
from peftjax.peft import sections
from peftjax.intercept import intercept_methods

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
  """Class decorator adding a method to the registry under ``name``."""
  def deco(cls):
    if name in _REGISTRY:
      raise ValueError(f'PEFT method {name!r} registered twice')
    cls.name = name
    _REGISTRY[name] = cls
    return cls
  return deco


def method_names() -> tuple[str, ...]:
  """Names accepted by ``--config.peft.method`` (join several with '+' to compose them)."""
  from peftjax import peft as package  # pylint: disable=g-import-not-at-top
  package.load_methods()
  return tuple(sorted(_REGISTRY))


def build(peft_cfg) -> 'Method':
  """The method selected by ``peft_cfg.method``, configured from ``peft_cfg``.

  ``'lora+ia3'`` composes methods (see :class:`Compose`).

  >>> method = build(config.peft)  # doctest: +SKIP
  """
  from peftjax import peft as package  # pylint: disable=g-import-not-at-top
  package.load_methods()  # the registry holds every method
  sections.check(peft_cfg)  # each method's sub-section, as the command line's validation does
  names = peft_cfg.method.split('+')
  unknown = [n for n in names if n not in _REGISTRY]
  if unknown or len(set(names)) != len(names):
    raise ConfigError(f'peft.method={peft_cfg.method!r} is invalid; valid: one of '
                      f'{", ".join(method_names())}, or several distinct ones joined by "+"')
  if len(names) == 1:
    return _REGISTRY[names[0]](peft_cfg)
  return Compose([_REGISTRY[n](peft_cfg) for n in names])


class Method:
  """Base class: a method that trains nothing of its own and unfreezes ``trainable_base``."""
  name = 'base'
  # Whether the method puts keys/values before every sequence through a model's hook (prompt,
  # prefix tuning): decoding then computes that prefix once and keeps it in the KV cache.
  adds_prefix = False

  def __init__(self, peft_cfg):
    self.cfg = peft_cfg

  @property
  def trainable_base(self) -> tree_lib.Selector:
    """Base leaves that train alongside the method's own parameters (by default the head)."""
    return self.cfg.head

  def init(self, rng, module, base_params, inputs) -> dict:
    del rng, module, base_params, inputs
    return {}

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    del peft_params, rng, deterministic
    return contextlib.nullcontext()

  def prepare_base(self, base_params, peft_params, *, module=None, inputs=None) -> dict:
    """The (frozen) base this method trains against; called once, right after ``init``.

    ``module`` and ``inputs`` (a sample batch, as for ``init``) are for methods that must look
    at the model's layers to change the base (QLoRA); the others ignore them.
    """
    del peft_params, module, inputs
    return base_params

  def base_logical_specs(self, base_specs) -> Any:
    """Logical axes of :meth:`prepare_base`'s output (the same tree unless it changes leaves)."""
    return base_specs

  def forward_base(self, base_params, peft_params, *, module=None, inputs=None) -> dict:
    """The base weights a forward pass computes with, made inside the step (QAT fake-quantizes
    them here, QLoRA dequantizes them); the base itself by default. :func:`apply` passes the
    model and this forward's inputs, for methods that must find its layers (QAT)."""
    del peft_params, module, inputs
    return base_params

  def merge(self, base_params, peft_params) -> dict:
    del peft_params
    return base_params

  def layer_tree(self, peft_params) -> dict:
    """The part of the method's tree that mirrors the model's layers (``<layer>/lora_a``...),
    put beside their weights in the forward's ``params`` (see :func:`with_layer_trees`);
    ``{}`` for methods whose parameters are not per layer."""
    del peft_params
    return {}

  def logical_specs(self, base_specs, peft_params) -> Any:
    del base_specs
    return jax.tree.map(lambda x: None, peft_params)


@contextlib.contextmanager
def layer_scope(types: tuple, paths, wrap: Callable, *, method: str = '__call__'):
  """Intercepts ``method`` (``__call__`` by default) of the layers whose '/'-path is in ``paths``.

  ``types`` names the layers: kinds of :func:`layers.kind` (``'dense'``, ``'embed'``,
  ``'conv'``: linen and NNX layers alike) or linen module classes. For each such call,
  ``wrap(path, module, call, x)`` runs instead of the layer, where ``x`` is the layer's input
  and ``call(x2)`` runs the original layer on ``x2`` (other arguments kept). The shared core of
  methods that act on layers from outside the model's code.

  >>> with layer_scope(('dense',), {'head'}, lambda p, m, call, x: 2 * call(x)):  # doctest: +SKIP
  ...   y = model.apply(variables, x)
  """
  paths = set(paths)
  kinds = {t for t in types if isinstance(t, str)}
  classes = tuple(t for t in types if not isinstance(t, str))

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != method or not (
        (classes and isinstance(mod, classes)) or (kinds and layers.kind(mod) in kinds)):
      return next_fun(*args, **kwargs)
    path = layers.path(mod)
    if path not in paths:
      return next_fun(*args, **kwargs)
    if args:
      return wrap(path, mod, lambda x2: next_fun(x2, *args[1:], **kwargs), args[0])
    first = next(iter(kwargs))
    return wrap(path, mod, lambda x2: next_fun(**{**kwargs, first: x2}), kwargs[first])

  with intercept_methods(interceptor):
    yield


def with_layer_trees(base_params, method: 'Method', peft_params) -> dict:
  """``base_params`` with the method's layer-mirroring leaves beside the weights they adapt.

  A method's leaves that mirror the model (``<layer>/lora_a`` beside ``<layer>/kernel``) go into
  the ``params`` collection, so each layer call reads its own from its variables
  (:func:`layers.params`): a lifted transform such as ``nn.scan`` then slices them with the
  weights, and the update runs per layer inside its body.
  """
  extra = tree_lib.flatten(method.layer_tree(peft_params))
  if not extra:
    return base_params
  flat = tree_lib.flatten(base_params)
  clash = sorted(p for p in extra if p in flat)
  if clash:
    raise ValueError(f'{method.name}: its leaves {clash[:3]} have the paths of base weights')
  return tree_lib.unflatten({**flat, **extra})


def apply(module, method: Method, base_params, peft_params, inputs: dict, *, rng=None,
          deterministic: bool = True, with_aux: bool = False, capture=None):
  """Runs ``module`` with ``method`` applied: the one forward used for training and eval.

  With ``with_aux`` it returns ``(output, aux)`` where ``aux`` is the ``'moe'`` collection the
  model's MoE layers sowed (routing losses and reports; ``{}`` for a dense model). With a
  ``capture`` filter (flax's ``capture_intermediates``, e.g. every layer's output for
  distillation) it returns ``(output, aux, intermediates)``.

  >>> logits = apply(model, method, base, peft, {'input_ids': ids, ...})  # doctest: +SKIP
  """
  rngs = {}
  method_rng = None
  if not deterministic:
    if rng is None:
      raise ValueError('a training forward (deterministic=False) needs an rng for dropout')
    rngs['dropout'], method_rng = jax.random.split(rng)
  base_params = method.forward_base(base_params, peft_params, module=module, inputs=inputs)
  # Models whose __call__ has no `deterministic` argument (many models written elsewhere) run
  # without it; their dropout, if any, still draws from the 'dropout' rng.
  mode = {'deterministic': deterministic} if takes_deterministic(module) else {}
  base_params = with_layer_trees(base_params, method, peft_params)
  with method.intercept(peft_params, rng=method_rng, deterministic=deterministic):
    if capture is not None:
      out, state = module.apply({'params': base_params}, **inputs, **mode, rngs=rngs,
                                mutable=['moe', 'intermediates'],
                                capture_intermediates=capture)
      return out, state.get('moe', {}), state.get('intermediates', {})
    if with_aux:
      out, state = module.apply({'params': base_params}, **inputs, **mode, rngs=rngs,
                                mutable=['moe'])
      return out, state.get('moe', {})
    return module.apply({'params': base_params}, **inputs, **mode, rngs=rngs)


def takes_deterministic(module) -> bool:
  """Whether ``module.__call__`` accepts a ``deterministic`` keyword (or any keyword).

  >>> takes_deterministic(flax.linen.Dense(3))
  False
  """
  try:
    params = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return True
  return 'deterministic' in params or any(
      p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class Compose(Method):
  """Several methods at once: ``--config.peft.method=lora+ia3``.

  Each keeps its own parameters under its name (``{'lora': ..., 'ia3': ...}``), the trainable
  base is the union of theirs, and their interceptors are entered in the order listed, so the
  first listed sees (and wraps) the result of the others. ``merge`` folds them in reverse order,
  innermost first, which reproduces the composed forward for methods that fold exactly.

  >>> method = build(ml_collections.ConfigDict({**cfg, 'method': 'lora+ia3'}))  # doctest: +SKIP
  """

  def __init__(self, methods: list[Method]):
    super().__init__(methods[0].cfg)
    self.methods = methods
    self.name = '+'.join(m.name for m in methods)
    self.adds_prefix = any(m.adds_prefix for m in methods)

  @property
  def trainable_base(self):
    preds = [tree_lib.make_selector(m.trainable_base) for m in self.methods]
    return lambda path, leaf: any(p(path, leaf) for p in preds)

  def init(self, rng, module, base_params, inputs) -> dict:
    out = {}
    for i, m in enumerate(self.methods):
      out[m.name] = m.init(jax.random.fold_in(rng, i), module, base_params, inputs)
      base_params = m.prepare_base(base_params, out[m.name], module=module, inputs=inputs)
    return out

  def prepare_base(self, base_params, peft_params, *, module=None, inputs=None) -> dict:
    for m in self.methods:
      base_params = m.prepare_base(base_params, peft_params[m.name], module=module, inputs=inputs)
    return base_params

  @contextlib.contextmanager
  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    with contextlib.ExitStack() as stack:
      for i, m in enumerate(self.methods):
        key = None if rng is None else jax.random.fold_in(rng, i)
        stack.enter_context(m.intercept(peft_params[m.name], rng=key,
                                        deterministic=deterministic))
      yield

  def base_logical_specs(self, base_specs):
    for m in self.methods:
      base_specs = m.base_logical_specs(base_specs)
    return base_specs

  def forward_base(self, base_params, peft_params, *, module=None, inputs=None) -> dict:
    for m in self.methods:
      base_params = m.forward_base(base_params, peft_params[m.name], module=module, inputs=inputs)
    return base_params

  def layer_tree(self, peft_params) -> dict:
    flat = {}
    for m in self.methods:
      mine = tree_lib.flatten(m.layer_tree(peft_params[m.name]))
      clash = sorted(set(mine) & set(flat))
      if clash:
        raise ConfigError(f'peft.method={self.name!r}: its methods use the same leaves '
                          f'{clash[:3]}; valid: methods with distinct parameters')
      flat.update(mine)
    return tree_lib.unflatten(flat)

  def merge(self, base_params, peft_params) -> dict:
    for m in reversed(self.methods):
      base_params = m.merge(base_params, peft_params[m.name])
    return base_params

  def logical_specs(self, base_specs, peft_params):
    return {m.name: m.logical_specs(base_specs, peft_params[m.name]) for m in self.methods}
