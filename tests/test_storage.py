"""Run directories in a bucket: a tiny run with a gs:// workdir writes, resumes and reloads there."""
import json
import os
import pathlib
import stat

import numpy as np
import pytest

from configs import tiny
from fake_gcs import fake_gcs
from peftjax import delta
from peftjax import storage
from peftjax import train


def test_paths_and_atomic_writes(tmp_path):
  assert str(storage.path('gs://b/run') / 'x.json') == 'gs://b/run/x.json'
  assert storage.path('~/r') == storage.path(pathlib.Path.home() / 'r')
  with fake_gcs(tmp_path / 'gcs'):
    storage.write_json_atomic('gs://b/run/s.json', {'a': 1})
    assert json.loads((tmp_path / 'gcs/b/run/s.json').read_text()) == {'a': 1}
    storage.probe_writable('gs://b/run')
    assert sorted(p.name for p in (tmp_path / 'gcs/b/run').iterdir()) == ['s.json']
    stage = storage.Staging('gs://b/run', resume=('log.txt',))
    (stage.local / 'log.txt').write_text('one\n')
    stage.sync()
    with open(stage.local / 'log.txt', 'a') as f:
      f.write('two\n')
    stage.close()
    assert (tmp_path / 'gcs/b/run/log.txt').read_text() == 'one\ntwo\n'
    assert not stage.local.exists()
    again = storage.Staging('gs://b/run', resume=('log.txt',))  # a resumed run appends
    assert (again.local / 'log.txt').read_text() == 'one\ntwo\n'
    again.close()


def test_tiny_run_in_a_bucket_resumes_and_its_adapter_loads(tmp_path):
  c = tiny.get_config()
  c.train.eval_before = False
  c.train.save_adapter = True
  with fake_gcs(tmp_path / 'gcs'):
    c.train.steps = 4
    first = train.train_and_evaluate(c, 'gs://bucket/run')
    c.train.steps = 6  # the same run, continued: it resumes from the bucket's step-4 checkpoint
    second = train.train_and_evaluate(c, 'gs://bucket/run')
    params, manifest = delta.load_delta('gs://bucket/run/adapter.safetensors')
  run = tmp_path / 'gcs' / 'bucket' / 'run'
  assert sorted(p.name for p in (run / 'checkpoints').iterdir()) == ['4', '6']
  assert (run / 'checkpoints/6/commit_success.txt').exists()  # orbax's bucket protocol ran
  lines = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
  # Steps 2 and 4 from the first run, then 6 from the resumed one, in one appended log.
  assert [l['step'] for l in lines if l['split'] == 'train'] == [2, 4, 6]
  assert [l['step'] for l in lines if l['split'] == 'test'] == [4, 6]
  assert list((run / 'tensorboard').glob('events.out.tfevents.*'))
  summary = json.loads((run / 'summary.json').read_text())
  assert summary['steps'] == 6 and summary['accuracy_after'] == second['accuracy_after']
  assert json.loads((run / 'run_state.json').read_text())['train_seconds'] > 0
  assert manifest['params']['sha256'] == summary['trainable_sha256'] != first['trainable_sha256']
  assert all(np.isfinite(v).all() for v in delta.tree_lib.flatten(params).values())


def test_atomic_writes_get_the_mode_of_an_ordinary_write(tmp_path):
  # mkstemp's 0600 must not leak into results and adapters that a team reads.
  old = os.umask(0o022)
  try:
    storage.write_json_atomic(tmp_path / 'summary.json', {'a': 1})
    with open(tmp_path / 'plain.json', 'w') as f:
      f.write('{}')
  finally:
    os.umask(old)
  mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)
  assert mode(tmp_path / 'summary.json') == mode(tmp_path / 'plain.json') == 0o644
  assert [p.name for p in tmp_path.iterdir() if p.name.endswith('.tmp')] == []


def test_atomic_dir_is_complete_or_absent(tmp_path):
  out = tmp_path / 'model'
  with pytest.raises(RuntimeError):
    with storage.atomic_dir(out) as tmp:
      (tmp / 'a').write_text('half')
      raise RuntimeError('fails mid-write')
  assert list(tmp_path.iterdir()) == []  # no output, no temporary directory
  with storage.atomic_dir(out) as tmp:
    (tmp / 'a').write_text('one')
  with pytest.raises(RuntimeError):
    with storage.atomic_dir(out, replace=True) as tmp:
      (tmp / 'a').write_text('two')
      raise RuntimeError('fails before the swap')
  assert (out / 'a').read_text() == 'one' and [p.name for p in tmp_path.iterdir()] == ['model']
  with storage.atomic_dir(out, replace=True) as tmp:
    (tmp / 'a').write_text('two')
  assert (out / 'a').read_text() == 'two' and [p.name for p in tmp_path.iterdir()] == ['model']
