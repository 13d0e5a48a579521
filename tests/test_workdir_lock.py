"""One run per workdir: the lock (peftjax/workdir_lock.py) in process, a bucket lease, and
through the real entry points (a concurrent run refused, a SIGKILL'd holder not blocking)."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from peftjax import workdir_lock
from peftjax.workdir_lock import WorkdirBusyError, WorkdirLock

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config=configs/tiny.py']


def _env():
  return {**os.environ, 'JAX_PLATFORMS': 'cpu'}


def _one_line(err: str, prefix: str = 'error: ') -> str:
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(prefix), err[-3000:]
  return lines[0]


def _holder(wd):
  """A process (no jax: cheap) holding the lock on ``wd`` until it is killed."""
  code = ('import sys, time; from peftjax.workdir_lock import WorkdirLock; '
          f'WorkdirLock({str(wd)!r}, purpose="holder").acquire(); print("locked", flush=True); '
          'time.sleep(600)')
  p = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                       env=_env())
  assert p.stdout.readline().strip() == 'locked'
  return p


def test_a_second_holder_is_refused_with_the_first_ones_details(tmp_path):
  wd = tmp_path / 'run'
  with WorkdirLock(wd, purpose='training'):
    info = json.loads((wd / 'run.lock').read_text())
    assert info['pid'] == os.getpid() and info['host'] == socket.gethostname()
    with pytest.raises(WorkdirBusyError) as e:
      WorkdirLock(wd).acquire()
    msg = str(e.value)
    assert msg.startswith(f'workdir {wd} is in use by pid {os.getpid()} on host '
                          f'{socket.gethostname()}, started {info["started"]} (training: ')
    assert 'choose another --workdir' in msg and '\n' not in msg
    with pytest.raises(WorkdirBusyError):
      workdir_lock.check(wd)  # the early check, which creates nothing
    (wd / 'metrics.jsonl').write_text('')
  assert (wd / 'run.lock').read_text() == ''  # released: the holder's details went with it
  workdir_lock.check(wd)
  with WorkdirLock(wd):
    pass


def test_a_lock_that_created_the_workdir_leaves_nothing_when_nothing_was_written(tmp_path):
  wd = tmp_path / 'new' / 'run'
  with WorkdirLock(wd):
    assert (wd / 'run.lock').exists()
  assert not wd.exists()
  workdir_lock.check(tmp_path / 'missing')  # no lock file: free


def test_a_sigkilled_holder_does_not_block_the_next_run(tmp_path):
  wd = tmp_path / 'run'
  p = _holder(wd)
  with pytest.raises(WorkdirBusyError, match=f'in use by pid {p.pid} on host'):
    WorkdirLock(wd).acquire()
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert json.loads((wd / 'run.lock').read_text())['pid'] == p.pid  # stale details, no lock
  with WorkdirLock(wd):  # the kernel released the dead holder's flock
    pass


def test_a_bucket_workdir_uses_a_lease(tmp_path, monkeypatch):
  from fake_gcs import fake_gcs
  with fake_gcs(tmp_path / 'gcs'):
    lease = tmp_path / 'gcs/b/run/run.lock'
    first = WorkdirLock('gs://b/run').acquire()
    assert json.loads(lease.read_text())['pid'] == os.getpid()
    with pytest.raises(WorkdirBusyError, match=f'workdir gs://b/run is in use by pid {os.getpid()} '
                                               r'.*, last heartbeat \d+ s ago'):
      WorkdirLock('gs://b/run').acquire()
    first.release()
    assert not lease.exists()
    # A holder that died: its heartbeat stops, and once the lease lapses the next run proceeds.
    stale = {'pid': 1, 'host': 'gone', 'started': '-', 'token': 'x',
             'heartbeat': time.time() - workdir_lock.LEASE_SECONDS - 1}
    lease.write_text(json.dumps(stale))
    workdir_lock.check('gs://b/run')
    with WorkdirLock('gs://b/run'):
      assert json.loads(lease.read_text())['pid'] == os.getpid()
    assert not lease.exists()


def test_a_concurrent_run_is_refused_and_a_killed_run_does_not_block(tmp_path):
  """Run A holds the workdir (paused with SIGSTOP after its first checkpoint, so that it is
  mid-run whatever the machine's speed); run B, the same command, is refused in one line naming
  A and writes nothing; A is SIGKILLed; run C resumes A's checkpoint and finishes, with one log
  record per step."""
  wd = tmp_path / 'run'
  a = subprocess.Popen([sys.executable, '-m', 'peftjax.main', *TINY, f'--workdir={wd}'],
                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env=_env())
  deadline = time.time() + 300
  while not (wd / 'checkpoints' / '2').exists() and a.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  a.send_signal(signal.SIGSTOP)
  try:
    info = json.loads((wd / 'run.lock').read_text())
    assert info['pid'] == a.pid and info['purpose'] == 'training'
    before = {p.name: p.stat().st_mtime_ns for p in wd.iterdir()}
    b = subprocess.run([sys.executable, '-m', 'peftjax.main', *TINY, f'--workdir={wd}'],
                       cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=300)
    assert b.returncode == 1
    line = _one_line(b.stderr)
    assert line.startswith(f'error: workdir {wd} is in use by pid {a.pid} on host '
                           f'{socket.gethostname()}, started {info["started"]} (training: '
                           'python -m peftjax.main --config=configs/tiny.py')
    assert {p.name: p.stat().st_mtime_ns for p in wd.iterdir()} == before  # B wrote nothing
  finally:
    a.send_signal(signal.SIGKILL)
    a.communicate()
  c = subprocess.run([sys.executable, '-m', 'peftjax.main', *TINY, f'--workdir={wd}'], cwd=ROOT,
                     capture_output=True, text=True, env=_env(), timeout=600)
  assert c.returncode == 0, c.stderr[-3000:]
  assert 'resumed from checkpoint at step' in c.stdout
  records = [json.loads(l) for l in (wd / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if r['split'] == 'train'] == [2, 4, 6, 8]
  assert [r['step'] for r in records if r['split'] == 'test'] == [8]


def test_deep_compression_takes_the_lock(tmp_path):
  wd = tmp_path / 'dc'
  p = _holder(wd)
  try:
    r = subprocess.run([sys.executable, '-m', 'peftjax.compress.deep',
                        '--config=configs/deep_compression.py', f'--workdir={wd}'], cwd=ROOT,
                       capture_output=True, text=True, env=_env(), timeout=300)
  finally:
    p.kill()
    p.wait()
  assert r.returncode == 1
  line = _one_line(r.stderr)
  assert f'workdir {wd} is in use by pid {p.pid}' in line and '(holder: ' in line
  assert sorted(os.listdir(wd)) == ['run.lock']


def test_restore_trained_refuses_a_workdir_a_run_is_writing(tmp_path):
  from configs import tiny
  from peftjax import run
  wd = tmp_path / 'run'
  with WorkdirLock(wd):
    with pytest.raises(WorkdirBusyError, match='is being written by pid .* its checkpoints are '
                                               'not final until that run ends'):
      run.restore_trained(tiny.get_config(), str(wd))
