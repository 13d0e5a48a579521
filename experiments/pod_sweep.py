"""Sweeps on TPU pods: plan a config's sweep over several slices; collect the table from all runs.

  python -m experiments.pod_sweep plan --config=configs/tiny.py --workdir=gs://bucket/sweeps/tiny \\
      --slices=tpu-a,tpu-b [--format=shell|json] [-- extra peftjax.main flags]
  python -m experiments.pod_sweep collect --config=configs/tiny.py --workdir=gs://bucket/sweeps/tiny
  python -m experiments.pod_sweep check --config=configs/tiny.py -- --config.peft.lora.rank=8  # run.sh

``tpu/sweep.sh`` consumes ``plan --format=shell``: one line per slice, ``<slice><TAB><script>``,
where ``<script>`` is a one-line shell script that runs that slice's runs one after the other
(every worker of the slice runs the same script, so every worker starts the same
``peftjax.main`` command). The sweep itself comes from :func:`experiments.sweep.expand`; each
run gets its own workdir ``<root>/<run_name>``, a local path or a ``gs://`` prefix. Run ``i``
goes to slice ``i mod len(slices)``, so the same command with the same slices always sends a
run to the same slice (a run's local checkpoints are found again). Runs whose ``summary.json``
exists are left out; an unfinished run resumes from the checkpoints in its workdir; so after a
preemption the same command finishes the sweep.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any

from experiments import sweep
from peftjax import errors

REMOTE_PYTHON = '.venv/bin/python'  # relative to the repository directory on each worker
# Per-worker persistent XLA cache, in the remote checkout (the runs' working directory): runs of a
# sweep that differ only in seed or data compile once.
REMOTE_CACHE = '.jax_cache'
_SLICE = re.compile(r'^[a-z]([-a-z0-9]*[a-z0-9])?$')  # a TPU name, as gcloud accepts it


def is_gcs(path: str) -> bool:
  """Whether ``path`` is a Cloud Storage URL (``gs://bucket/prefix``)."""
  return str(path).startswith('gs://')


def join(root: str, name: str) -> str:
  """``root/name`` for a local path or a ``gs://`` prefix (pathlib would turn gs:// into gs:/).

  >>> join('gs://bucket/sweeps/', 'seed=0')
  'gs://bucket/sweeps/seed=0'
  """
  return f"{str(root).rstrip('/')}/{name}"


def repo_config(config_path: str) -> str:
  """``config_path`` relative to the repository root (what the workers' checkout sees).

  >>> repo_config('configs/tiny.py')  # doctest: +SKIP
  'configs/tiny.py'
  """
  path = os.path.abspath(config_path)
  if not os.path.isfile(path):
    path = os.path.join(sweep.ROOT, config_path)  # already relative to the repository
  if not os.path.isfile(path):
    raise SystemExit(f'error: --config={config_path!r}: no such file')
  rel = os.path.relpath(os.path.realpath(path), os.path.realpath(sweep.ROOT))
  if rel.startswith('..'):
    raise SystemExit(f'error: --config={config_path!r} is outside the repository {sweep.ROOT}; '
                     'the workers run a copy of the repository, so the config must live in it '
                     '(e.g. configs/tiny.py)')
  return rel


def plan(config_path: str, workdir_root: str, slices: list[str], arg: str | None = None,
         extra=(), python: str = REMOTE_PYTHON) -> list[dict[str, Any]]:
  """One entry per sweep run: ``{'slice', 'run', 'workdir', 'overrides', 'command'}``.

  Pure (it reads only the config file): finished runs are still listed; see :func:`finished`.
  ``command`` is the worker's argv, with ``config_path`` relative to the repository.

  >>> [(p['slice'], p['workdir']) for p in plan('configs/tiny.py', 'gs://b/s', ['a', 'b'])][:2]
  ... # doctest: +SKIP
  [('a', 'gs://b/s/peft.lora.rank=2,peft.method=lora,seed=0'),
   ('b', 'gs://b/s/peft.lora.rank=2,peft.method=lora,seed=1')]
  """
  slices = list(slices)
  if not slices:
    raise SystemExit('error: --slices is empty; give one or more TPU names, e.g. --slices=tpu-a,tpu-b')
  for s in slices:
    if not _SLICE.match(s):
      raise SystemExit(f'error: --slices: {s!r} is not a TPU name (lowercase letters, digits and '
                       "'-', starting with a letter)")
  if len(set(slices)) != len(slices):
    raise SystemExit(f'error: --slices={",".join(slices)} names a slice twice')
  if not str(workdir_root):
    raise SystemExit('error: --workdir is empty; give a directory or a gs://bucket/prefix')
  rel = repo_config(config_path)
  config_arg = f'{rel}:{arg}' if arg else rel
  runs = sweep.expand(config_path, arg)
  # Every run's overrides and the flags passed to all of them, checked here once (as
  # experiments.sweep does) rather than failing on every worker.
  local = str(sweep.ROOT / rel)
  sweep.check_runs(f'{local}:{arg}' if arg else local, runs, ('--multihost=true', *extra))
  out = []
  for i, overrides in enumerate(runs):
    name = sweep.run_name(overrides)
    workdir = join(workdir_root, name)
    # --multihost=true: the slice's workers form one jax.distributed program.
    cmd = sweep.command(config_arg, workdir, overrides, ('--multihost=true', *extra))
    out.append({'slice': slices[i % len(slices)], 'run': name, 'workdir': workdir,
                'overrides': overrides, 'command': [python, *cmd[1:]]})
  return out


def check(config_spec: str, flags=()) -> None:
  """One run's ``--config`` and flags (what ``tpu/run.sh`` sends to every worker), parsed and
  validated here as ``peftjax.main`` will parse them; a problem is one line naming the flag."""
  from peftjax import validate  # pylint: disable=g-import-not-at-top
  validate.validate(sweep.parse_run(sweep.load_config(config_spec), list(flags)))


# ---------------------------------------------------------------- reading local and gs:// runs

def _gcs_backend() -> str:
  """How gs:// paths are read here: 'tf' (tf.io.gfile), 'epath' (etils + gcsfs) or 'gcloud'."""
  if importlib.util.find_spec('tensorflow') is not None:
    return 'tf'
  if importlib.util.find_spec('gcsfs') is not None and importlib.util.find_spec('etils'):
    return 'epath'
  if shutil.which('gcloud'):
    return 'gcloud'
  raise SystemExit('error: reading gs:// workdirs needs tensorflow (tf.io.gfile), gcsfs '
                   '(pip install gcsfs; used by etils.epath) or the gcloud CLI; none is installed')


def _gcloud(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(['gcloud', 'storage', *args], capture_output=True, text=True, check=False)


def _no_match(stderr: str) -> bool:
  """Whether gcloud storage failed only because the URL matched nothing."""
  return 'matched no objects' in stderr or 'No URLs matched' in stderr


def _gcloud_failed(what: str, r: subprocess.CompletedProcess) -> SystemExit:
  """gcloud's (multi-line) complaint as one line, with the fix for a missing login."""
  lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
  reason = lines[0] if lines else f'exit status {r.returncode}'
  if 'auth login' in r.stderr or 'credential' in r.stderr.lower():
    reason += " (run 'gcloud auth login', or give a local --workdir)"
  return SystemExit(f'error: {what} failed: {reason}')


def read_text(path: str) -> str | None:
  """The text of a local or gs:// file, or None if it does not exist."""
  if not is_gcs(path):
    return pathlib.Path(path).read_text() if os.path.isfile(path) else None
  backend = _gcs_backend()
  if backend == 'tf':
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    return tf.io.gfile.GFile(path).read() if tf.io.gfile.exists(path) else None
  if backend == 'epath':
    from etils import epath  # pylint: disable=g-import-not-at-top
    p = epath.Path(path)
    return p.read_text() if p.exists() else None
  r = _gcloud('cat', path)
  if r.returncode == 0:
    return r.stdout
  if _no_match(r.stderr):
    return None
  raise _gcloud_failed(f'gcloud storage cat {path}', r)


def finished(workdir_root: str, names: list[str]) -> set[str]:
  """The run names among ``names`` whose ``<root>/<name>/summary.json`` exists."""
  if is_gcs(workdir_root) and _gcs_backend() == 'gcloud':  # one listing, not one call per run
    r = _gcloud('ls', join(workdir_root, '*/summary.json'))
    if r.returncode and not _no_match(r.stderr):
      raise _gcloud_failed(f'gcloud storage ls {workdir_root}', r)
    found = {line.strip() for line in r.stdout.splitlines()}
    return {n for n in names if join(join(workdir_root, n), 'summary.json') in found}
  if is_gcs(workdir_root):
    return {n for n in names
            if read_text(join(join(workdir_root, n), 'summary.json')) is not None}
  return {n for n in names if os.path.isfile(os.path.join(workdir_root, n, 'summary.json'))}


def collect(config_path: str, workdir_root: str, arg: str | None = None
            ) -> tuple[list[dict], list[str]]:
  """``(records of the finished runs, names of the unfinished ones)``, records as in
  :func:`experiments.sweep.collect`, in sweep order."""
  runs = sweep.expand(config_path, arg)
  names = [sweep.run_name(r) for r in runs]
  done = finished(workdir_root, names)
  if is_gcs(workdir_root):
    records = []
    for r, name in zip(runs, names):
      if name in done:
        s = json.loads(read_text(join(join(workdir_root, name), 'summary.json')))
        records.append({'run': name, 'overrides': r, **{c: s.get(c) for c in sweep.COLUMNS}})
  else:
    records = [rec for rec in sweep.collect(workdir_root, runs) if rec['run'] in done]
  return records, [n for n in names if n not in done]


# ---------------------------------------------------------------- the per-slice shell script

def _finished_test(workdir: str) -> str:
  """A shell test, run on a worker, that is true when ``workdir`` holds a finished run."""
  summary = shlex.quote(join(workdir, 'summary.json'))
  return (f'gcloud storage ls {summary} >/dev/null 2>&1' if is_gcs(workdir)
          else f'test -e {summary}')


def slice_script(entries: list[dict]) -> str:
  """One line of shell that runs ``entries`` one after the other, each logging to logs/<run>.log.

  A run finished in the meantime is skipped; a failed run is reported and the next one starts.
  Run names are shell-safe (:func:`experiments.sweep.run_name`), so messages need no escaping.

  >>> slice_script(plan('configs/tiny.py', '/tmp/s', ['a'])[:1])  # doctest: +SKIP
  'echo "sweep: 1 runs to do"; if test -e /tmp/s/peft.method=lora,.../summary.json; then ...'
  """
  parts = [f'echo "sweep: {len(entries)} runs to do"']
  for e in entries:
    name, log = e['run'], f'logs/{e["run"]}.log'
    parts.append(
        f'if {_finished_test(e["workdir"])}; then echo "sweep: skip {name} (finished)"; '
        f'else echo "sweep: start {name}"; {shlex.join(e["command"])} > {shlex.quote(log)} 2>&1 '
        f'&& echo "sweep: done {name}" || echo "sweep: FAILED {name} (exit $?, see {log})"; fi')
  parts.append('echo "sweep: all runs of this slice ended"')
  return '; '.join(parts)


def _parse_config(value: str) -> tuple[str, str | None]:
  path, _, arg = value.partition(':')
  return path, (arg or None)


def main(argv=None):
  p = argparse.ArgumentParser(prog='python -m experiments.pod_sweep',
                              description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='cmd', required=True)
  pp = sub.add_parser('plan', help="assign a sweep's runs to slices")
  pp.add_argument('--config', required=True, help='config file defining sweep(), optionally path:arg')
  pp.add_argument('--workdir', required=True, help='sweep root: a directory or gs://bucket/prefix')
  pp.add_argument('--slices', required=True, help='comma-separated TPU names')
  pp.add_argument('--format', default='shell', choices=('shell', 'json'),
                  help="shell: '<slice>\\t<script>' per slice with work to do; json: the whole plan")
  pp.add_argument('--python', default=REMOTE_PYTHON, help="the workers' python")
  pp.add_argument('--if_unreadable', default='fail', choices=('fail', 'plan_all'),
                  help='when the workdir cannot be read here (no gs:// reader, no credentials): '
                  'fail, or plan every run with a note (tpu/sweep.sh --dry-run; each worker '
                  'still skips a finished run)')
  pk = sub.add_parser('check', help="one run's config and flags, checked as peftjax.main will "
                      '(tpu/run.sh, before starting it on every worker)')
  pk.add_argument('--config', required=True, help='config file, optionally path:arg')
  pc = sub.add_parser('collect', help='the results table of all runs')
  pc.add_argument('--config', required=True)
  pc.add_argument('--workdir', required=True)
  pc.add_argument('--out', default=None, help='write results.md and results.json here '
                  '(default: the workdir when it is local; gs:// roots print only)')
  args, extra = p.parse_known_args(argv)
  extra = [a for a in extra if a != '--']
  path, arg = _parse_config(args.config)

  if args.cmd == 'check':
    check(args.config, extra)
    return None

  if args.cmd == 'collect':
    if extra:
      p.error(f'collect: unexpected arguments {extra}')
    records, unfinished = collect(path, args.workdir, arg)
    md = sweep.table(records)
    print(md)
    out = args.out or (args.workdir if os.path.isdir(args.workdir) else None)  # never gs://
    if out:
      os.makedirs(out, exist_ok=True)
      with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write(md + '\n')
      with open(os.path.join(out, 'results.json'), 'w') as f:
        f.write(json.dumps(records, indent=2) + '\n')
    print(f'{len(records)} finished, {len(unfinished)} unfinished'
          + (f': {", ".join(unfinished)}' if unfinished else ''), file=sys.stderr)
    return records, unfinished

  if not any(a.startswith('--compilation_cache') for a in extra):
    extra = [*extra, f'--compilation_cache={REMOTE_CACHE}']
  entries = plan(path, args.workdir, [s for s in args.slices.split(',') if s], arg, extra,
                 args.python)
  try:
    done = finished(args.workdir, [e['run'] for e in entries])
  except (SystemExit, Exception) as e:  # pylint: disable=broad-except
    reason = ' '.join(str(e).split()).removeprefix('error: ') or type(e).__name__
    if args.if_unreadable == 'fail':
      if isinstance(e, SystemExit):
        raise
      raise SystemExit(f'error: cannot read {args.workdir}: {type(e).__name__}: {reason}') from e
    print(f'note: cannot tell here which runs in {args.workdir} are finished ({reason}); the plan '
          'lists every run, and each worker skips a run whose summary.json exists before '
          'starting it', file=sys.stderr)
    done = set()
  for e in entries:
    e['finished'] = e['run'] in done
  if args.format == 'json':
    print(json.dumps(entries, indent=2))
    return entries
  for s in dict.fromkeys(e['slice'] for e in entries):
    mine = [e for e in entries if e['slice'] == s]
    todo = [e for e in mine if not e['finished']]
    print(f'{s}: {len(mine)} runs, {len(mine) - len(todo)} finished (skipped), {len(todo)} to run',
          file=sys.stderr)
    if todo:
      print(f'{s}\t{slice_script(todo)}')
  return entries


if __name__ == '__main__':
  errors.guard(main)()  # a known failure is one line; SystemExit messages pass as they are
