"""Reduce the MoE layers' sown statistics into the train step's auxiliary losses and metrics."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from peftjax import tree as tree_lib

SCALARS = ('balance_loss', 'z_loss', 'dropped_fraction')


def layer_stats(collection: dict) -> dict[str, dict]:
  """``{layer path: {stat: value}}`` from a ``'moe'`` collection (``mutable=['moe']``).

  >>> layer_stats({'encoder': {'layer_1': {'moe': {'z_loss': (1.0,)}}}})
  {'encoder/layer_1/moe': {'z_loss': 1.0}}
  """
  out: dict[str, dict] = {}
  for path, value in tree_lib.flatten(collection).items():
    # sow stores a tuple per name: '.../moe/z_loss/0'
    parts = path.split('/')
    if parts[-1].isdigit():
      parts = parts[:-1]
    out.setdefault('/'.join(parts[:-1]), {})[parts[-1]] = value
  return out


def aux_losses(collection: dict, balance_coef: float, z_coef: float) -> tuple[jax.Array, dict]:
  """``(weighted auxiliary loss, metrics)``: each statistic averaged over the MoE layers.

  The loss is ``balance_coef · mean(balance_loss) + z_coef · mean(z_loss)``; the metrics are the
  three means. An empty collection (a dense model) gives ``(0.0, {})``.

  >>> loss, m = aux_losses({}, 0.01, 0.001)
  """
  layers = layer_stats(collection)
  if not layers:
    return jnp.zeros((), jnp.float32), {}
  metrics = {k: jnp.mean(jnp.stack([v[k] for v in layers.values()])) for k in SCALARS}
  loss = balance_coef * metrics['balance_loss'] + z_coef * metrics['z_loss']
  return loss, metrics
