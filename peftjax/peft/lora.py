"""LoRA as a functional transform (Hu et al., 2021).

For every ``nn.Dense``, ``nn.DenseGeneral`` or ``nn.Embed`` whose weight path matches
``peft.lora.targets``, LoRA adds a rank-r update. In training it is applied *implicitly*::

    y = x·W + s·(x·A)·B          s = alpha / r,  A: (in..., r),  B: (r, out...),  B = 0 at init

through ``flax.linen.intercept_methods``, so the model's code is untouched and neither
``W + s·A·B`` nor the (in × out) weight gradient is ever formed. :func:`merge` folds the update
into ``W`` for export and serving; :func:`unmerge` takes it out again.

The LoRA tree mirrors the base tree: ``encoder/layer_0/attention/query/{lora_a, lora_b}``, and
its logical axes are the adapted kernel's (input axes on A, output axes on B), so it shards like
the weight it adapts.

Mixture-of-Experts layers (modules with an ``EXPERT_KERNELS`` attribute, see
``peftjax/moe/layer.py``) expose their stacked expert kernels ``(E, in, out)`` as sites of kind
``'expert'``: A is ``(E, in, r)`` and B ``(E, r, out)``, one pair per expert, passed to the layer
through its ``expert_lora`` hook so the update runs inside the batched expert matmul (and inside
``shard_map``, split over the expert axis, under expert parallelism).
"""
from __future__ import annotations

import contextlib
import dataclasses
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft.base import Method
from peftjax.peft.base import layer_scope
from peftjax.peft.base import register

_SUPPORTED = (nn.Dense, nn.DenseGeneral, nn.Embed)
_RECORDED = (*_SUPPORTED, nn.Conv)  # layers find_sites knows; Conv only when asked (quantization)
_WEIGHT_NAME = {nn.Dense: 'kernel', nn.DenseGeneral: 'kernel', nn.Embed: 'embedding',
                nn.Conv: 'kernel'}


@dataclasses.dataclass(frozen=True)
class Site:
  """One adapted layer: its module path, kind, and how its weight splits into in/out axes."""
  path: str            # module path, e.g. 'encoder/layer_0/attention/query'
  kind: str            # 'dense', 'embed' or 'conv'
  in_shape: tuple      # weight dims contracted with the input (the vocabulary for 'embed')
  out_shape: tuple     # weight dims of the output features
  x_axes: tuple        # input axes contracted (dense only), non-negative
  experts: int = 0     # 'expert' sites: the number of experts (leading weight axis)

  @property
  def weight_path(self) -> str:
    return f"{self.path}/{'embedding' if self.kind == 'embed' else 'kernel'}"

  @property
  def d_in(self) -> int:
    return int(np.prod(self.in_shape))

  @property
  def d_out(self) -> int:
    return int(np.prod(self.out_shape))


def _is_moe(mod) -> bool:
  return bool(getattr(type(mod), 'EXPERT_KERNELS', ()))


def _record_modules(module, base_params, inputs, types: tuple = _RECORDED
                    ) -> dict[str, tuple[nn.Module, int]]:
  """Module path -> (module, input ndim) for every ``types`` layer (and MoE layer) the forward
  pass calls."""
  seen: dict[str, tuple] = {}

  def spy(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == '__call__' and (isinstance(mod, types) or _is_moe(mod)):
      x = args[0] if args else next(iter(kwargs.values()))
      seen['/'.join(mod.path)] = (mod, np.ndim(x))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(spy):
    jax.eval_shape(lambda p: module.apply({'params': p}, **inputs), base_params)
  return seen


def find_sites(module, base_params, inputs, targets: str | list[str], *,
               field: str = 'peft.lora.targets', user: str = 'LoRA', conv: bool = False,
               experts: bool = False) -> list[Site]:
  """The layers LoRA adapts: supported modules whose weight path matches ``targets``.

  Raises a ConfigError naming ``field`` and listing the closest weight paths when nothing
  matches, and when a match is a weight ``user`` cannot handle (e.g. a Conv kernel or a
  LayerNorm scale). Quantization finds its layers with the same function (``conv=True``
  also accepts ``nn.Conv`` kernels: in ``(kh, kw, c_in)``, out ``(c_out,)``); ``experts=True``
  accepts the stacked expert kernels of MoE layers (kind ``'expert'``).
  """
  pred = tree_lib.make_selector(targets)
  flat = tree_lib.flatten(base_params)
  matched = [p for p in flat if pred(p, flat[p])]
  modules = _record_modules(module, base_params, inputs)
  weight_paths = {f'{p}/{_WEIGHT_NAME[type(m)]}': p for p, (m, _) in modules.items()
                  if not _is_moe(m) and (conv or not isinstance(m, nn.Conv))}
  expert_paths = {f'{p}/{name}/kernel': f'{p}/{name}' for p, (m, _) in modules.items()
                  if _is_moe(m) and experts for name in type(m).EXPERT_KERNELS}
  if not matched:
    near = tree_lib.closest_paths(str(targets), list(weight_paths) or list(flat))
    raise ConfigError(f'{field}={targets!r} matches no parameter; closest weight paths: '
                      f'{near}')
  unsupported = [p for p in matched if p not in weight_paths and p not in expert_paths]
  if unsupported:
    raise ConfigError(
        f'{field}={targets!r} matches {unsupported[:3]}, which {user} cannot handle; it '
        'takes the kernel of nn.Dense/nn.DenseGeneral and the embedding of nn.Embed, e.g. '
        f'{sorted(weight_paths)[:3]}')
  sites = []
  for wp in matched:
    if wp in expert_paths:
      e, d_in, d_out = flat[wp].shape
      sites.append(Site(expert_paths[wp], 'expert', (d_in,), (d_out,), (), experts=e))
      continue
    path = weight_paths[wp]
    mod, x_ndim = modules[path]
    w_shape = tuple(flat[wp].shape)
    if isinstance(mod, nn.Embed):
      sites.append(Site(path, 'embed', w_shape[:1], w_shape[1:], ()))
      continue
    if isinstance(mod, nn.Conv):
      sites.append(Site(path, 'conv', w_shape[:-1], w_shape[-1:], ()))
      continue
    if isinstance(mod, nn.DenseGeneral):
      if mod.batch_dims:
        raise ConfigError(f'{path}: {user} does not support DenseGeneral with batch_dims')
      axis = (mod.axis,) if isinstance(mod.axis, int) else tuple(mod.axis)
    else:
      axis = (-1,)
    x_axes = tuple(a % x_ndim for a in axis)
    n_in = len(x_axes)
    sites.append(Site(path, 'dense', w_shape[:n_in], w_shape[n_in:], x_axes))
  return sites


def _scale(cfg) -> float:
  """alpha / r, or alpha / sqrt(r) with ``peft.lora.rslora`` (keeps the update's scale stable in r)."""
  rank = float(cfg.lora.rank)
  return float(cfg.lora.alpha) / (np.sqrt(rank) if cfg.lora.rslora else rank)


def init_sites(rng, sites: list[Site], rank: int) -> dict:
  """A (uniform, fan-in scaled, as PEFT's kaiming init) and B = 0 for every site."""
  flat = {}
  for site in sites:
    if rank <= 0 or rank > min(site.d_in, site.d_out):
      raise ConfigError(
          f'peft.lora.rank={rank} is invalid for {site.weight_path} (in {site.d_in}, out '
          f'{site.d_out}); valid: 1 <= rank <= {min(site.d_in, site.d_out)}')
    key = jax.random.fold_in(rng, zlib.crc32(site.path.encode()))
    lead = (site.experts,) if site.kind == 'expert' else ()
    if site.kind == 'expert':
      bound = 1.0 / np.sqrt(site.d_in)
      a = jax.random.uniform(key, (*lead, *site.in_shape, rank), jnp.float32, -bound, bound)
    elif site.kind == 'embed':
      a = jax.random.normal(key, (*site.in_shape, rank), jnp.float32) / np.sqrt(rank)
    else:
      bound = 1.0 / np.sqrt(site.d_in)
      a = jax.random.uniform(key, (*site.in_shape, rank), jnp.float32, -bound, bound)
    flat[f'{site.path}/lora_a'] = a
    flat[f'{site.path}/lora_b'] = jnp.zeros((*lead, rank, *site.out_shape), jnp.float32)
  return tree_lib.unflatten(flat)


def _lora_delta(site: Site, x, a, b, scale, dtype):
  """``s·(x·A)·B`` for one site, contracting exactly the axes the layer contracts."""
  a, b = a.astype(dtype), b.astype(dtype)
  if site.kind == 'embed':
    xa = jnp.take(a, x, axis=0)
  else:
    xa = jax.lax.dot_general(x.astype(dtype), a,
                             ((site.x_axes, tuple(range(len(site.x_axes)))), ((), ())))
  xa = xa * jnp.asarray(scale, dtype)  # scale the rank-r activation: r << out features
  return jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())))


def branch_dropout(x, rate: float, rng, path: str, deterministic: bool):
  """Inverted dropout on a LoRA branch input, keyed by the layer path (same mask every call)."""
  if rate <= 0.0 or deterministic:
    return x
  key = jax.random.fold_in(rng, zlib.crc32(path.encode()))
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def factor_paths(lora_params) -> list[str]:
  """The module paths that hold a LoRA pair (``<path>/lora_a``, ``<path>/lora_b``), sorted.

  >>> factor_paths({'enc': {'query': {'lora_a': 0, 'lora_b': 0}}})
  ['enc/query']
  """
  return sorted(p[:-len('/lora_a')] for p in tree_lib.flatten(lora_params)
                if p.endswith('/lora_a'))


def contracted_axes(module) -> tuple:
  """The input axes (possibly negative) a ``nn.Dense`` / ``nn.DenseGeneral`` contracts."""
  if isinstance(module, nn.DenseGeneral):
    if module.batch_dims:
      raise ConfigError(f"{'/'.join(module.path)}: DenseGeneral with batch_dims is not supported")
    return (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  return (-1,)


def call_site(path: str, module, x, a, b) -> Site:
  """The :class:`Site` of the layer being called, from the bound module, its input and its factors.

  What :func:`find_sites` recorded at init, recovered where a forward needs it (the contracted
  input axes are the layer's own), so a method stores nothing between ``init`` and ``apply``.
  """
  in_shape, out_shape = tuple(a.shape[:-1]), tuple(b.shape[1:])
  if isinstance(module, nn.Embed):
    return Site(path, 'embed', in_shape, out_shape, ())
  x_axes = tuple(ax % np.ndim(x) for ax in contracted_axes(module))
  return Site(path, 'dense', in_shape, out_shape, x_axes)


def site_of(path: str, base_flat: dict, a_shape: tuple, b_shape: tuple) -> Site:
  """The site of the factors at ``path`` (shapes ``a_shape``, ``b_shape``) over a flat base.

  The kind follows from the base weight: an ``embedding`` leaf is an embedding, a kernel shaped
  ``in + out`` a dense layer, a kernel ``(E, in, out)`` with factors ``(E, in, r)`` /
  ``(E, r, out)`` a MoE layer's stacked experts (the two shape rules never both hold).
  ``x_axes`` stays empty: only a call knows its input (:func:`call_site`).
  """
  a_shape, b_shape = tuple(a_shape), tuple(b_shape)
  if f'{path}/embedding' in base_flat:
    return Site(path, 'embed', a_shape[:-1], b_shape[1:], ())
  w = base_flat.get(f'{path}/kernel')
  w_shape = None if w is None else tuple(w.shape)
  if w_shape == a_shape[:-1] + b_shape[1:]:
    return Site(path, 'dense', a_shape[:-1], b_shape[1:], ())
  if len(a_shape) == len(b_shape) == 3 and w_shape == (a_shape[0], a_shape[1], b_shape[2]):
    return Site(path, 'expert', a_shape[1:2], b_shape[2:], (), experts=a_shape[0])
  raise ValueError(f'LoRA factors at {path} ({a_shape}, {b_shape}) fit no base weight: '
                   f'{path}/kernel is {w_shape}')


def sites_of(base_params, lora_params) -> list[Site]:
  """The sites a LoRA tree adapts over ``base_params`` (arrays or shapes): what ``init`` found,
  recovered from the two trees by a pure function (see :func:`site_of`).

  >>> [s.weight_path for s in sites_of(params, lora)]  # doctest: +SKIP
  ['encoder/layer_0/attention/query/kernel', ...]
  """
  base, lp = tree_lib.flatten(base_params), tree_lib.flatten(lora_params)
  return [site_of(p, base, lp[f'{p}/lora_a'].shape, lp[f'{p}/lora_b'].shape)
          for p in factor_paths(lora_params)]


def _is_moe_kernel(mod, name: str) -> bool:
  return name in getattr(type(mod), 'EXPERT_KERNELS', ())


@contextlib.contextmanager
def expert_scope(lora_params, scale: float):
  """Context under which every MoE layer whose expert kernels have factors in ``lora_params``
  gets them through its ``expert_lora`` hook (``x·W_e + s·(x·A_e)·B_e`` inside the batched
  expert matmul). Which paths are expert kernels is read off the called layer."""
  flat = tree_lib.flatten(lora_params)
  by_layer: dict[str, dict] = {}
  for path in factor_paths(lora_params):
    layer, _, name = path.rpartition('/')
    by_layer.setdefault(layer, {})[name] = (flat[f'{path}/lora_a'], flat[f'{path}/lora_b'])

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != '__call__' or not _is_moe(mod):
      return next_fun(*args, **kwargs)
    mine = {n: f for n, f in by_layer.get('/'.join(mod.path), {}).items()
            if _is_moe_kernel(mod, n)}
    if not mine:
      return next_fun(*args, **kwargs)
    return next_fun(*args, **kwargs, expert_lora=mine, expert_lora_scale=scale)

  with nn.intercept_methods(interceptor):
    yield


@contextlib.contextmanager
def lora_scope(lora_params, scale: float, *, dropout: float = 0.0, rng=None,
               deterministic: bool = True):
  """Context under which every layer with factors in ``lora_params`` computes
  ``y = layer(x) + s·(drop(x)·A)·B``.

  Each site is read off the called layer (:func:`call_site`). Branch dropout applies to dense
  sites; expert sites take the MoE layer's routed inputs as they are.

  >>> with lora_scope(lora, 2.0):                    # doctest: +SKIP
  ...   logits = model.apply({'params': params}, **inputs)
  """
  flat = tree_lib.flatten(lora_params)

  def wrap(path, module, call, x):
    a, b = flat[f'{path}/lora_a'], flat[f'{path}/lora_b']
    site = call_site(path, module, x, a, b)
    y = call(x)
    if site.kind == 'dense':
      x = branch_dropout(x, dropout, rng, path, deterministic)
    return y + _lora_delta(site, x, a, b, scale, y.dtype)

  with expert_scope(lora_params, scale), layer_scope(_SUPPORTED, factor_paths(lora_params), wrap):
    yield


def delta_weight(site: Site, a, b, scale):
  """The dense update ``s·A·B`` in the adapted weight's shape."""
  if site.kind == 'expert':
    return jnp.einsum('eir,ero->eio', a, b) * scale
  d = (a.reshape(site.d_in, -1) @ b.reshape(-1, site.d_out)) * scale
  return d.reshape(*site.in_shape, *site.out_shape)


def fold(base_params, sites, lora_params, scale, sign: float = 1.0):
  """``W <- W + sign·s·A·B`` for every site (merge with +1, unmerge with -1)."""
  flat = tree_lib.flatten(base_params)
  lp = tree_lib.flatten(lora_params)
  for s in sites:
    w = flat[s.weight_path]
    flat[s.weight_path] = (w + sign * delta_weight(s, lp[f'{s.path}/lora_a'],
                                                    lp[f'{s.path}/lora_b'], scale)).astype(w.dtype)
  return tree_lib.unflatten(flat)


@register('lora')
class LoRA(Method):
  """LoRA from config: ``rank``, ``alpha``, ``rslora``, ``dropout``, ``targets`` (regex over weight paths).

  The method object holds only its config: the layers it adapts are found by :meth:`find`
  during ``init`` and recovered afterwards from the returned tree (:meth:`sites`), so one object
  serves any number of models.

  >>> method = LoRA(config.peft)                            # doctest: +SKIP
  >>> lora = method.init(rng, model, params, inputs)        # doctest: +SKIP
  >>> logits = peft.apply(model, method, params, lora, inputs)  # doctest: +SKIP
  >>> [s.path for s in method.sites(params, lora)]          # doctest: +SKIP
  """

  @property
  def scale(self) -> float:
    return _scale(self.cfg)

  def find(self, module, base_params, inputs) -> list[Site]:
    """The layers ``peft.lora.targets`` selects in this model (a ConfigError if none)."""
    if self.cfg.lora.rank <= 0:
      raise ConfigError(f'peft.lora.rank={self.cfg.lora.rank}; valid: a positive integer')
    return find_sites(module, base_params, inputs, self.cfg.lora.targets, experts=True)

  def sites(self, base_params, peft_params) -> list[Site]:
    """The sites ``peft_params`` adapts over ``base_params``: derived, not stored."""
    return sites_of(base_params, peft_params)

  def init(self, rng, module, base_params, inputs) -> dict:
    return self.init_factors(rng, self.find(module, base_params, inputs), base_params)

  def init_factors(self, rng, sites: list[Site], base_params) -> dict:
    """The method's tree for ``sites`` (LoRA: random A, zero B); variants override it."""
    del base_params
    return init_sites(rng, sites, self.cfg.lora.rank)

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    return lora_scope(peft_params, self.scale, dropout=self.cfg.lora.dropout, rng=rng,
                      deterministic=deterministic)

  def merge(self, base_params, peft_params) -> dict:
    """``W <- W + s·A·B`` for every site; the merged model equals the implicit one."""
    return fold(base_params, self.sites(base_params, peft_params), peft_params, self.scale, +1.0)

  def unmerge(self, merged_params, peft_params) -> dict:
    """Inverse of :meth:`merge`: ``W <- W - s·A·B``."""
    return fold(merged_params, self.sites(merged_params, peft_params), peft_params, self.scale,
                -1.0)

  def logical_specs(self, base_specs, peft_params) -> Any:
    """A takes the kernel's input axes (rank unsharded); B takes its output axes."""
    specs = tree_lib.flatten(base_specs)
    lp = tree_lib.flatten(peft_params)
    out = {}
    for path in factor_paths(peft_params):
      a, b = lp[f'{path}/lora_a'], lp[f'{path}/lora_b']
      w = specs.get(f'{path}/kernel', specs.get(f'{path}/embedding'))
      axes = tuple(w) if w is not None else (None,) * (a.ndim + b.ndim - 2)
      # A weight with one axis fewer than its factors' in + out axes is a stack of experts.
      expert = len(axes) != a.ndim + b.ndim - 2
      lead, axes = (axes[:1], axes[1:]) if expert else ((), axes)
      n_in = a.ndim - 1 - len(lead)
      out[f'{path}/lora_a'] = P(*lead, *axes[:n_in], None)
      out[f'{path}/lora_b'] = P(*lead, None, *axes[n_in:])
    return tree_lib.unflatten(out)
