"""One run per workdir: a lock that every writer of a run directory takes first.

Two runs on one workdir would interleave their ``metrics.jsonl`` records and race on the
checkpoints, so ``python -m peftjax.main`` (through ``train.train_and_evaluate``) and
``python -m peftjax.compress.deep`` take this lock before they write anything, and a second
run is refused in one line naming the holder (its pid, host, start time and command).

* **Local directories**: ``<workdir>/run.lock``, held with ``fcntl.flock`` for the life of the
  run. The kernel releases it when the holder's process ends however it ends (SIGKILL, the OOM
  killer, a crash), so a dead run never blocks the next one. The file holds the holder's
  details while it runs and is emptied on release (removed, with the directory, when the lock
  created the directory and nothing else was written). Deleting it is safe when no run is going.
* **Object stores** (``gs://...``) have no locks: there, ``run.lock`` is a *lease*, an object
  with the holder's details and a heartbeat time that a background thread refreshes every
  ``HEARTBEAT_SECONDS``. A run is refused while the lease's heartbeat is younger than
  ``LEASE_SECONDS``; a holder that died without releasing it blocks the workdir for at most that
  long (the message says how old the heartbeat is; deleting the object ends it at once). The
  lease is read back after it is written, which catches most simultaneous starts, but without a
  compare-and-swap two runs that start within the same moment on one prefix can both proceed.
* **Multi-process runs** (``jax.distributed``) are one program: only process 0 takes the lock
  (``train.py``), and every process learns whether it got it.

>>> with WorkdirLock('/tmp/run'):   # doctest: +SKIP
...   ...                            # nobody else writes /tmp/run meanwhile
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from peftjax import storage
from peftjax.errors import UserInputError

LOCK_NAME = 'run.lock'
LEASE_SECONDS = 300.0
HEARTBEAT_SECONDS = 30.0


class WorkdirBusyError(UserInputError):
  """Another run holds the workdir."""


def _now_iso(t: float | None = None) -> str:
  t = time.time() if t is None else t
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
      '%Y-%m-%d %H:%M:%S UTC')


def _command() -> str:
  """How this process was started, e.g. ``python -m peftjax.main --config=... --workdir=...``."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  head = ['python', '-m', spec.name] if spec is not None and spec.name else ['python', *sys.argv[:1]]
  text = ' '.join([*head, *sys.argv[1:]])
  return text if len(text) <= 200 else text[:197] + '...'


def _describe(workdir, info: dict | None, extra: str = '', reading: bool = False) -> str:
  if info:
    who = (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
           f"{info.get('started', '?')}{extra} ({info.get('purpose', 'a run')}: "
           f"{info.get('command', '?')})")
  else:
    who = 'another process (its details are not written yet)'
  if reading:
    return (f'workdir {workdir} is being written by {who}; its checkpoints are not final until '
            'that run ends: wait for it to finish or stop it')
  return (f'workdir {workdir} is in use by {who}; two runs on one workdir would interleave '
          'their metrics and checkpoints: wait for it to finish or stop it, or choose another '
          '--workdir')


class WorkdirLock:
  """The lock on ``workdir`` (see the module docstring); a context manager.

  ``purpose`` names the holder in the refusal another run prints (e.g. ``'training'``).
  """

  def __init__(self, workdir, *, purpose: str = 'training'):
    self.workdir = storage.path(workdir)
    self.path = self.workdir / LOCK_NAME
    self.purpose = purpose
    self.remote = storage.is_remote(self.workdir)
    self._fd: int | None = None
    self._created_dir = False
    self._token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def info(self) -> dict:
    return {'pid': os.getpid(), 'host': socket.gethostname(), 'started': _now_iso(),
            'purpose': self.purpose, 'command': _command(), 'token': self._token}

  # -------------------------------------------------------------------------- local: flock
  def _acquire_local(self) -> None:
    import fcntl  # pylint: disable=g-import-not-at-top
    local = str(self.path)
    self._created_dir = not self.workdir.exists()
    self.workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(50):
      fd = os.open(local, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        if attempt < 4:  # a concurrent check() holds it shared for an instant
          time.sleep(0.05)
          continue
        self._forget_created_dir()
        raise WorkdirBusyError(_describe(self.workdir, _read_info(local))) from None
      # The file may have been removed (by a holder's release) between open and flock: then
      # this lock guards nothing; start over on the current file.
      try:
        same = os.fstat(fd).st_ino == os.stat(local).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      os.ftruncate(fd, 0)
      os.write(fd, (json.dumps(self.info()) + '\n').encode())
      os.fsync(fd)
      self._fd = fd
      return
    raise WorkdirBusyError(_describe(self.workdir, None))

  def _forget_created_dir(self) -> None:
    if self._created_dir:
      try:
        os.rmdir(str(self.workdir))
      except OSError:
        pass

  def _release_local(self) -> None:
    fd, self._fd = self._fd, None
    try:
      if self._created_dir and os.listdir(str(self.workdir)) == [LOCK_NAME]:
        os.unlink(str(self.path))  # nothing else was written: leave no trace of this run
        self._forget_created_dir()
      else:
        os.ftruncate(fd, 0)  # the holder's details go with the holder
    except OSError:
      pass
    finally:
      os.close(fd)  # releases the lock

  # -------------------------------------------------------------------------- remote: lease
  def _acquire_remote(self) -> None:
    busy = _lease_holder(self.path)
    if busy is not None:
      raise WorkdirBusyError(busy)
    self._write_lease()
    time.sleep(0.5)  # a run that wrote its lease in the same moment: the last write wins
    got = _read_lease(self.path)
    if got is None or got.get('token') != self._token:
      raise WorkdirBusyError(_describe(self.workdir, got))
    self._thread = threading.Thread(target=self._heartbeat, name='peftjax-lease', daemon=True)
    self._thread.start()

  def _write_lease(self) -> None:
    info = dict(self._lease_info, heartbeat=time.time())
    storage.write_json_atomic(self.path, info)

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        self._write_lease()
      except Exception:  # pylint: disable=broad-except
        pass  # a transient bucket error; the next beat retries

  def _release_remote(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    try:
      got = _read_lease(self.path)
      if got is not None and got.get('token') == self._token:
        self.path.unlink()
    except Exception:  # pylint: disable=broad-except
      pass

  # -------------------------------------------------------------------------- public
  def acquire(self) -> 'WorkdirLock':
    """Takes the lock or raises :class:`WorkdirBusyError` naming the holder."""
    if self.remote:
      self._lease_info = self.info()
      self._acquire_remote()
    else:
      self._acquire_local()
    return self

  @property
  def held(self) -> bool:
    return self._fd is not None or (self._thread is not None and not self._stop.is_set())

  def release(self) -> None:
    if self.remote:
      if self._thread is not None:
        self._release_remote()
        self._thread = None
    elif self._fd is not None:
      self._release_local()

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _read_info(local: str) -> dict | None:
  try:
    with open(local) as f:
      text = f.read().strip()
    return json.loads(text) if text else None
  except (OSError, ValueError):
    return None


def _read_lease(path) -> dict | None:
  try:
    return json.loads(path.read_text()) if path.exists() else None
  except (OSError, ValueError):
    return None


def _lease_holder(path, reading: bool = False) -> str | None:
  """The refusal for a live lease at ``path``; None when there is none or it has expired."""
  got = _read_lease(path)
  if got is None:
    return None
  age = time.time() - float(got.get('heartbeat', 0))
  if age >= LEASE_SECONDS:
    return None
  left = LEASE_SECONDS - age
  return _describe(path.parent, got, reading=reading,
                   extra=f', last heartbeat {age:.0f} s ago (the lease lapses in {left:.0f} s '
                         'if that run has stopped)')


def check(workdir, *, reading: bool = False) -> None:
  """Raises :class:`WorkdirBusyError` when another run holds ``workdir``; creates nothing.

  A cheap early refusal, before a run spends time building its model; the lock itself is taken
  (:class:`WorkdirLock`) just before the first write. ``reading``: the caller only reads the
  finished run (e.g. ``run.restore_trained``), and the message says so."""
  wd = storage.path(workdir)
  if storage.is_remote(wd):
    busy = _lease_holder(wd / LOCK_NAME, reading)
    if busy is not None:
      raise WorkdirBusyError(busy)
    return
  local = str(wd / LOCK_NAME)
  import fcntl  # pylint: disable=g-import-not-at-top
  try:
    fd = os.open(local, os.O_RDONLY)
  except OSError:
    return  # no lock file (or unreadable: the real acquire reports what is wrong)
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
  except BlockingIOError:
    raise WorkdirBusyError(_describe(wd, _read_info(local), reading=reading)) from None
  finally:
    os.close(fd)
