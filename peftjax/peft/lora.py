"""LoRA as a functional transform (Hu et al., 2021).

For every layer whose weight path matches ``peft.lora.targets`` -- a dense layer (linen
``nn.Dense``/``nn.DenseGeneral``, NNX ``Linear``/``LinearGeneral``/``Einsum``), an embedding or a
convolution -- LoRA adds a rank-r update. In training it is applied *implicitly*::

    y = x·W + s·(x·A)·B          s = alpha / r,  A: (in..., r),  B: (r, out...),  B = 0 at init

through method interception (:mod:`peftjax.intercept`), so the model's code is untouched
and neither ``W + s·A·B`` nor the (in × out) weight gradient is ever formed. :func:`merge` folds
the update into ``W`` for export and serving; :func:`unmerge` takes it out again.

* An embedding's table ``E (V, D)`` gets ``A (V, r)``, ``B (r, D)``: the lookup adds
  ``s·A[ids]·B`` and ``E.attend(q)`` (a tied output projection) adds ``s·(q·Bᵀ)·Aᵀ``, so the
  trained model is exactly the merged one, whose single table serves both.
* A convolution's kernel ``(kh, kw, c_in, c_out)`` gets ``A (kh, kw, c_in, r)`` -- a convolution
  of ``r`` filters, run with the layer's own strides and padding -- and ``B (r, c_out)``:
  ``conv(x, W) + s·conv(x, A)·B``. Merging reshapes ``A`` to ``(kh·kw·c_in, r)``.
* Layers stacked by ``nn.scan`` (or ``nnx.vmap``) store ``W`` with leading layer axes
  ``(L, in, out)``; their factors carry the same axes, ``A (L, in, r)``, ``B (L, r, out)``, one
  pair per layer. The factors reach each layer through the ``params`` collection
  (:func:`peftjax.peft.base.apply` puts the method's tree beside the weights), so the scan
  slices them with the weights and the update runs inside the scan body.

The LoRA tree mirrors the base tree: ``encoder/layer_0/attention/query/{lora_a, lora_b}``, and
its logical axes are the adapted kernel's (input axes on A, output axes on B, a stack's layer
axis on both), so it shards like the weight it adapts.

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
from peftjax.peft import layers
from peftjax.peft.base import Method
from peftjax.peft.base import layer_scope
from peftjax.peft.base import register
from peftjax.intercept import intercept_methods

_KINDS = ('dense', 'embed')  # the layers LoRA adapts by default; conv when asked
_ALL_KINDS = ('dense', 'embed', 'conv')


@dataclasses.dataclass(frozen=True)
class Site:
  """One adapted layer: its module path, kind, and how its weight splits into in/out axes."""
  path: str            # module path, e.g. 'encoder/layer_0/attention/query'
  kind: str            # 'dense', 'embed', 'conv' or 'expert'
  in_shape: tuple      # weight dims contracted with the input (the vocabulary for 'embed')
  out_shape: tuple     # weight dims of the output features
  x_axes: tuple        # input axes contracted (dense only), non-negative, ascending
  experts: int = 0     # 'expert' sites: the number of experts (leading weight axis)
  lead: tuple = ()     # leading axes of a stacked layer's weight (nn.scan: (num_layers,))

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


def _record_modules(module, base_params, inputs, types: tuple | None = None
                    ) -> dict[str, tuple]:
  """Module path -> ``(module, input ndim, weight shape)`` for every layer the forward calls.

  Layers are those :func:`layers.kind` knows (and MoE layers), or with ``types`` the linen
  modules of those types. The weight shape is the one a call sees: inside ``nn.scan`` a single
  layer's, without the stack's leading axes (``None`` for a layer without a kernel/embedding).
  The first call of a layer is recorded (a layer called again on inputs of another rank
  contracts the same number of axes; each call reads its own input's rank).
  """
  seen: dict[str, tuple] = {}

  def spy(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name == '__call__':
      k = layers.kind(mod)
      # Also a layer that can say why no method adapts it (kind None): for the error message.
      wanted = ((isinstance(mod, types) if types is not None else
                 k is not None or hasattr(mod, 'peft_why_not')) or _is_moe(mod))
      p = layers.path(mod) if wanted else None
      if wanted and p not in seen:
        w = layers.params(mod).get(layers.WEIGHT_NAME[k]) if k is not None else None
        seen[p] = (mod, layers.input_ndim(args, kwargs), None if w is None else tuple(w.shape))
    return next_fun(*args, **kwargs)

  with intercept_methods(spy):
    jax.eval_shape(lambda p: module.apply({'params': p}, **inputs), base_params)
  return seen


def find_sites(module, base_params, inputs, targets: str | list[str], *,
               field: str = 'peft.lora.targets', user: str = 'LoRA', conv: bool = False,
               experts: bool = False) -> list[Site]:
  """The layers LoRA adapts: supported layers whose weight path matches ``targets``.

  Raises a ConfigError naming ``field`` and listing the closest weight paths when nothing
  matches, and when a match is a weight ``user`` cannot handle (e.g. a LayerNorm scale).
  ``conv=True`` also accepts convolution kernels (in ``(kh, kw, c_in)``, out ``(c_out,)``);
  ``experts=True`` the stacked expert kernels of MoE layers (kind ``'expert'``). A stacked
  layer's site has its stack's axes in ``lead``.
  """
  pred = tree_lib.make_selector(targets)
  flat = tree_lib.flatten(base_params)
  matched = [p for p in flat if pred(p, flat[p])]
  modules = _record_modules(module, base_params, inputs)
  kinds = _ALL_KINDS if conv else _KINDS
  weight_paths = {f'{p}/{layers.WEIGHT_NAME[layers.kind(m)]}': p
                  for p, (m, _, _) in modules.items()
                  if not _is_moe(m) and layers.kind(m) in kinds}
  expert_paths = {f'{p}/{name}/kernel': f'{p}/{name}' for p, (m, _, _) in modules.items()
                  if _is_moe(m) and experts for name in type(m).EXPERT_KERNELS}
  if not matched:
    near = tree_lib.closest_paths(str(targets), list(weight_paths) or list(flat))
    raise ConfigError(f'{field}={targets!r} matches no parameter; closest weight paths: '
                      f'{near}')
  unsupported = [p for p in matched if p not in weight_paths and p not in expert_paths]
  if unsupported:
    what = ', '.join(['dense layers (kernel)', 'embeddings (embedding)']
                     + (['convolutions (kernel)'] if conv else []))
    # A layer that knows why it is not adaptable (an NNX Einsum that is not a matmul) says so.
    why = [w for p, (m, _, _) in modules.items() if any(u.startswith(f'{p}/') for u in unsupported)
           if (w := getattr(m, 'peft_why_not', lambda: None)())]
    raise ConfigError(
        f'{field}={targets!r} matches {unsupported[:3]}, which {user} cannot handle'
        + (f' ({why[0]})' if why else '') +
        f'; it takes the weights of {what}, e.g. {sorted(weight_paths)[:3]}')
  sites = []
  for wp in matched:
    if wp in expert_paths:
      e, d_in, d_out = flat[wp].shape
      sites.append(Site(expert_paths[wp], 'expert', (d_in,), (d_out,), (), experts=e))
      continue
    path = weight_paths[wp]
    mod, x_ndim, call_shape = modules[path]
    w_shape = tuple(flat[wp].shape)
    call_shape = w_shape if call_shape is None else call_shape
    lead = w_shape[:len(w_shape) - len(call_shape)]  # the stack's axes (nn.scan)
    k = layers.kind(mod)
    if k == 'embed':
      sites.append(Site(path, 'embed', call_shape[:1], call_shape[1:], (), lead=lead))
      continue
    if k == 'conv':
      sites.append(Site(path, 'conv', call_shape[:-1], call_shape[-1:], (), lead=lead))
      continue
    x_axes = layers.contracted_axes(mod, x_ndim)
    n_in = len(x_axes)
    sites.append(Site(path, 'dense', call_shape[:n_in], call_shape[n_in:], x_axes, lead=lead))
  return sites


def _scale(cfg) -> float:
  """alpha / r, or alpha / sqrt(r) with ``peft.lora.rslora`` (keeps the update's scale stable in r)."""
  rank = float(cfg.lora.rank)
  return float(cfg.lora.alpha) / (np.sqrt(rank) if cfg.lora.rslora else rank)


def init_sites(rng, sites: list[Site], rank: int) -> dict:
  """A (uniform, fan-in scaled, as PEFT's kaiming init) and B = 0 for every site.

  A stacked layer gets one pair per layer, drawn independently.
  """
  flat = {}
  for site in sites:
    if rank <= 0 or rank > min(site.d_in, site.d_out):
      raise ConfigError(
          f'peft.lora.rank={rank} is invalid for {site.weight_path} (in {site.d_in}, out '
          f'{site.d_out}); valid: 1 <= rank <= {min(site.d_in, site.d_out)}')
    key = jax.random.fold_in(rng, zlib.crc32(site.path.encode()))
    lead = (site.experts,) if site.kind == 'expert' else tuple(site.lead)
    if site.kind == 'embed':
      a = jax.random.normal(key, (*lead, *site.in_shape, rank), jnp.float32) / np.sqrt(rank)
    else:
      bound = 1.0 / np.sqrt(site.d_in)
      a = jax.random.uniform(key, (*lead, *site.in_shape, rank), jnp.float32, -bound, bound)
    flat[f'{site.path}/lora_a'] = a
    flat[f'{site.path}/lora_b'] = jnp.zeros((*lead, rank, *site.out_shape), jnp.float32)
  return tree_lib.unflatten(flat)


def _rank_out(xa, b, scale, dtype):
  """``(s·xa)·B``: scale the rank-r activation (r << out features), then expand."""
  xa = xa * jnp.asarray(scale, dtype)
  return jax.lax.dot_general(xa, b, (((xa.ndim - 1,), (0,)), ((), ())))


def _lora_delta(site: Site, x, a, b, scale, dtype, module=None):
  """``s·(x·A)·B`` for one (unstacked) call, contracting exactly the axes the layer contracts.

  A ``'conv'`` site needs the ``module`` (its convolution runs ``A``).
  """
  a, b = a.astype(dtype), b.astype(dtype)
  if site.kind == 'embed':
    xa = jnp.take(a, x, axis=0)
  elif site.kind == 'conv':
    xa = layers.conv_with(module, x.astype(dtype), a)
  else:
    xa = jax.lax.dot_general(x.astype(dtype), a,
                             ((site.x_axes, tuple(range(len(site.x_axes)))), ((), ())))
  return _rank_out(xa, b, scale, dtype)


def _attend_delta(q, a, b, scale, dtype):
  """``s·(q·Bᵀ)·Aᵀ``: what ``E + s·A·B`` adds to ``Embed.attend(q) = q·Eᵀ``."""
  a, b = a.astype(dtype), b.astype(dtype)
  qb = jax.lax.dot_general(q.astype(dtype), b, (((q.ndim - 1,), (1,)), ((), ())))  # (..., r)
  qb = qb * jnp.asarray(scale, dtype)
  return jax.lax.dot_general(qb, a, (((qb.ndim - 1,), (1,)), ((), ())))          # (..., V)


def branch_dropout(x, rate: float, rng, path: str, deterministic: bool, module=None):
  """Inverted dropout on a LoRA branch input, keyed by the layer path.

  With the called ``module``, a linen layer that has a ``'dropout'`` stream draws the key from
  it: ``nn.scan`` splits that stream per layer (``split_rngs={'dropout': True}``), so the layers
  of a scanned stack, which share one path, get masks of their own. Otherwise the method's
  ``rng`` folded with the path (the same mask for every call of that layer in a forward).
  """
  if rate <= 0.0 or deterministic:
    return x
  if isinstance(module, nn.Module) and module.has_rng('dropout'):
    rng = module.make_rng('dropout')
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


def call_site(path: str, module, x, a, b) -> Site:
  """The :class:`Site` of the layer being called, from the layer, its input and this call's
  factors (a scanned layer's slice).

  What :func:`find_sites` recorded at init, recovered where a forward needs it (the contracted
  input axes follow this call's input), so a method stores nothing between ``init`` and
  ``apply``.
  """
  in_shape, out_shape = tuple(a.shape[:-1]), tuple(b.shape[1:])
  k = layers.kind(module)
  if k in ('embed', 'conv'):
    return Site(path, k, in_shape, out_shape, ())
  x_axes = layers.contracted_axes(module, np.ndim(x))
  return Site(path, 'dense', in_shape, out_shape, x_axes)


def _n_lead(a_shape: tuple, b_shape: tuple, w_shape: tuple) -> int | None:
  """How many leading stack axes factors ``(*lead, *in, r)``, ``(*lead, r, *out)`` have over a
  weight ``(*lead, *in, *out)``; ``None`` if they do not fit it."""
  k = len(a_shape) + len(b_shape) - 2 - len(w_shape)
  if k < 0 or a_shape[:k] != b_shape[:k] or a_shape[:k] != w_shape[:k]:
    return None
  if w_shape[k:] != a_shape[k:-1] + b_shape[k + 1:] or a_shape[-1] != b_shape[k]:
    return None
  return k


def site_of(path: str, base_flat: dict, a_shape: tuple, b_shape: tuple) -> Site:
  """The site of the factors at ``path`` (shapes ``a_shape``, ``b_shape``) over a flat base.

  The kind follows from the base weight: an ``embedding`` leaf is an embedding, any kernel a
  dense layer -- a convolution's ``(kh, kw, c_in, c_out)`` folds like a dense ``(kh·kw·c_in,
  c_out)``. Leading axes the factors share with the kernel are a stack's (``nn.scan``) or a MoE
  layer's experts: merging treats them alike, one update per index. ``x_axes`` stays empty: only
  a call knows its input (:func:`call_site`).
  """
  a_shape, b_shape = tuple(a_shape), tuple(b_shape)
  name = 'embedding' if f'{path}/embedding' in base_flat else 'kernel'
  w = base_flat.get(f'{path}/{name}')
  w_shape = None if w is None else tuple(w.shape)
  k = None if w_shape is None else _n_lead(a_shape, b_shape, w_shape)
  if k is None:
    raise ValueError(f'LoRA factors at {path} ({a_shape}, {b_shape}) fit no base weight: '
                     f'{path}/{name} is {w_shape}')
  return Site(path, 'embed' if name == 'embedding' else 'dense', a_shape[k:-1], b_shape[k + 1:],
              (), lead=a_shape[:k])


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

  with intercept_methods(interceptor):
    yield


def call_leaves(module, path: str, names: tuple, flat: dict) -> tuple:
  """This call's ``names`` leaves of the method at ``path``: from the layer's own ``params``
  (where :func:`peft.apply` put them, sliced by any ``nn.scan``), else from the method's tree.

  The fallback serves code that runs ``method.intercept`` around a plain ``module.apply`` of
  the base weights (an unstacked model then sees the same leaves).
  """
  own = tree_lib.flatten(layers.params(module))
  if all(n in own for n in names):
    return tuple(own[n] for n in names)
  return tuple(flat[f'{path}/{n}'] for n in names)


@contextlib.contextmanager
def lora_scope(lora_params, scale: float, *, dropout: float = 0.0, rng=None,
               deterministic: bool = True):
  """Context under which every layer with factors in ``lora_params`` computes
  ``y = layer(x) + s·(drop(x)·A)·B`` (and an embedding's ``attend(q)`` its tied counterpart).

  Each site is read off the called layer (:func:`call_site`). Branch dropout applies to dense
  and conv sites; expert sites take the MoE layer's routed inputs as they are.

  >>> with lora_scope(lora, 2.0):                    # doctest: +SKIP
  ...   logits = model.apply({'params': params}, **inputs)
  """
  flat = tree_lib.flatten(lora_params)

  def wrap(path, module, call, x):
    a, b = call_leaves(module, path, ('lora_a', 'lora_b'), flat)
    site = call_site(path, module, x, a, b)
    y = call(x)
    if site.kind != 'embed':
      x = branch_dropout(x, dropout, rng, path, deterministic, module)
    return y + _lora_delta(site, x, a, b, scale, y.dtype, module)

  def attend(path, module, call, q):
    a, b = call_leaves(module, path, ('lora_a', 'lora_b'), flat)
    y = call(q)
    return y + _attend_delta(q, a, b, scale, y.dtype)

  paths = factor_paths(lora_params)
  with expert_scope(lora_params, scale), layer_scope(_ALL_KINDS, paths, wrap), \
      layer_scope(('embed',), paths, attend, method='attend'):
    yield


def delta_weight(site: Site, a, b, scale):
  """The dense update ``s·A·B`` in the adapted weight's shape (per stack or expert index)."""
  if site.kind == 'expert':
    return jnp.einsum('eir,ero->eio', a, b) * scale
  lead = tuple(a.shape[:len(site.lead)])
  r = a.shape[-1]
  d = jnp.matmul(a.reshape(*lead, site.d_in, r), b.reshape(*lead, r, site.d_out)) * scale
  return d.reshape(*lead, *site.in_shape, *site.out_shape)


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
    return find_sites(module, base_params, inputs, self.cfg.lora.targets, conv=True,
                      experts=True)

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

  def layer_tree(self, peft_params) -> dict:
    """The whole tree: every leaf sits beside the weight it adapts."""
    return peft_params

  def merge(self, base_params, peft_params) -> dict:
    """``W <- W + s·A·B`` for every site; the merged model equals the implicit one."""
    return fold(base_params, self.sites(base_params, peft_params), peft_params, self.scale, +1.0)

  def unmerge(self, merged_params, peft_params) -> dict:
    """Inverse of :meth:`merge`: ``W <- W - s·A·B``."""
    return fold(merged_params, self.sites(merged_params, peft_params), peft_params, self.scale,
                -1.0)

  def logical_specs(self, base_specs, peft_params) -> Any:
    """A takes the kernel's input axes (rank unsharded), B its output axes, both its leading
    stack or expert axes."""
    specs = tree_lib.flatten(base_specs)
    lp = tree_lib.flatten(peft_params)
    out = {}
    for path in factor_paths(peft_params):
      a, b = lp[f'{path}/lora_a'], lp[f'{path}/lora_b']
      w = specs.get(f'{path}/kernel', specs.get(f'{path}/embedding'))
      axes = tuple(w) if w is not None else (None,) * (a.ndim + b.ndim - 2)
      # Axes the factors share with the weight beyond its in + out ones lead both: a stack's
      # layer axis (nn.scan) or a MoE layer's experts.
      k = a.ndim + b.ndim - 2 - len(axes)
      lead, axes = axes[:k], axes[k:]
      n_in = a.ndim - 1 - k
      out[f'{path}/lora_a'] = P(*lead, *axes[:n_in], None)
      out[f'{path}/lora_b'] = P(*lead, None, *axes[n_in:])
    return tree_lib.unflatten(out)
