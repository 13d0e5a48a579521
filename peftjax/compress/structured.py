"""Structured pruning of a BERT classifier: attention heads and FFN channels really removed.

The kept heads / FFN channels are sliced out into a smaller tree, with a :class:`BertConfig`
that builds the smaller model (:func:`prune_heads`, :func:`prune_ffn`; scores by
:func:`head_scores` and :func:`ffn_scores`, by magnitude or first-order Taylor importance).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import tree
from peftjax.compress.prune import PruneError
from peftjax.models.bert import BertConfig

PyTree = Any



def _encoder(params: PyTree) -> dict:
  """The encoder tree of a ``BertClassifier`` tree (``params['encoder']``) or of an encoder."""
  return params['encoder'] if 'encoder' in params else params


def _rebuild(params: PyTree, flat_encoder: dict) -> dict:
  """A new tree like ``params`` (classifier or encoder) with the encoder leaves replaced."""
  enc = tree.unflatten(flat_encoder)
  if 'encoder' in params:
    return tree.unflatten({**tree.flatten(params), **{'encoder/' + p: v
                                                      for p, v in tree.flatten(enc).items()}})
  return enc


def _check_dense(cfg: BertConfig, what: str) -> None:
  if cfg.moe_layers:
    raise PruneError(f'{what}: model.moe_layers={cfg.moe_layers}; structured pruning supports '
                     'dense BERT models only (an MoE layer has per-expert FFNs)')


def _check_leaf(flat: dict, path: str, shape: tuple) -> Any:
  if path not in flat:
    raise PruneError(f'encoder has no {path!r} (does params match the BertConfig?); closest '
                     f'paths: {tree.closest_paths(path, flat)}')
  if tuple(flat[path].shape) != tuple(shape):
    raise PruneError(f'encoder {path!r} has shape {tuple(flat[path].shape)}; the BertConfig '
                     f'expects {tuple(shape)}')
  return flat[path]


def _head_groups(flat: dict, cfg: BertConfig, i: int) -> list[tuple[str, Any, int]]:
  """``(path, leaf, head axis)`` of layer ``i``'s per-head parameters (what pruning removes)."""
  d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  a = f'layer_{i}/attention/'
  out = []
  for n in ('query', 'key', 'value'):
    out.append((a + n + '/kernel', _check_leaf(flat, a + n + '/kernel', (d, h, dh)), 1))
    out.append((a + n + '/bias', _check_leaf(flat, a + n + '/bias', (h, dh)), 0))
  out.append((a + 'out/kernel', _check_leaf(flat, a + 'out/kernel', (h, dh, d)), 0))
  return out


def _ffn_groups(flat: dict, cfg: BertConfig, i: int) -> list[tuple[str, Any, int]]:
  """``(path, leaf, channel axis)`` of layer ``i``'s per-FFN-channel parameters."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  p = f'layer_{i}/'
  return [(p + 'intermediate/kernel', _check_leaf(flat, p + 'intermediate/kernel', (d, f)), 1),
          (p + 'intermediate/bias', _check_leaf(flat, p + 'intermediate/bias', (f,)), 0),
          (p + 'output/kernel', _check_leaf(flat, p + 'output/kernel', (f, d)), 0)]


def _scores(params, cfg, grads, groups_fn, what: str) -> jax.Array:
  _check_dense(cfg, what)
  flat = tree.flatten(_encoder(params))
  flat_g = None if grads is None else tree.flatten(_encoder(grads))
  groups = [groups_fn(flat, cfg, i) for i in range(cfg.num_layers)]
  ws = tuple(tuple(w for _, w, _ in layer) for layer in groups)
  gs = None if flat_g is None else tuple(
      tuple(_check_leaf(flat_g, path, w.shape) for path, w, _ in layer) for layer in groups)
  return _unit_scores(ws, gs, tuple(axis for _, _, axis in groups[0]))


@functools.partial(jax.jit, static_argnums=(2,))
def _unit_scores(ws: tuple, gs: tuple | None, axes: tuple) -> jax.Array:
  """``(layers, units)``: per unit, the L2 norm of its weights, or ``|sum(w * g)|``."""
  rows = []
  for i, layer in enumerate(ws):
    total = 0.0
    for j, (w, axis) in enumerate(zip(layer, axes)):
      other = tuple(a for a in range(w.ndim) if a != axis)
      w = w.astype(jnp.float32)
      g = w if gs is None else gs[i][j].astype(jnp.float32)
      total = total + jnp.sum(w * g, axis=other)
    rows.append(jnp.sqrt(total) if gs is None else jnp.abs(total))
  return jnp.stack(rows)


def head_scores(params: PyTree, cfg: BertConfig, grads: PyTree | None = None) -> jax.Array:
  """Importance of every attention head, ``(num_layers, num_heads)``.

  A head's parameters are the ones :func:`prune_heads` removes: its slices of the query, key
  and value kernels and biases and its rows of the ``out`` kernel. Without ``grads``: their L2
  norm. With ``grads`` (a tree like ``params``, e.g. the loss gradient summed over a few
  batches): the first-order Taylor estimate of the loss change when the head is removed,
  ``|sum(w * g)|`` over those parameters (Molchanov et al. 2019; its ``out``-kernel term alone
  is Michel et al.'s head-mask gradient ``|dL/d xi_h|``).

  ``params`` is a ``BertClassifier`` tree (with ``'encoder'``) or an encoder tree.

  >>> s = head_scores(params, cfg)                         # doctest: +SKIP
  >>> g = jax.grad(loss)(params); s = head_scores(params, cfg, g)  # doctest: +SKIP
  """
  return _scores(params, cfg, grads, _head_groups, 'head_scores')


def ffn_scores(params: PyTree, cfg: BertConfig, grads: PyTree | None = None) -> jax.Array:
  """Importance of every FFN channel, ``(num_layers, intermediate_size)``.

  A channel's parameters are its ``intermediate`` kernel column and bias and its ``output``
  kernel row; the score is their L2 norm, or ``|sum(w * g)|`` with ``grads`` (as in
  :func:`head_scores`).

  >>> s = ffn_scores(params, cfg)  # doctest: +SKIP
  """
  return _scores(params, cfg, grads, _ffn_groups, 'ffn_scores')


def _check_keep(name: str, keep, limit: int, field: str) -> None:
  if not isinstance(keep, (int, np.integer)) or isinstance(keep, bool) or not 1 <= keep <= limit:
    raise PruneError(f'{name}={keep!r}; valid: an integer in 1..{limit} ({field}={limit})')


def _kept(scores, shape: tuple, keep: int, name: str) -> np.ndarray:
  """Indices (ascending) of the ``keep`` highest scores of each row; ties keep lower indices."""
  s = np.asarray(jax.device_get(scores), np.float64)
  if s.shape != shape:
    raise PruneError(f'{name} has shape {s.shape}; expected {shape} (num_layers, units)')
  return np.sort(np.argsort(-s, axis=1, kind='stable')[:, :keep], axis=1)


def _prune(params, cfg, keep, scores, groups_fn, shape, name) -> dict:
  flat = dict(tree.flatten(_encoder(params)))
  kept = _kept(scores, shape, keep, name)
  for i in range(cfg.num_layers):
    for path, w, axis in groups_fn(flat, cfg, i):
      # On the host: an offline, shape-changing step (the result is a new, smaller model).
      flat[path] = jnp.asarray(np.take(np.asarray(jax.device_get(w)), kept[i], axis=axis))
  return _rebuild(params, flat)


def prune_heads(params: PyTree, cfg: BertConfig, keep_per_layer: int,
                scores=None) -> tuple[dict, BertConfig]:
  """Removes all but the ``keep_per_layer`` highest-scoring heads of every layer.

  The kept heads keep their order and size (``head_dim``), the hidden size is unchanged, so the
  new config has ``num_heads=keep_per_layer`` and ``head_size`` set to the old head size. The
  result is a real, smaller tree: ``BertClassifier(new_cfg, ...)`` applies to it, and its
  outputs equal the original model's with the removed heads' ``out`` rows zeroed. A head-pruned
  model has no HF BERT equivalent (its export raises).

  Args:
    params: a ``BertClassifier`` tree (with ``'encoder'``) or an encoder tree.
    cfg: its config (dense: no MoE layers).
    keep_per_layer: heads kept in each layer, ``1..cfg.num_heads`` (the same in every layer,
      as ``BertConfig`` has one ``num_heads``).
    scores: ``(num_layers, num_heads)`` importances; default :func:`head_scores` (magnitude).

  Returns:
    ``(new_params, new_cfg)``, ``new_params`` shaped like ``params`` (classifier or encoder).

  >>> scores = head_scores(params, cfg, grads)  # doctest: +SKIP
  >>> small, small_cfg = prune_heads(params, cfg, 8, scores)  # doctest: +SKIP
  >>> BertClassifier(small_cfg, num_classes=2).apply({'params': small}, ids, mask)  # doctest: +SKIP
  """
  _check_dense(cfg, 'prune_heads')
  _check_keep('keep_per_layer', keep_per_layer, cfg.num_heads, 'cfg.num_heads')
  if scores is None:
    scores = head_scores(params, cfg)
  new = _prune(params, cfg, keep_per_layer, scores, _head_groups,
               (cfg.num_layers, cfg.num_heads), 'scores')
  if keep_per_layer == cfg.num_heads:
    return new, cfg
  return new, dataclasses.replace(cfg, num_heads=int(keep_per_layer), head_size=cfg.head_dim)


def prune_ffn(params: PyTree, cfg: BertConfig, keep: int, scores=None) -> tuple[dict, BertConfig]:
  """Removes all but the ``keep`` highest-scoring FFN (intermediate) channels of every layer.

  The kept channels' ``intermediate`` kernel columns and biases and ``output`` kernel rows are
  sliced out; the new config has ``intermediate_size=keep``. The smaller model equals the
  original with the removed channels' ``output`` rows zeroed.

  Args:
    params: a ``BertClassifier`` tree (with ``'encoder'``) or an encoder tree.
    cfg: its config (dense: no MoE layers).
    keep: channels kept per layer, ``1..cfg.intermediate_size``.
    scores: ``(num_layers, intermediate_size)`` importances; default :func:`ffn_scores`.

  Returns:
    ``(new_params, new_cfg)``.

  >>> small, small_cfg = prune_ffn(params, cfg, keep=768)  # doctest: +SKIP
  """
  _check_dense(cfg, 'prune_ffn')
  _check_keep('keep', keep, cfg.intermediate_size, 'cfg.intermediate_size')
  if scores is None:
    scores = ffn_scores(params, cfg)
  new = _prune(params, cfg, keep, scores, _ffn_groups,
               (cfg.num_layers, cfg.intermediate_size), 'scores')
  return new, dataclasses.replace(cfg, intermediate_size=int(keep))
