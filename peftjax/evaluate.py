"""Evaluation metrics: accuracy, mean loss and expected calibration error (ECE)."""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.sharding import to_host


def batch_stats(logits, labels, weight):
  """Per-example (loss, confidence, correct) with padding weighted out; runs inside jit."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  loss = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  conf = jnp.exp(logp.max(-1))
  correct = (logits.argmax(-1) == labels).astype(jnp.float32)
  return {'loss': loss * weight, 'confidence': conf, 'correct': correct, 'weight': weight}


def expected_calibration_error(confidence, correct, weight, bins: int = 15) -> float:
  """ECE with equal-width confidence bins (Guo et al., 2017).

  >>> expected_calibration_error(np.array([1.0]), np.array([1.0]), np.array([1.0]))
  0.0
  """
  confidence, correct, weight = map(np.asarray, (confidence, correct, weight))
  edges = np.linspace(0.0, 1.0, bins + 1)
  idx = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
  total = weight.sum()
  ece = 0.0
  for b in range(bins):
    w = weight * (idx == b)
    n = w.sum()
    if n > 0:
      ece += n / total * abs((w * correct).sum() / n - (w * confidence).sum() / n)
  return float(ece)


def collect(stats_fn: Callable[[dict], dict], batches: Iterable[dict]) -> dict:
  """Runs ``stats_fn`` (a jitted ``batch -> per-example stats``) over ``batches`` and returns
  each statistic concatenated over the split (every process's shard, on the host)."""
  parts: dict = {}
  for batch in batches:
    for k, v in to_host(stats_fn(batch)).items():
      parts.setdefault(k, []).append(np.asarray(v))
  if not parts:
    raise ValueError('evaluation split is empty')
  return {k: np.concatenate(v) for k, v in parts.items()}


def reduce_stats(cat: dict) -> dict:
  """``{'accuracy', 'loss', 'ece', 'examples'}`` from concatenated :func:`batch_stats`; exact
  over padding (rows of weight 0 count nowhere)."""
  n = cat['weight'].sum()
  if n == 0:
    raise ValueError('evaluation split is empty')
  return {
      'accuracy': float((cat['correct'] * cat['weight']).sum() / n),
      'loss': float(cat['loss'].sum() / n),
      'ece': expected_calibration_error(cat['confidence'], cat['correct'], cat['weight']),
      'examples': int(n),
  }


def evaluate(stats_fn: Callable[[dict], dict], batches: Iterable[dict],
             reduce: Callable[[dict], dict] = reduce_stats) -> dict:
  """Runs ``stats_fn`` (a jitted ``batch -> batch_stats``) over ``batches``; exact over padding.

  Returns ``reduce`` of the concatenated statistics: by default ``{'accuracy', 'loss', 'ece',
  'examples'}`` (a task passes its own ``eval_reduce``).

  >>> evaluate(lambda b: batch_stats(model(b), b['label'], b['weight']), batches)  # doctest: +SKIP
  """
  return reduce(collect(stats_fn, batches))
