"""IA3 as a functional transform (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning").

IA3 learns elementwise scaling vectors, initialised to ones, on

* the *outputs* of the layers whose module path matches ``peft.ia3.targets`` (by default the key
  and value projections): ``y = l ⊙ layer(x)``, ``l`` of the layer's output feature shape, e.g.
  ``(heads, head_dim)`` for BERT's DenseGeneral key/value;
* the *inputs* of the layers matching ``peft.ia3.ffn_targets`` (by default the FFN
  down-projection ``output``, whose input is the intermediate activation):
  ``y = layer(l ⊙ x)``, ``l`` of shape ``(F,)``.

It runs through ``flax.linen.intercept_methods``, so any linen model with ``nn.Dense`` /
``nn.DenseGeneral`` layers works unedited. The tree mirrors the base tree::

    encoder/layer_0/attention/key/ia3_out/scale     (heads, head_dim)
    encoder/layer_0/output/ia3_in/scale             (F,)

The leaf is named ``scale`` on purpose: AdamW's decoupled weight decay skips ``scale`` leaves
(as it skips LayerNorm scales), and decaying a multiplicative vector toward 0 instead of toward
its identity value 1 would shrink the adapted activations. :meth:`IA3.merge` folds the vectors
into the kernels (and biases) exactly.
"""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft.base import Method
from peftjax.peft.base import layer_scope
from peftjax.peft.base import register
from peftjax.peft.lora import Site
from peftjax.peft.lora import _record_modules
from peftjax.peft.lora import contracted_axes

_DENSE = (nn.Dense, nn.DenseGeneral)


# One dense layer: module path, kernel split into in/out dims, input axes (LoRA's own record).
DenseSite = Site


def dense_sites(module, base_params, inputs) -> dict[str, DenseSite]:
  """Module path -> :class:`DenseSite` for every ``nn.Dense``/``nn.DenseGeneral`` the forward calls.

  Found with an abstract forward (``jax.eval_shape``), so nothing is computed.

  >>> sites = dense_sites(model, params, {'input_ids': ids, 'attention_mask': m})  # doctest: +SKIP
  >>> sites['encoder/layer_0/output'].in_shape                                     # doctest: +SKIP
  (1536,)
  """
  flat = tree_lib.flatten(base_params)
  out = {}
  for path, (mod, x_ndim) in _record_modules(module, base_params, inputs).items():
    if not isinstance(mod, _DENSE) or f'{path}/kernel' not in flat:
      continue
    if isinstance(mod, nn.DenseGeneral):
      if mod.batch_dims:
        continue  # batch_dims layers have no clean in/out split; never selected
      axis = (mod.axis,) if isinstance(mod.axis, int) else tuple(mod.axis)
    else:
      axis = (-1,)
    x_axes = tuple(a % x_ndim for a in axis)
    w_shape = tuple(flat[f'{path}/kernel'].shape)
    n_in = len(x_axes)
    out[path] = DenseSite(path, 'dense', w_shape[:n_in], w_shape[n_in:], x_axes)
  return out


def match_module_paths(sites: dict[str, Any], pattern: str, field: str) -> list[str]:
  """The paths in ``sites`` that ``pattern`` (``re.search``) matches, sorted.

  Raises a :class:`ConfigError` naming ``field`` and the closest module paths when nothing
  matches, so a typo in ``--config.peft.<field>`` fails before any training starts.

  >>> match_module_paths({'a/key': 0, 'a/query': 1}, r'key$', 'ia3.targets')
  ['a/key']
  """
  try:
    rx = re.compile(pattern)
  except re.error as e:
    raise ConfigError(f'peft.{field}={pattern!r} is not a valid regex: {e}') from None
  matched = sorted(p for p in sites if rx.search(p))
  if not matched:
    near = tree_lib.closest_paths(pattern, list(sites))
    raise ConfigError(f'peft.{field}={pattern!r} matches no nn.Dense/nn.DenseGeneral module '
                      f'path; closest module paths: {near}')
  return matched


def _broadcast_in(site: DenseSite, vec, x_ndim: int):
  """``vec`` (shape ``in_shape``, kernel order) reshaped to broadcast against the input."""
  order = np.argsort(site.x_axes)  # input axes may be listed out of order, e.g. axis=(-1, -2)
  vec = jnp.transpose(vec, order)
  shape = [1] * x_ndim
  for ax, n in zip(sorted(site.x_axes), np.asarray(site.in_shape)[order]):
    shape[ax] = int(n)
  return vec.reshape(shape)


def vector_paths(ia3_params, which: str) -> list[str]:
  """Module paths with an ``ia3_<which>/scale`` vector (``which``: 'out' or 'in'), sorted.

  The tree is all IA3 needs: what ``init`` found is these paths, read back.

  >>> vector_paths({'a': {'key': {'ia3_out': {'scale': 1}}}}, 'out')
  ['a/key']
  """
  suffix = f'/ia3_{which}/scale'
  return sorted(p[:-len(suffix)] for p in tree_lib.flatten(ia3_params) if p.endswith(suffix))


def ia3_scope(ia3_params):
  """Context under which layers with an output vector compute ``l ⊙ layer(x)`` and those with
  an input vector ``layer(l ⊙ x)``; the input axes are read off the called layer.

  >>> with ia3_scope(ia3):  # doctest: +SKIP
  ...   logits = model.apply({'params': params}, ids, mask)
  """
  flat = tree_lib.flatten(ia3_params)
  outs, ins = set(vector_paths(ia3_params, 'out')), set(vector_paths(ia3_params, 'in'))

  def wrap(path, module, call, x):
    if path in ins:
      vec = flat[f'{path}/ia3_in/scale']
      x_axes = tuple(a % x.ndim for a in contracted_axes(module))
      site = DenseSite(path, 'dense', tuple(vec.shape), (), x_axes)
      x = x * _broadcast_in(site, vec.astype(x.dtype), x.ndim)
    y = call(x)
    if path in outs:
      # The output feature dims are trailing, so the vector broadcasts as it is.
      y = y * flat[f'{path}/ia3_out/scale'].astype(y.dtype)
    return y

  return layer_scope(_DENSE, outs | ins, wrap)


def fold(base_params, ia3_params) -> dict:
  """``base_params`` with IA3 vectors folded into the kernels (and output-scaled biases).

  >>> merged = fold(params, ia3)  # doctest: +SKIP
  """
  flat = tree_lib.flatten(base_params)
  vp = tree_lib.flatten(ia3_params)
  for path in vector_paths(ia3_params, 'out'):
    vec = vp[f'{path}/ia3_out/scale']
    w = flat[f'{path}/kernel']
    flat[f'{path}/kernel'] = (w * vec).astype(w.dtype)  # out dims trailing: broadcasts
    if f'{path}/bias' in flat:
      b = flat[f'{path}/bias']
      flat[f'{path}/bias'] = (b * vec).astype(b.dtype)
  for path in vector_paths(ia3_params, 'in'):
    vec = vp[f'{path}/ia3_in/scale']
    w = flat[f'{path}/kernel']
    vec = vec.reshape(*vec.shape, *(1,) * (w.ndim - vec.ndim))  # scale kernel rows
    flat[f'{path}/kernel'] = (w * vec).astype(w.dtype)
  return tree_lib.unflatten(flat)


@register('ia3')
class IA3(Method):
  """IA3 from config ``peft.ia3``: ``targets`` (outputs scaled), ``ffn_targets`` (inputs scaled).

  Both are regexes over *module* paths (not weight paths), e.g. ``'attention/(key|value)$'``.

  >>> method = peft.build(config.peft)                      # doctest: +SKIP  (method='ia3')
  >>> ia3 = method.init(rng, model, params, inputs)         # doctest: +SKIP
  >>> logits = peft.apply(model, method, params, ia3, inputs)  # doctest: +SKIP
  >>> merged = method.merge(params, ia3)                    # same logits, no IA3 at run time
  """

  def init(self, rng, module, base_params, inputs) -> dict:
    """Ones for every matched layer: the model is exactly unchanged at step 0."""
    del rng  # deterministic init
    sites = dense_sites(module, base_params, inputs)
    out_paths, in_paths = [], []
    if self.cfg.ia3.targets:
      out_paths = match_module_paths(sites, self.cfg.ia3.targets, 'ia3.targets')
    if self.cfg.ia3.ffn_targets:
      in_paths = match_module_paths(sites, self.cfg.ia3.ffn_targets, 'ia3.ffn_targets')
    if not out_paths and not in_paths:
      raise ConfigError("peft.ia3.targets and peft.ia3.ffn_targets are both ''; IA3 would train "
                        "nothing. Set at least one, e.g. peft.ia3.targets='attention/(key|value)$'")
    flat = {}
    for p in out_paths:
      flat[f'{p}/ia3_out/scale'] = jnp.ones(sites[p].out_shape, jnp.float32)
    for p in in_paths:
      flat[f'{p}/ia3_in/scale'] = jnp.ones(sites[p].in_shape, jnp.float32)
    return tree_lib.unflatten(flat)

  def intercept(self, peft_params, *, rng=None, deterministic: bool = True):
    del rng, deterministic  # IA3 has no dropout
    return ia3_scope(peft_params)

  def merge(self, base_params, peft_params) -> dict:
    """Output scaling: ``W[..., out] *= l``, ``b *= l``; input scaling: ``W[in, ...] *= l``.

    The merged model equals the implicit one (to float rounding).
    """
    return fold(base_params, peft_params)

  def logical_specs(self, base_specs, peft_params) -> Any:
    """An output vector takes the kernel's output axes; an input vector its input axes."""
    specs = tree_lib.flatten(base_specs)
    vp = tree_lib.flatten(peft_params)
    out = {}
    for which in ('out', 'in'):
      for path in vector_paths(peft_params, which):
        n = vp[f'{path}/ia3_{which}/scale'].ndim
        w = specs.get(f'{path}/kernel')
        if w is None:
          out[f'{path}/ia3_{which}/scale'] = P(*(None,) * n)
        else:  # an output vector has the kernel's trailing axes, an input vector its leading
          out[f'{path}/ia3_{which}/scale'] = P(*(tuple(w)[len(w) - n:] if which == 'out'
                                                 else tuple(w)[:n]))
    return tree_lib.unflatten(out)
