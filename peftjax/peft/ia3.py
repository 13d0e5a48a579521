"""IA3 as a functional transform (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is
Better and Cheaper than In-Context Learning").

IA3 learns elementwise scaling vectors, initialised to ones, on

* the *outputs* of the layers whose module path matches ``peft.ia3.targets`` (by default the key
  and value projections): ``y = l ⊙ layer(x)``, ``l`` of the layer's output feature shape, e.g.
  ``(heads, head_dim)`` for BERT's DenseGeneral key/value;
* the *inputs* of the layers matching ``peft.ia3.ffn_targets`` (by default the FFN
  down-projection ``output``, whose input is the intermediate activation):
  ``y = layer(l ⊙ x)``, ``l`` of shape ``(F,)``.

It runs through method interception (:mod:`peftjax.intercept`), so any linen or NNX
model with dense layers or convolutions works unedited (a convolution's output vector scales
its output channels, its input vector its input channels). Vectors of layers stacked by
``nn.scan`` carry the stack's axes (:func:`vector_shapes`) and are sliced per layer. The tree mirrors the base tree::

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
from jax.sharding import PartitionSpec as P

from peftjax import tree as tree_lib
from peftjax.errors import ConfigError
from peftjax.peft.base import Method
from peftjax.peft.base import layer_scope
from peftjax.peft.base import register
from peftjax.peft import layers
from peftjax.peft.lora import Site
from peftjax.peft.lora import _record_modules
from peftjax.peft.lora import call_leaves

_KINDS = ('dense', 'conv')


# One dense layer: module path, kernel split into in/out dims, input axes (LoRA's own record).
DenseSite = Site


def dense_sites(module, base_params, inputs, kinds: tuple = ('dense',)) -> dict[str, DenseSite]:
  """Module path -> :class:`DenseSite` for every dense layer (and with ``kinds`` including
  ``'conv'``, convolution) the forward calls; a stacked layer's (``nn.scan``) has ``lead``.

  Found with an abstract forward (``jax.eval_shape``), so nothing is computed.

  >>> sites = dense_sites(model, params, {'input_ids': ids, 'attention_mask': m})  # doctest: +SKIP
  >>> sites['encoder/layer_0/output'].in_shape                                     # doctest: +SKIP
  (1536,)
  """
  flat = tree_lib.flatten(base_params)
  out = {}
  for path, (mod, x_ndim, call_shape) in _record_modules(module, base_params, inputs).items():
    k = layers.kind(mod)
    if k not in kinds or f'{path}/kernel' not in flat or call_shape is None:
      continue
    w_shape = tuple(flat[f'{path}/kernel'].shape)
    lead = w_shape[:len(w_shape) - len(call_shape)]
    if k == 'conv':
      out[path] = DenseSite(path, 'conv', call_shape[:-1], call_shape[-1:], (x_ndim - 1,),
                            lead=lead)
      continue
    if isinstance(mod, nn.DenseGeneral) and mod.batch_dims:
      continue  # batch_dims layers have no clean in/out split; never selected
    x_axes = layers.contracted_axes(mod, x_ndim)
    n_in = len(x_axes)
    out[path] = DenseSite(path, 'dense', call_shape[:n_in], call_shape[n_in:], x_axes, lead=lead)
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
    raise ConfigError(f'peft.{field}={pattern!r} matches no dense or convolution layer\'s '
                      f'module path; closest module paths: {near}')
  return matched


def _broadcast_in(x_axes: tuple, vec, x_ndim: int):
  """An input vector (the kernel's input dims, ascending input axes) shaped to broadcast
  against the input: its dims go to the contracted axes ``x_axes``."""
  shape = [1] * x_ndim
  for ax, n in zip(x_axes, vec.shape[len(vec.shape) - len(x_axes):]):
    shape[ax] = int(n)
  return vec.reshape(shape)


def vector_shapes(site: DenseSite) -> tuple[tuple, tuple]:
  """``(output vector shape, input vector shape)`` at a site.

  An output vector is ``out_shape`` (``(*lead, 1..., *out)`` for a stacked layer, so that
  ``W * l`` broadcasts over each layer's input axes); an input vector is the kernel's input
  dims with a stack's ``lead`` (a convolution's spatial dims are 1: it scales channels).

  >>> vector_shapes(DenseSite('l', 'dense', (4,), (3,), (1,), lead=(2,)))
  ((2, 1, 3), (2, 4))
  """
  lead = tuple(site.lead)
  out = (*lead, *(1,) * len(site.in_shape), *site.out_shape) if lead else tuple(site.out_shape)
  if site.kind == 'conv':
    return out, (*lead, *(1,) * (len(site.in_shape) - 1), site.in_shape[-1])
  return out, (*lead, *site.in_shape)


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
  an input vector ``layer(l ⊙ x)``; the input axes are read off the called layer, the vectors
  off its ``params`` (a scanned layer's slice).

  >>> with ia3_scope(ia3):  # doctest: +SKIP
  ...   logits = model.apply({'params': params}, ids, mask)
  """
  flat = tree_lib.flatten(ia3_params)
  outs, ins = set(vector_paths(ia3_params, 'out')), set(vector_paths(ia3_params, 'in'))

  def wrap(path, module, call, x):
    if path in ins:
      vec, = call_leaves(module, path, ('ia3_in/scale',), flat)
      vec = vec.astype(x.dtype)
      if layers.kind(module) == 'conv':
        x = x * vec.reshape(vec.shape[-1])  # channels last
      else:
        x = x * _broadcast_in(layers.contracted_axes(module, x.ndim), vec, x.ndim)
    y = call(x)
    if path in outs:
      vec, = call_leaves(module, path, ('ia3_out/scale',), flat)
      # The output feature dims are trailing, so the vector broadcasts as it is.
      y = y * vec.astype(y.dtype)
    return y

  return layer_scope(_KINDS, outs | ins, wrap)


def fold(base_params, ia3_params) -> dict:
  """``base_params`` with IA3 vectors folded into the kernels (and output-scaled biases).

  The vectors' shapes make each fold a broadcast (:func:`vector_shapes`).

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
      flat[f'{path}/bias'] = (b * vec.reshape(b.shape)).astype(b.dtype)
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
    sites = dense_sites(module, base_params, inputs, _KINDS)
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
      flat[f'{p}/ia3_out/scale'] = jnp.ones(vector_shapes(sites[p])[0], jnp.float32)
    for p in in_paths:
      flat[f'{p}/ia3_in/scale'] = jnp.ones(vector_shapes(sites[p])[1], jnp.float32)
    return tree_lib.unflatten(flat)

  def layer_tree(self, peft_params) -> dict:
    """The whole tree: every vector sits beside the kernel it scales."""
    return peft_params

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
        shape = vp[f'{path}/ia3_{which}/scale'].shape
        w = specs.get(f'{path}/kernel')
        if w is None:
          axes = (None,) * len(shape)
        else:  # an output vector has the kernel's trailing axes, an input vector its leading
          w = tuple(w)
          axes = (w if len(w) == len(shape) else
                  w[len(w) - len(shape):] if which == 'out' else w[:len(shape)])
        # Size-1 dims (a stack's broadcast input axes, a convolution's spatial ones) replicate.
        out[f'{path}/ia3_{which}/scale'] = P(*(a if n != 1 else None
                                               for a, n in zip(axes, shape)))
    return tree_lib.unflatten(out)
