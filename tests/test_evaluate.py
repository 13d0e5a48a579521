"""Accuracy, loss and ECE, exact over padded batches."""
import jax.numpy as jnp
import numpy as np

from peftjax import evaluate


def test_ece_by_hand():
  conf = np.array([0.9, 0.9, 0.6, 0.6])
  correct = np.array([1.0, 0.0, 1.0, 1.0])
  # Bin of 0.9: accuracy 0.5 -> |0.5 - 0.9| * 2/4; bin of 0.6: accuracy 1 -> |1 - 0.6| * 2/4.
  assert np.isclose(evaluate.expected_calibration_error(conf, correct, np.ones(4)),
                    0.4 * 0.5 + 0.4 * 0.5)


def test_padding_is_weighted_out():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, 0.0], [5.0, 0.0]])
  labels = jnp.array([0, 0, 1, 1])
  batches = [{'logits': logits[:2], 'label': labels[:2], 'weight': jnp.array([1.0, 1.0])},
             {'logits': logits[2:], 'label': labels[2:], 'weight': jnp.array([1.0, 0.0])}]
  m = evaluate.evaluate(lambda b: evaluate.batch_stats(b['logits'], b['label'], b['weight']),
                        batches)
  assert m['examples'] == 3
  assert np.isclose(m['accuracy'], 1 / 3)
  lse = lambda z: np.log(np.exp(z).sum())
  expected_loss = ((lse([2, 0]) - 2) + (lse([0, 2]) - 0) + (lse([5, 0]) - 0)) / 3
  assert np.isclose(m['loss'], expected_loss, rtol=1e-5)
