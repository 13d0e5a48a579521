"""Delta checkpoints: round trip, manifest, base-hash refusal, corrupt files, atomic writes."""
import json
import pathlib

import numpy as np
import pytest

from peftjax import checkpoint
from peftjax import delta
from peftjax import tree


def _trees(seed=0):
  rng = np.random.default_rng(seed)
  base = {'encoder': {'w': rng.normal(size=(64, 32)).astype(np.float32),
                      'b': np.zeros(32, np.float32)}}
  trainable = {'base': {'classifier': {'kernel': rng.normal(size=(32, 2)).astype(np.float32)}},
               'peft': {'encoder': {'w': {'lora_a': rng.normal(size=(64, 4)).astype(np.float32),
                                          'lora_b': rng.normal(size=(4, 32)).astype(np.float32)}}}}
  return base, trainable


def _save(path, trainable, base, **kw):
  return delta.save_delta(path, trainable, base_params=base, method='lora',
                          peft_config={'method': 'lora', 'lora': {'rank': 4, 'alpha': 8.0}},
                          base_source='tiny',
                          dataset={'name': 'rt', 'split': 'train'},
                          metrics={'accuracy': 0.8}, **kw)


def test_round_trip_and_manifest(tmp_path):
  base, trainable = _trees()
  path = tmp_path / 'a.safetensors'
  saved = _save(path, trainable, base)
  loaded, manifest = delta.load_delta(path, base_params=base)
  for (p, a), (q, b) in zip(sorted(tree.flatten(trainable).items()),
                            sorted(tree.flatten(loaded).items())):
    assert p == q and np.array_equal(a, b)
  assert manifest['base']['sha256'] == tree.fingerprint(base)
  assert manifest['params']['count'] == 32 * 2 + 64 * 4 + 4 * 32
  assert manifest['params']['bytes'] == 4 * manifest['params']['count']
  assert manifest['base']['bytes'] == 4 * (64 * 32 + 32)
  assert manifest['adapter_to_base_bytes'] == pytest.approx(448 / 2080)
  assert manifest['method'] == 'lora' and manifest['peft_config']['lora']['rank'] == 4
  assert manifest['dataset']['name'] == 'rt' and manifest['metrics']['accuracy'] == 0.8
  assert set(manifest['versions']) == {'peftjax', 'jax'} and manifest['parent'] is None
  assert saved['file_bytes'] == path.stat().st_size > manifest['params']['bytes']


def test_parent_is_recorded(tmp_path):
  base, trainable = _trees()
  _save(tmp_path / 'a.safetensors', trainable, base)
  m = _save(tmp_path / 'b.safetensors', trainable, base, parent=tmp_path / 'a.safetensors')
  assert m['parent']['params_sha256'] == delta.read_manifest(tmp_path / 'a.safetensors')[
      'params']['sha256']


def test_wrong_base_is_refused_naming_both_hashes(tmp_path):
  base, trainable = _trees()
  other, _ = _trees(seed=1)
  _save(tmp_path / 'a.safetensors', trainable, base)
  with pytest.raises(delta.DeltaError) as e:
    delta.load_delta(tmp_path / 'a.safetensors', base_params=other)
  msg = str(e.value)
  assert tree.fingerprint(base)[:16] in msg and tree.fingerprint(other)[:16] in msg


def test_truncated_and_altered_files_are_refused(tmp_path):
  base, trainable = _trees()
  path = tmp_path / 'a.safetensors'
  _save(path, trainable, base)
  data = path.read_bytes()
  (tmp_path / 't.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(delta.DeltaError, match='corrupt or truncated'):
    delta.load_delta(tmp_path / 't.safetensors')
  altered = bytearray(data)
  altered[-1] ^= 0xFF  # flip bits of the last tensor byte
  (tmp_path / 'x.safetensors').write_bytes(bytes(altered))
  with pytest.raises(delta.DeltaError, match='do not match the manifest'):
    delta.load_delta(tmp_path / 'x.safetensors')
  with pytest.raises(delta.DeltaError, match='does not exist'):
    delta.read_manifest(tmp_path / 'missing.safetensors')


def test_manifest_missing_fields_is_refused(tmp_path):
  import safetensors.numpy
  path = tmp_path / 'm.safetensors'
  safetensors.numpy.save_file({'peft/a': np.zeros(2, np.float32)}, str(path),
                              metadata={delta.MANIFEST_KEY: json.dumps({'format': delta.FORMAT})})
  with pytest.raises(delta.DeltaError, match=r"manifest misses \['method'"):
    delta.read_manifest(path)


def test_crash_mid_write_keeps_the_previous_artifact(tmp_path, monkeypatch):
  base, trainable = _trees()
  path = tmp_path / 'a.safetensors'
  _save(path, trainable, base)
  before = path.read_bytes()

  def crash(*a, **k):
    raise OSError('disk full')
  monkeypatch.setattr(checkpoint.os, 'fsync', crash)
  _, changed = _trees(seed=2)
  with pytest.raises(OSError, match='disk full'):
    _save(path, changed, base)
  assert path.read_bytes() == before
  assert [p.name for p in pathlib.Path(tmp_path).iterdir()] == ['a.safetensors']  # no temp left


def _adam_state(trainable):
  """An AdamW state after one update (nonzero moments, step count 1)."""
  import optax
  tx = optax.adamw(1e-3)
  state = tx.init(trainable)
  _, state = tx.update(trainable, state, trainable)
  return tx, state


def test_optimizer_state_round_trip(tmp_path):
  import jax
  base, trainable = _trees()
  tx, opt = _adam_state(trainable)
  path = tmp_path / 'a.safetensors'
  m = _save(path, trainable, base, opt_state=opt)
  leaves = jax.tree.leaves(opt)
  assert m['opt_state'] == {'leaves': len(leaves),
                            'bytes': sum(np.asarray(v).nbytes for v in leaves)}
  assert len(leaves) == 2 * 3 + 1  # mu and nu per trainable leaf + the step count
  restored = delta.load_opt_state(path, tx.init(trainable))
  assert jax.tree.structure(restored) == jax.tree.structure(opt)
  for got, want in zip(jax.tree.leaves(restored), leaves):
    want = np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype  # the count stays a scalar
    np.testing.assert_array_equal(got, want)
  assert int(restored[0].count) == 1
  # The parameters are unaffected: same tensors and hash as a file without optimizer state.
  params, manifest = delta.load_delta(path, base_params=base)
  plain = _save(tmp_path / 'plain.safetensors', trainable, base)
  assert manifest['params'] == {k: plain['params'][k] for k in manifest['params']}
  assert sorted(tree.flatten(params)) == sorted(tree.flatten(trainable))
  assert plain['opt_state'] is None
  assert delta.load_opt_state(tmp_path / 'plain.safetensors', tx.init(trainable)) is None


def test_optimizer_state_for_another_optimizer_is_refused(tmp_path):
  import optax
  base, trainable = _trees()
  _, opt = _adam_state(trainable)
  path = tmp_path / 'a.safetensors'
  _save(path, trainable, base, opt_state=opt)
  sgd = optax.sgd(0.1, momentum=0.9).init(trainable)  # fewer leaves
  with pytest.raises(delta.DeltaError, match='optimizer state does not fit this optimizer'):
    delta.load_opt_state(path, sgd)
  smaller = {'base': trainable['base'], 'peft': {}}  # another trainable partition
  with pytest.raises(delta.DeltaError, match='use the same optim config and trainable partition'):
    delta.load_opt_state(path, optax.adamw(1e-3).init(smaller))
  wider = {**trainable, 'base': {'classifier': {'kernel': np.zeros((32, 3), np.float32)}}}
  with pytest.raises(delta.DeltaError, match=r'leaf \d+ of 7 differs'):
    delta.load_opt_state(path, optax.adamw(1e-3).init(wider))  # same count, one shape differs


def test_model_config_class_names_and_merges_are_in_the_manifest(tmp_path):
  import ml_collections
  base, trainable = _trees()
  model = ml_collections.ConfigDict({'name': 'bert', 'num_layers': 1, 'hidden': (256, 128)})
  merged_from = [{'name': 'a', 'weight': 0.3}, {'name': 'b', 'weight': 0.7}]
  _save(tmp_path / 'a.safetensors', trainable, base, model_config=model,
        class_names=('rotten', 'fresh'), merged_from=merged_from)
  m = delta.read_manifest(tmp_path / 'a.safetensors')
  assert m['base']['model_config'] == {'name': 'bert', 'num_layers': 1, 'hidden': [256, 128]}
  assert m['class_names'] == ['rotten', 'fresh'] and m['merged_from'] == merged_from
  assert m['base']['source'] == 'tiny' and m['created'].endswith('+00:00')
  m = _save(tmp_path / 'b.safetensors', trainable, base)
  assert (m['base']['model_config'], m['class_names'], m['merged_from']) == (None, None, None)
