"""Paths, selectors, partition/combine and size reports."""
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import tree


def _params():
  return {'encoder': {'layer_0': {'query': {'kernel': jnp.ones((4, 2, 3)), 'bias': jnp.ones((2, 3))},
                                  'norm': {'scale': jnp.ones(4)}}},
          'classifier': {'kernel': jnp.ones((4, 2)), 'bias': jnp.zeros(2)}}


def test_paths_and_roundtrip():
  p = _params()
  assert tree.paths(p) == ['classifier/bias', 'classifier/kernel', 'encoder/layer_0/norm/scale',
                           'encoder/layer_0/query/bias', 'encoder/layer_0/query/kernel']
  assert tree.unflatten(tree.flatten(p)).keys() == p.keys()


def test_selectors():
  p = _params()
  assert tree.select(p, 'query/kernel$') == ['encoder/layer_0/query/kernel']
  assert tree.select(p, ['bias$', 'classifier/']) == [
      'classifier/bias', 'classifier/kernel', 'encoder/layer_0/query/bias']
  assert tree.select(p, lambda path, x: x.ndim == 1) == ['classifier/bias',
                                                         'encoder/layer_0/norm/scale']
  assert tree.select(p, None) == []
  with pytest.raises(ValueError, match='invalid selector regex'):
    tree.select(p, 'query/(kernel')


def test_partition_combine_inverse():
  p = _params()
  trainable, frozen = tree.partition(p, ['bias$'])
  assert tree.paths(trainable) == ['classifier/bias', 'encoder/layer_0/query/bias']
  assert 'bias' not in frozen['classifier']
  back = tree.combine(frozen, trainable)
  assert tree.paths(back) == sorted(tree.paths(p))
  for k, v in tree.flatten(back).items():
    np.testing.assert_array_equal(v, tree.flatten(p)[k])
  with pytest.raises(ValueError, match='more than one tree'):
    tree.combine(p, trainable)


def test_label_tree():
  labels = tree.label_tree(_params(), 'classifier/')
  assert labels['classifier']['kernel'] == 'trainable'
  assert labels['encoder']['layer_0']['query']['kernel'] == 'frozen'


def test_size_report_exact():
  trainable, frozen = tree.partition(_params(), 'classifier/')
  r = tree.size_report(trainable, frozen)
  assert r['trainable_params'] == 4 * 2 + 2
  assert r['total_params'] == 24 + 6 + 4 + 8 + 2
  assert r['trainable_bytes'] == 10 * 4
  assert r['groups']['encoder/layer_0'] == {'params': 34, 'trainable': 0, 'bytes': 136}
  text = tree.format_report(r)
  assert 'trainable: 10 of 44 (22.727%)' in text


def test_closest_paths():
  cands = ['encoder/layer_0/attention/query/kernel', 'encoder/layer_0/attention/key/kernel',
           'classifier/kernel']
  assert tree.closest_paths('encoder/.*/attention/quer/kernel', cands, n=1) == [cands[0]]
