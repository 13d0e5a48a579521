"""Gradual-unfreezing schedules and optimizer-state transplant."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from peftjax import tree
from peftjax import unfreeze

SCHEDULE = ((0, 'classifier/'), (10, 'layer_1/'), (20, 'layer_0/'))
PATHS = ['classifier/kernel', 'encoder/layer_1/w', 'encoder/layer_0/w', 'encoder/embeddings/e']


@pytest.mark.parametrize('update,expected', [
    (0, ['classifier/kernel']),
    (9, ['classifier/kernel']),
    (10, ['classifier/kernel', 'encoder/layer_1/w']),
    (25, ['classifier/kernel', 'encoder/layer_1/w', 'encoder/layer_0/w']),
])
def test_selector_top_down(update, expected):
  sel = unfreeze.selector(None, SCHEDULE, update)
  assert [p for p in PATHS if sel(p, None)] == expected
  assert unfreeze.boundaries(SCHEDULE) == {10, 20}


def test_transplant_keeps_old_state_and_inits_new_leaves():
  old_params = {'a': jnp.ones(2)}
  new_params = {'a': jnp.ones(2), 'b': jnp.ones(3)}
  tx = optax.adam(0.1)
  old = tx.init(old_params)
  _, old = tx.update({'a': jnp.array([1.0, -2.0])}, old, old_params)
  merged = unfreeze.transplant(tx.init(new_params), old)
  np.testing.assert_array_equal(merged[0].mu['a'], old[0].mu['a'])
  np.testing.assert_array_equal(merged[0].mu['b'], np.zeros(3))
  assert int(merged[0].count) == 1
  assert tree.count(merged) == 2 * 5 + 1


@pytest.mark.parametrize('bad', [((5, 'a'), (3, 'b')), ((-1, 'a'),), (('5', 'a'),), ((1, '('),)])
def test_bad_schedules(bad):
  with pytest.raises(ValueError):
    unfreeze.check_schedule(bad)
