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


def evaluate(stats_fn: Callable[[dict], dict], batches: Iterable[dict]) -> dict:
  """Runs ``stats_fn`` (a jitted ``batch -> batch_stats``) over ``batches``; exact over padding.

  Returns ``{'accuracy', 'loss', 'ece', 'examples'}``.
  """
  parts = {'loss': [], 'confidence': [], 'correct': [], 'weight': []}
  for batch in batches:
    out = to_host(stats_fn(batch))  # per-example stats of every process's shard
    for k in parts:
      parts[k].append(np.asarray(out[k]))
  cat = {k: np.concatenate(v) for k, v in parts.items()}
  n = cat['weight'].sum()
  if n == 0:
    raise ValueError('evaluation split is empty')
  return {
      'accuracy': float((cat['correct'] * cat['weight']).sum() / n),
      'loss': float(cat['loss'].sum() / n),
      'ece': expected_calibration_error(cat['confidence'], cat['correct'], cat['weight']),
      'examples': int(n),
  }
