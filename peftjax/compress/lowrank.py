"""Low-rank factorization of dense kernels by truncated SVD: a smaller model, not an adapter.

:func:`factorize` replaces each selected ``kernel`` ``W`` of an ``nn.Dense``/``nn.DenseGeneral``,
viewed as a 2-D ``(in, out)`` matrix, by its best rank-``r`` approximation (Eckart-Young)
stored as two factors *in the same tree*, in place of the kernel::

    W ≈ W_r = U_r·S_r·V_rᵀ = kernel_u·kernel_v      kernel_u = U_r·√S_r   (*in_axes, r)
                                                    kernel_v = √S_r·V_rᵀ  (r, *out_axes)

so ``encoder/layer_0/intermediate/{kernel, bias}`` becomes
``encoder/layer_0/intermediate/{kernel_u, kernel_v, bias}``. A multi-axis kernel such as
BERT's query ``(embed, heads, kv)`` or attention out ``(heads, kv, embed)`` is flattened to
``(in, out)`` for the SVD and its factors keep the original input and output axes, so the
shapes alone say how to run and how to restore it.

Under :func:`scope` (or through :func:`apply`) every Dense/DenseGeneral whose own variables hold
``kernel_u``/``kernel_v`` computes ``(x·U)·V + bias`` as two matmuls instead of running its
``__call__`` (which would look for the absent ``kernel``); ``U·V`` is never formed. The factors
are ordinary parameters: the factored model trains, jits and shards like any other tree.
:func:`unfactorize` multiplies them back into ``kernel`` for export; :func:`report` says what
was saved.

>>> small = factorize(params, targets=r'encoder/.*/(intermediate|output)/kernel$',
...                   energy=0.9)                           # doctest: +SKIP
>>> logits = apply(model, small, inputs)                    # doctest: +SKIP
>>> print(format_report(report(params, small)))             # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import re
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree as tree_lib
from peftjax.peft import layers
from peftjax.errors import UserInputError

U_NAME, V_NAME = 'kernel_u', 'kernel_v'
_LAYERS = (nn.Dense, nn.DenseGeneral)
# Attention projections (embed, heads, kv) produce two output axes; every other kernel one.
_QKV = re.compile(r'(^|/)(query|key|value)/kernel$')


@dataclasses.dataclass(frozen=True)
class _Target:
  """One kernel to factorize: its leaf path, shape, and how many trailing axes are outputs."""
  path: str
  shape: tuple
  n_out: int

  @property
  def layer(self) -> str:
    return self.path[:-len('kernel')]  # keeps the trailing '/' ('' for a top-level Dense)

  @property
  def d_in(self) -> int:
    return int(np.prod(self.shape[:-self.n_out]))

  @property
  def d_out(self) -> int:
    return int(np.prod(self.shape[-self.n_out:]))


def default_out_axes(path: str, shape: tuple) -> int:
  """How many trailing kernel axes are outputs: 2 for 3-D attention query/key/value kernels,
  1 otherwise.

  >>> default_out_axes('encoder/layer_0/attention/query/kernel', (384, 12, 32))
  2
  >>> default_out_axes('encoder/layer_0/attention/out/kernel', (12, 32, 384))
  1
  """
  return 2 if _QKV.search(path) and len(shape) == 3 else 1


def _n_out(path: str, shape: tuple, out_axes: Mapping[str, int] | None) -> int:
  for pattern, n in (out_axes or {}).items():
    if re.search(pattern, path):
      if not isinstance(n, numbers.Integral) or not 1 <= n < len(shape):
        raise UserInputError(
            f'out_axes[{pattern!r}]={n!r} is invalid for {path} with shape {shape}; valid: an '
            f'integer in 1..{len(shape) - 1} (at least one input and one output axis)')
      return int(n)
  return default_out_axes(path, shape)


def _targets_str(targets) -> str:
  if isinstance(targets, str):
    return targets
  if callable(targets):
    return getattr(targets, '__name__', 'kernel')
  return '|'.join(targets)


def _select(params, targets, out_axes) -> list[_Target]:
  """The kernels ``targets`` selects, validated before any SVD runs."""
  flat = tree_lib.flatten(params)
  pred = tree_lib.make_selector(targets)
  matched = [p for p, v in flat.items() if pred(p, v)]
  kernels = [p for p, v in flat.items()
             if p.split('/')[-1] == 'kernel' and np.ndim(v) >= 2]
  if not matched:
    near = tree_lib.closest_paths(_targets_str(targets), kernels or list(flat))
    raise UserInputError(f'targets={targets!r} matches no parameter; closest kernel paths: '
                         f'{near}')
  bad = [p for p in matched if p not in kernels]
  if bad:
    raise UserInputError(
        f'targets={targets!r} matches {bad[:3]}, which low-rank factorization cannot handle; '
        f"it takes the 'kernel' (2 or more dims) of nn.Dense/nn.DenseGeneral, e.g. "
        f'{kernels[:3]}')
  out = []
  for p in matched:
    shape = tuple(np.shape(flat[p]))
    out.append(_Target(p, shape, _n_out(p, shape, out_axes)))
  return out


def _check_rank_args(rank, energy) -> None:
  if (rank is None) == (energy is None):
    raise UserInputError(f'factorize needs exactly one of rank= and energy= (got rank={rank!r}, '
                         f'energy={energy!r}); valid: rank=<int >= 1> or energy=<float in (0, 1]>')
  if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral)
                           or rank < 1):
    raise UserInputError(f'rank={rank!r} is invalid; valid: an integer >= 1 (and <= min(in, out) '
                         'of every selected kernel)')
  if energy is not None and (isinstance(energy, bool) or not isinstance(energy, numbers.Real)
                             or not 0.0 < energy <= 1.0):
    raise UserInputError(f'energy={energy!r} is invalid; valid: a float in (0, 1], the share '
                         'of sum(S^2) each factorized kernel keeps')


def energy_rank(singular_values, energy: float) -> int:
  """The smallest ``r`` with ``sum(S[:r]**2) >= energy * sum(S**2)`` (S sorted descending).

  >>> energy_rank(np.array([3.0, 1.0, 0.0]), 0.9)
  1
  """
  e = np.cumsum(np.square(np.asarray(singular_values, np.float64)))
  if e[-1] == 0.0:  # a zero kernel: one (zero) rank keeps all of its (zero) energy
    return 1
  # Divide by the last cumulative sum, not an independent sum, so the full rank reaches
  # exactly 1.0 and energy=1.0 always finds a rank.
  return int(np.argmax(e / e[-1] >= energy)) + 1


def factorize(params, *, targets: tree_lib.Selector, rank: int | None = None,
              energy: float | None = None, out_axes: Mapping[str, int] | None = None) -> dict:
  """Replaces each selected kernel by truncated-SVD factors ``kernel_u``, ``kernel_v``.

  Args:
    params: the model's ``params`` tree (a plain nested dict); it is not modified.
    targets: regex (or list of regexes, or predicate) over '/'-joined leaf paths selecting
      dense kernels, e.g. ``r'encoder/.*/(intermediate|output)/kernel$'``.
    rank: one rank for every selected kernel, ``1 <= rank <= min(in, out)`` of each.
    energy: instead of ``rank``, per kernel the smallest rank whose singular values keep at
      least this share of ``sum(S**2)`` (in ``(0, 1]``; 1.0 keeps every nonzero singular value).
    out_axes: overrides of how many trailing kernel axes are outputs, ``{regex: n}`` (first
      match wins); by default 2 for 3-D attention query/key/value kernels, 1 otherwise.

  Returns:
    A new tree where each selected ``.../kernel`` of shape ``(*in_axes, *out_axes)`` is replaced
    by ``.../kernel_u`` ``(*in_axes, r)`` and ``.../kernel_v`` ``(r, *out_axes)`` in the kernel's
    dtype. Runs on the host (float64 SVD); the energy rule is data-dependent, so not under jit.
  Only Dense/DenseGeneral kernels run factored: a Conv's 'kernel' would be accepted here but
  :func:`scope` refuses to run it.

  >>> small = factorize(params, targets=r'dense_0/kernel$', rank=8)  # doctest: +SKIP
  >>> small['dense_0']['kernel_u'].shape, small['dense_0']['kernel_v'].shape
  ...                                                     # doctest: +SKIP
  ((64, 8), (8, 32))
  """
  _check_rank_args(rank, energy)
  selected = _select(params, targets, out_axes)
  if rank is not None:
    for t in selected:  # every bound is checked before the first (slow) SVD
      if rank > min(t.d_in, t.d_out):
        raise UserInputError(
            f'rank={rank} is invalid for {t.path}: its 2-D (in, out) shape is '
            f'({t.d_in}, {t.d_out}) (kernel {t.shape}); valid: 1..{min(t.d_in, t.d_out)}, or '
            'energy= to choose a rank per kernel')
  flat = tree_lib.flatten(params)
  for t in selected:
    w = flat.pop(t.path)
    w2 = np.asarray(jax.device_get(w)).astype(np.float64).reshape(t.d_in, t.d_out)
    u, s, vt = np.linalg.svd(w2, full_matrices=False)
    r = rank if rank is not None else energy_rank(s, energy)
    # Balanced split, sqrt(S) into each factor: U and V then have equal scale (column norms of
    # U = row norms of V = sqrt(s_i)), so when the factors are fine-tuned the gradients of both
    # (dL/dU = xᵀ·g·Vᵀ, dL/dV = (x·U)ᵀ·g) are of the same size and neither learns much faster
    # than the other; the values also stay in the kernel's range, which matters in bfloat16.
    root = np.sqrt(s[:r])
    dtype = np.asarray(w).dtype
    n_in = len(t.shape) - t.n_out
    flat[f'{t.layer}{U_NAME}'] = jnp.asarray(
        (u[:, :r] * root).reshape(*t.shape[:n_in], r), dtype)
    flat[f'{t.layer}{V_NAME}'] = jnp.asarray(
        (root[:, None] * vt[:r]).reshape(r, *t.shape[n_in:]), dtype)
  return tree_lib.unflatten(flat)


def factored_paths(params) -> list[str]:
  """The module paths (e.g. ``'encoder/layer_0/output'``) whose params hold factors.

  >>> factored_paths({'dense_0': {'kernel_u': u, 'kernel_v': v, 'bias': b}})  # doctest: +SKIP
  ['dense_0']
  """
  return [p[:-len(U_NAME)].rstrip('/') for p in tree_lib.flatten(params)
          if p.split('/')[-1] == U_NAME]


def unfactorize(params) -> dict:
  """Multiplies every ``kernel_u``/``kernel_v`` pair back into ``kernel`` (for export).

  The result runs with plain ``module.apply``; after :func:`factorize` it holds the rank-r
  kernels ``W_r`` (the original ones at full rank, up to float rounding).

  >>> dense = unfactorize(small)          # doctest: +SKIP
  >>> logits = model.apply({'params': dense}, x)  # doctest: +SKIP
  """
  flat = tree_lib.flatten(params)
  for p in [p for p in flat if p.split('/')[-1] in (U_NAME, V_NAME)]:
    if p not in flat:
      continue  # the pair's other half, already folded
    layer = p[:-len(p.split('/')[-1])]  # keeps the trailing '/'
    if f'{layer}{U_NAME}' not in flat or f'{layer}{V_NAME}' not in flat:
      raise UserInputError(f'{p} has no {U_NAME}/{V_NAME} partner under {layer or "the root"}; '
                           'valid: both factors, as factorize writes them')
    u, v = flat.pop(f'{layer}{U_NAME}'), flat.pop(f'{layer}{V_NAME}')
    kernel = jnp.tensordot(u, v, axes=1, precision=jax.lax.Precision.HIGHEST)
    flat[f'{layer}kernel'] = kernel.astype(jnp.result_type(u, v))
  return tree_lib.unflatten(flat)


# ----------------------------------------------------------------------------- forward


def _features(mod) -> tuple:
  f = mod.features
  return (f,) if isinstance(f, int) else tuple(f)


def _factored_call(mod, path: str, x):
  """``(x·U)·V + bias`` from the layer's own variables, contracting the layer's input axes."""
  u = mod.get_variable('params', U_NAME)
  v = mod.get_variable('params', V_NAME)
  bias = mod.get_variable('params', 'bias') if mod.has_variable('params', 'bias') else None
  if isinstance(mod, nn.DenseGeneral):
    if mod.batch_dims:
      raise UserInputError(f'{path}: low-rank factors are not supported on a DenseGeneral with '
                           f'batch_dims={mod.batch_dims}')
  # The kernel's order: flax stores DenseGeneral's contracted axes sorted, whatever `axis` says.
  axis = layers.contracted_axes(mod, x.ndim)
  n_in = u.ndim - 1
  if (len(axis) != n_in or tuple(x.shape[a] for a in axis) != u.shape[:-1]
      or tuple(v.shape[1:]) != _features(mod)):
    raise UserInputError(
        f'{path}: factors {U_NAME} {u.shape} / {V_NAME} {v.shape} do not fit the layer (input '
        f'axes {tuple(x.shape[a] for a in axis)}, features {_features(mod)}); valid: '
        f'{U_NAME} (*input_axes, r) and {V_NAME} (r, *features), so pass factorize an '
        f'out_axes override giving this kernel {len(_features(mod))} output axes')
  # The layer's own dtype promotion, matmul and precision, as its __call__ would use them.
  x, u, v, bias = mod.promote_dtype(x, u, v, bias, dtype=mod.dtype)
  if mod.dot_general_cls is not None:
    dot = mod.dot_general_cls()
  else:
    dot = mod.dot_general or jax.lax.dot_general
  # Two matmuls through the rank-r bottleneck: x·(U·V) would cost in·out per row and form the
  # full kernel, which is what factorization removes.
  h = dot(x, u, ((axis, tuple(range(n_in))), ((), ())), precision=mod.precision)
  y = dot(h, v, (((h.ndim - 1,), (0,)), ((), ())), precision=mod.precision)
  return y if bias is None else y + bias  # bias is (*features,): broadcasts over leading dims


@contextlib.contextmanager
def scope(paths: Iterable[str] | None = None):
  """Context under which factored Dense/DenseGeneral layers run as ``(x·U)·V + bias``.

  A layer is factored when its own ``params`` hold ``kernel_u`` and ``kernel_v``; they and its
  bias are read from the layer's variables (so ``jax.grad`` with respect to the params tree
  reaches them), and the layer's ``__call__`` never runs. Everything else runs unchanged.

  Args:
    paths: optionally, the module paths expected to be factored (e.g.
      ``factored_paths(small)``); a factored layer not listed, or a listed layer without
      factors, raises instead of running.

  >>> with scope():                                        # doctest: +SKIP
  ...   logits = model.apply({'params': small}, x)
  """
  wanted = None if paths is None else set(paths)

  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if context.method_name != '__call__' or mod.scope is None:
      return next_fun(*args, **kwargs)
    path = '/'.join(mod.path)
    factored = mod.has_variable('params', U_NAME) or mod.has_variable('params', V_NAME)
    if wanted is not None and (factored != (path in wanted)):
      raise UserInputError(
          f'{path}: ' + ('holds low-rank factors but is not in scope(paths)' if factored else
                         'is in scope(paths) but its params hold no kernel_u/kernel_v'))
    if not factored:
      return next_fun(*args, **kwargs)
    if not isinstance(mod, _LAYERS):
      raise UserInputError(f'{path}: a {type(mod).__name__} holds low-rank factors; valid: '
                           'only nn.Dense/nn.DenseGeneral kernels are factorized')
    x = args[0] if args else next(iter(kwargs.values()))
    return _factored_call(mod, path, x)

  with nn.intercept_methods(interceptor):
    yield


def scope_if(factored: bool):
  """:func:`scope` when ``factored``, else a context that does nothing (no interception cost).

  >>> with scope_if(bool(factored_paths(params))):  # doctest: +SKIP
  ...   logits = model.apply({'params': params}, x)
  """
  return scope() if factored else contextlib.nullcontext()


def apply(module, factored_params, inputs, *, paths: Iterable[str] | None = None, **kwargs):
  """``module.apply`` on a factored params tree, inside :func:`scope`.

  ``inputs`` is a dict of keyword inputs (``{'input_ids': ..., 'attention_mask': ...}``), a
  tuple of positional ones, or a single array; ``kwargs`` go to ``module.apply``
  (``deterministic=False``, ``rngs=...``). Jittable and differentiable in ``factored_params``.

  >>> logits = apply(model, small, {'input_ids': ids, 'attention_mask': mask})  # doctest: +SKIP
  >>> grads = jax.grad(lambda p: loss(apply(model, p, images)))(small)          # doctest: +SKIP
  """
  if isinstance(inputs, Mapping):
    args, kw = (), dict(inputs)
  elif isinstance(inputs, tuple):
    args, kw = inputs, {}
  else:
    args, kw = (inputs,), {}
  with scope(paths):
    return module.apply({'params': factored_params}, *args, **kw, **kwargs)


# ----------------------------------------------------------------------------- reports


def report(params, factored) -> dict[str, Any]:
  """What factorization saved: per kernel and in total.

  Per factored kernel (keyed by its original leaf path): ``shape`` (original), ``shape_2d``
  ``(in, out)``, ``rank``, ``max_rank``, ``params_before`` (in·out), ``params_after``
  (r·(in + out)), ``flops_before``/``flops_after`` per input row (per token in a transformer:
  2·in·out against 2·r·(in + out)), and ``energy``: ``‖U·V‖²/‖W‖²``, the share of ``sum(S²)``
  kept (after fine-tuning the factors, the relative energy of the trained product). Totals:
  ``params_before``/``params_after`` of the whole trees, ``params_saved``, ``ratio`` (after /
  before), and ``flops_before``/``flops_after`` summed over the factored kernels.

  >>> rep = report(params, small)                        # doctest: +SKIP
  >>> rep['params_saved'], rep['kernels']['dense_0/kernel']['rank']  # doctest: +SKIP
  """
  orig, node = tree_lib.flatten(params), tree_lib.flatten(factored)
  kernels = {}
  for layer in factored_paths(factored):
    prefix = f'{layer}/' if layer else ''
    u = np.asarray(jax.device_get(node[f'{prefix}{U_NAME}']), np.float64)
    v = np.asarray(jax.device_get(node[f'{prefix}{V_NAME}']), np.float64)
    path = f'{prefix}kernel'
    if path not in orig:
      raise UserInputError(f'report: {path} is not in the original params; valid: the tree '
                           'factorize was given')
    r = u.shape[-1]
    d_in, d_out = int(np.prod(u.shape[:-1])), int(np.prod(v.shape[1:]))
    u2, v2 = u.reshape(d_in, r), v.reshape(r, d_out)
    # ‖U·V‖² = trace((UᵀU)(VVᵀ)): the kept energy without forming the in×out product.
    kept = float(np.sum((u2.T @ u2) * (v2 @ v2.T)))
    total = float(np.sum(np.square(np.asarray(jax.device_get(orig[path]), np.float64))))
    kernels[path] = {
        'shape': tuple(np.shape(orig[path])), 'shape_2d': (d_in, d_out), 'rank': r,
        'max_rank': min(d_in, d_out), 'params_before': d_in * d_out,
        'params_after': r * (d_in + d_out), 'flops_before': 2 * d_in * d_out,
        'flops_after': 2 * r * (d_in + d_out), 'energy': kept / total if total else 1.0}
  before, after = tree_lib.count(params), tree_lib.count(factored)
  return {
      'kernels': kernels, 'params_before': before, 'params_after': after,
      'params_saved': before - after, 'ratio': after / max(before, 1),
      'flops_before': sum(k['flops_before'] for k in kernels.values()),
      'flops_after': sum(k['flops_after'] for k in kernels.values())}


def format_report(rep: dict) -> str:
  """A readable table of :func:`report`.

  >>> print(format_report(report(params, small)))  # doctest: +SKIP
  """
  rows = [f"{'kernel':48s} {'in x out':>13s} {'rank':>9s} {'params':>21s} {'energy':>7s}"]
  for path, k in rep['kernels'].items():
    rows.append(f"{path:48s} {k['shape_2d'][0]:>6d} x {k['shape_2d'][1]:<6d}"
                f"{k['rank']:>5d}/{k['max_rank']:<4d}"
                f"{k['params_before']:>10,d} -> {k['params_after']:<9,d}{k['energy']:7.4f}")
  rows.append(f"params: {rep['params_before']:,d} -> {rep['params_after']:,d} "
              f"(saved {rep['params_saved']:,d}; x{rep['ratio']:.3f}); matmul FLOPs per row of "
              f"the factored layers: {rep['flops_before']:,d} -> {rep['flops_after']:,d}")
  return '\n'.join(rows)
