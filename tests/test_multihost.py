"""Two processes on 127.0.0.1 (gloo collectives, 4 CPU devices each) run one 8-device program
that equals a single-process 8-device run, and whose checkpoint restores in a single process."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from peftjax import delta
from peftjax import tree

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A short run: 4 steps, checkpoints every 2, no evaluation before or during training.
ARGS = ['--config=configs/tiny.py', '--config.train.steps=4', '--config.train.eval_every=0',
        '--config.train.eval_before=False', '--config.train.save_adapter=True']


def _env(devices: int) -> dict:
  return {**os.environ, 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


def _start(args, devices):
  return subprocess.Popen([sys.executable, '-m', 'peftjax.main', *ARGS, *args], cwd=ROOT,
                          env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_and_restore_in_one(tmp_path):
  two, one = tmp_path / 'two', tmp_path / 'one'
  port = _free_port()
  procs = [_start([f'--workdir={two}', f'--coordinator_address=127.0.0.1:{port}',
                   '--num_processes=2', f'--process_id={i}'], devices=4) for i in range(2)]
  outs = [_finish(p) for p in procs]
  # Only process 0 reports (the other prints at most the collectives' own start-up lines).
  assert 'test accuracy after' in outs[0] and 'accuracy' not in outs[1]
  assert (two / 'checkpoints' / '4').is_dir()  # written collectively by both processes
  _finish(_start([f'--workdir={one}'], devices=8))
  summary = lambda wd: json.loads((wd / 'summary.json').read_text())
  # The same global program: parameters equal up to the order of the cross-process sum.
  a, _ = delta.load_delta(two / 'adapter.safetensors')
  b, _ = delta.load_delta(one / 'adapter.safetensors')
  fa, fb = tree.flatten(a), tree.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_allclose(fa[k], fb[k], atol=1e-6, rtol=0, err_msg=k)
  assert abs(summary(two)['test']['loss'] - summary(one)['test']['loss']) < 1e-5
  # The two-process checkpoint restores in one process: a rerun resumes at the last step, and
  # its parameters are bit-identical to what the two processes saved.
  sha = summary(two)['trainable_sha256']
  out = _finish(_start([f'--workdir={two}'], devices=8))
  assert 'resumed from checkpoint at step 4' in out
  assert summary(two)['trainable_sha256'] == sha


def test_unreachable_coordinator_fails_fast_with_a_clear_error(tmp_path):
  port = _free_port()  # nothing listens there
  p = _start([f'--workdir={tmp_path / "w"}', f'--coordinator_address=127.0.0.1:{port}',
              '--num_processes=2', '--process_id=1', '--distributed_timeout=2'], devices=1)
  out, err = p.communicate(timeout=120)
  assert p.returncode != 0
  assert f'could not reach the coordinator at 127.0.0.1:{port} within 2 s' in err
  assert 'Traceback' not in err and not (tmp_path / 'w').exists()


@pytest.mark.parametrize('args,expect', [
    (['--config.mesh.data=3'], "mesh {'data': 3, 'fsdp': 1, 'expert': 1, 'tensor': 1} needs 3 "
                               'devices; 8 are available'),
    (['--config.mesh.fsdp=3'], 'mesh: 8 devices are not divisible by the fixed axes product 3'),
    (['--config.train.batch_size=12'], 'config.train.batch_size=12 is invalid; valid: a multiple '
                                       'of the data-parallel size 8'),
    (['--config.mesh.tensor=2', '--config.mesh.replicated_report_mb=0',
      '--config.mesh.max_replicated_mb=0'],
     'mesh.max_replicated_mb=0.0: '),
])
def test_scale_out_mistakes_fail_before_compute(tmp_path, args, expect):
  p = _start([f'--workdir={tmp_path / "w"}', *args], devices=8)
  out, err = p.communicate(timeout=300)
  assert p.returncode != 0 and expect in err, err[-2000:]
  assert 'Traceback' not in err and not (tmp_path / 'w').exists()


def test_workdir_that_is_not_writable(tmp_path):
  (tmp_path / 'file').write_text('')
  p = _start([f'--workdir={tmp_path / "file" / "run"}'], devices=1)
  out, err = p.communicate(timeout=300)
  assert p.returncode != 0 and 'is not writable' in err and 'is not a directory' in err, err
