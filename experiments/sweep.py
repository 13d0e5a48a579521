"""Sweeps: expand a config file's ``sweep(add, arg)`` into runs, run them, collect one table.

  python -m experiments.sweep --config=configs/quickstart.py --workdir=/tmp/sweep --parallel=2

A config file may define ``sweep(add, arg)`` next to ``get_config(arg)``; each ``add(**overrides)``
call registers one run (overrides use dotted keys: ``add(**{'peft.rank': 4})``). :func:`expand`
is a pure function from the config file to the list of override dicts, so a pod launcher can
fan out the same list. Runs are ``python -m peftjax.main`` processes, one directory each;
a run whose ``summary.json`` exists is skipped, so an interrupted sweep resumes (unfinished
runs resume from their own checkpoints). At the end every summary is collected into
``results.md`` and ``results.json`` in the sweep's workdir.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import re
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLUMNS = ('accuracy_after', 'nll_after', 'ece_after', 'trainable_params', 'trainable_fraction',
           'train_seconds')


def _load(config_path: str):
  path = pathlib.Path(config_path)
  if not path.is_file():
    raise SystemExit(f'error: --config={config_path!r}: no such file')
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # config files import `configs.common`
  spec = importlib.util.spec_from_file_location(f'_sweep_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def expand(config_path: str, arg: str | None = None) -> list[dict[str, Any]]:
  """The override dicts of ``sweep(add, arg)`` in ``config_path``, in the order they were added.

  >>> expand('configs/quickstart.py')[:1]  # doctest: +SKIP
  [{'peft.rank': 4, 'optim.learning_rate': 0.0005}]
  """
  module = _load(config_path)
  if not hasattr(module, 'sweep'):
    raise SystemExit(f'error: {config_path} defines no sweep(add, arg)')
  runs: list[dict] = []
  module.sweep(lambda **overrides: runs.append(dict(overrides)), arg)
  if not runs:
    raise SystemExit(f'error: sweep() in {config_path} added no runs')
  seen = set()
  for r in runs:
    key = run_name(r)
    if key in seen:
      raise SystemExit(f'error: sweep() in {config_path} adds the same run twice: {r}')
    seen.add(key)
  return runs


def run_name(overrides: dict) -> str:
  """A readable, filesystem-safe directory name for one run, e.g. ``peft.rank=4,seed=1``."""
  parts = [f'{k}={v}' for k, v in sorted(overrides.items())]
  return re.sub(r'[^A-Za-z0-9_.,=+-]', '_', ','.join(parts)) or 'default'


def apply_overrides(config, overrides: dict):
  """Sets dotted keys on a config in place, as the sweep's command-line flags do; returns it.

  >>> apply_overrides(common.get_config(), {'peft.rank': 4}).peft.rank  # doctest: +SKIP
  4
  """
  config.update_from_flattened_dict(overrides)
  return config


def seed_runs(workdir: str, overrides: dict, seeds) -> list[tuple[dict, pathlib.Path]]:
  """``(summary, run dir)`` of each finished run of ``overrides`` over ``seeds``, in seed order."""
  out = []
  for seed in seeds:
    run_dir = pathlib.Path(workdir) / run_name({**overrides, 'seed': seed})
    if (run_dir / 'summary.json').exists():
      out.append((json.loads((run_dir / 'summary.json').read_text()), run_dir))
  return out


def command(config_path: str, workdir: pathlib.Path, overrides: dict, extra=()) -> list[str]:
  """The ``peftjax.main`` command line of one run."""
  # Strings go in bare: config_flags parses a string field's flag value as the string itself.
  flags = [f'--config.{k}={v}' for k, v in overrides.items()]
  return [sys.executable, '-m', 'peftjax.main', f'--config={config_path}',
          f'--workdir={workdir}', *flags, '--config.train.progress=False', *extra]


def run_all(config_path: str, workdir: str, runs: list[dict], *, parallel: int = 1,
            extra=(), log=print) -> list[dict]:
  """Runs what is not finished yet (``parallel`` at a time); returns one record per run."""
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  todo = [r for r in runs if not (root / run_name(r) / 'summary.json').exists()]
  log(f'{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run')
  running: list[tuple[subprocess.Popen, dict, Any]] = []
  failed = []
  while todo or running:
    while todo and len(running) < parallel:
      r = todo.pop(0)
      wd = root / run_name(r)
      wd.mkdir(parents=True, exist_ok=True)
      out = open(wd / 'sweep.log', 'a')
      running.append((subprocess.Popen(command(config_path, wd, r, extra), cwd=ROOT,
                                       stdout=out, stderr=subprocess.STDOUT), r, out))
      log(f'started {run_name(r)}')
    for item in list(running):
      proc, r, out = item
      if proc.poll() is not None:
        out.close()
        running.remove(item)
        status = 'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'
        if proc.returncode:
          failed.append(r)
        log(f'{status}: {run_name(r)} (log: {root / run_name(r) / "sweep.log"})')
    time.sleep(0.2)
  return collect(workdir, runs)


def collect(workdir: str, runs: list[dict]) -> list[dict]:
  """One record per run: its overrides and its summary's headline numbers (None if missing)."""
  records = []
  for r in runs:
    path = pathlib.Path(workdir) / run_name(r) / 'summary.json'
    s = json.loads(path.read_text()) if path.exists() else {}
    records.append({'run': run_name(r), 'overrides': r, **{c: s.get(c) for c in COLUMNS}})
  return records


def table(records: list[dict]) -> str:
  """A markdown table of the records."""
  keys = sorted({k for r in records for k in r['overrides']})
  head = [*keys, *COLUMNS]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  fmt = lambda v: '—' if v is None else (f'{v:.4g}' if isinstance(v, float) else str(v))
  for r in records:
    cells = [fmt(r['overrides'].get(k)) for k in keys] + [fmt(r[c]) for c in COLUMNS]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True, help='config file, optionally path:arg')
  p.add_argument('--workdir', required=True, help='one subdirectory per run goes here')
  p.add_argument('--parallel', type=int, default=1, help='runs at a time')
  p.add_argument('--dry_run', action='store_true', help='print the runs and commands only')
  p.add_argument('--compilation_cache', default=None,
                 help="persistent XLA cache shared by the runs (default <workdir>/.jax_cache; "
                      "'' = off): runs differing only in seed compile once")
  args, extra = p.parse_known_args(argv)
  cache = (str(pathlib.Path(args.workdir).absolute() / '.jax_cache')
           if args.compilation_cache is None else args.compilation_cache)
  if cache:
    extra = [*extra, f'--compilation_cache={cache}']
  if args.parallel < 1:
    p.error(f'--parallel={args.parallel}; valid: >= 1')
  path, _, arg = args.config.partition(':')
  runs = expand(path, arg or None)
  if args.dry_run:
    for r in runs:
      print(' '.join(command(path, pathlib.Path(args.workdir) / run_name(r), r, extra)))
    return runs
  records = run_all(path, args.workdir, runs, parallel=args.parallel, extra=extra)
  md = table(records)
  (pathlib.Path(args.workdir) / 'results.md').write_text(md + '\n')
  (pathlib.Path(args.workdir) / 'results.json').write_text(json.dumps(records, indent=2) + '\n')
  print(md)
  missing = [r['run'] for r in records if r['accuracy_after'] is None]
  if missing:
    raise SystemExit(f'error: {len(missing)} runs did not finish: {missing[:3]}')
  return records


if __name__ == '__main__':
  main()
