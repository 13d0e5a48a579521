"""Multi-process (multi-host) start-up: when to call ``jax.distributed.initialize``, and how.

One JAX program runs per host; they join through a coordinator (process 0) and then see one
global mesh. :func:`settings` decides from the flags and the environment:

* ``--multihost=false``: never (one process);
* ``--multihost=true``: always; with no coordinator given, JAX detects the cluster itself
  (Cloud TPU VM slices, GKE, SLURM, Open MPI);
* ``--multihost=auto`` (default): when a coordinator is given (``--coordinator_address`` or
  ``$JAX_COORDINATOR_ADDRESS``) or the environment names a multi-process cluster (a multi-host
  TPU worker list, a Megascale coordinator, a SLURM or Open MPI job of several tasks).

:func:`initialize` adds what a CPU cluster needs (gloo collectives) and turns a coordinator that
cannot be reached into one clear error after ``timeout`` seconds instead of a hang.

>>> settings('auto', coordinator='10.0.0.2:1234', num_processes=2, process_id=1, environ={})
{'coordinator_address': '10.0.0.2:1234', 'num_processes': 2, 'process_id': 1}
>>> settings('auto', environ={}) is None
True
"""
from __future__ import annotations

import os
import re
import socket
import time
from typing import Mapping

from peftjax.errors import UserInputError

MODES = ('auto', 'true', 'false')


class DistributedError(UserInputError):
  """Multi-process start-up failed: bad flags, or the coordinator could not be reached."""


def _cluster(environ: Mapping[str, str]) -> str | None:
  """The name of a multi-process cluster the environment describes, or None."""
  if ',' in environ.get('TPU_WORKER_HOSTNAMES', ''):
    return 'TPU worker list'
  if environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'Megascale'
  if environ.get('SLURM_JOB_ID') and int(environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'SLURM'
  if int(environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'Open MPI'
  return None


def settings(mode: str, *, coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, environ: Mapping[str, str] | None = None
             ) -> dict | None:
  """Keyword arguments for ``jax.distributed.initialize``, or None for a single process.

  Raises :class:`DistributedError` for an unknown mode, a malformed address, or ids out of
  range.
  """
  environ = os.environ if environ is None else environ
  if mode not in MODES:
    raise DistributedError(f'--multihost={mode!r} is invalid; valid: {", ".join(MODES)}')
  coordinator = coordinator or environ.get('JAX_COORDINATOR_ADDRESS') or None
  if mode == 'false' or (mode == 'auto' and not coordinator and not _cluster(environ)):
    return None
  if coordinator is not None and not re.fullmatch(r'\[?[\w.:-]+\]?:\d{1,5}', coordinator):
    raise DistributedError(f'--coordinator_address={coordinator!r} is invalid; valid: host:port '
                           'of process 0, e.g. 10.0.0.2:1234')
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f'--num_processes={num_processes} is invalid; valid: >= 1')
  if process_id is not None and (process_id < 0 or (num_processes is not None
                                                    and process_id >= num_processes)):
    raise DistributedError(f'--process_id={process_id} is invalid; valid: 0 <= process_id < '
                           f'num_processes ({num_processes})')
  out = {'coordinator_address': coordinator, 'num_processes': num_processes,
         'process_id': process_id}
  return {k: v for k, v in out.items() if v is not None}


def wait_for_coordinator(address: str, timeout: float) -> None:
  """Returns once ``host:port`` accepts TCP connections; a :class:`DistributedError` after
  ``timeout`` seconds. (JAX's own client aborts the whole process when the coordinator never
  answers, so the other processes probe first.)"""
  host, _, port = address.rpartition(':')
  deadline = time.monotonic() + timeout
  last = None
  while time.monotonic() < deadline:
    try:
      with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
        return
    except OSError as e:
      last = e
      time.sleep(0.5)
  raise DistributedError(f'could not reach the coordinator at {address} within {timeout:g} s '
                         f'({last}); check that process 0 is running and the address and port '
                         'are reachable from every host')


def initialize(kwargs: dict, *, timeout: int = 120) -> None:
  """``jax.distributed.initialize(**kwargs)`` with gloo CPU collectives and a bounded wait.

  A coordinator that does not answer within ``timeout`` seconds raises a
  :class:`DistributedError` naming the address, this process and the cause.
  """
  import jax  # pylint: disable=g-import-not-at-top
  # CPU processes exchange gradients through gloo; TPU/GPU use their own interconnect and
  # ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if kwargs.get('process_id', 0) != 0 and 'coordinator_address' in kwargs:
    wait_for_coordinator(kwargs['coordinator_address'], timeout)
  try:
    jax.distributed.initialize(**kwargs, initialization_timeout=timeout)
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError, ValueError, ...)
    where = kwargs.get('coordinator_address', 'the auto-detected coordinator')
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(
        f'multi-process start-up failed: could not join the coordinator at {where} as process '
        f"{kwargs.get('process_id', '?')} of {kwargs.get('num_processes', '?')} within "
        f'{timeout} s ({first}). Check that process 0 is running and the address and port are '
        'reachable from every host') from None
