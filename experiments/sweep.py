"""Sweeps: expand a config file's ``sweep(add, arg)`` into runs, run them, collect one table.

  python -m experiments.sweep --config=configs/quickstart.py --workdir=/tmp/sweep --parallel=2

A config file may define ``sweep(add, arg)`` next to ``get_config(arg)``; each ``add(**overrides)``
call registers one run (overrides use dotted keys: ``add(**{'peft.lora.rank': 4})``). :func:`expand`
is a pure function from the config file to the list of override dicts, so a pod launcher can
fan out the same list. Runs are ``python -m peftjax.main`` processes, one directory each;
a run whose ``summary.json`` exists is skipped, so an interrupted sweep resumes (unfinished
runs resume from their own checkpoints). At the end every summary is collected into
``results.md`` and ``results.json`` in the sweep's workdir.

Everything is checked once, before any run starts or any directory is created: the config file
(loaded as ``peftjax.main`` loads it), its ``sweep()``, the flags passed through to every run,
and each run's overrides applied to a copy of the locked config and validated
(:func:`check_runs`). A bad one is one line naming the run and the field. Runs that fail later
are listed at the end, each with the last error line of its ``sweep.log``.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import re
import subprocess
import sys
import time
import types
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))  # `peftjax` and `configs` importable when run from elsewhere

from peftjax.errors import UserInputError  # noqa: E402  pylint: disable=g-import-not-at-top

COLUMNS = ('accuracy_after', 'nll_after', 'ece_after', 'trainable_params', 'trainable_fraction',
           'train_seconds')


class SweepError(UserInputError):
  """A sweep that cannot start: the message names the flag, the run or the field."""


def _load(config_path: str):
  """The config file as a module (for its ``sweep``), with one-line errors for a missing file,
  a syntax error or a file that raises while loading."""
  path = pathlib.Path(config_path).expanduser()
  if not path.is_file():
    state = 'is a directory' if path.is_dir() else 'no such file'
    raise SweepError(f'--config={config_path!r}: {state}; valid: a Python config file that '
                     'defines get_config() and sweep(add, arg), e.g. configs/tiny.py')
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # config files import `configs.common`
  try:
    code = compile(path.read_bytes(), str(path), 'exec')
  except SyntaxError as e:
    raise SweepError(f'--config={config_path}: syntax error at line {e.lineno}: {e.msg}') from None
  except ValueError as e:  # null bytes: not a Python file
    raise SweepError(f'--config={config_path}: not a Python file ({e})') from None
  module = types.ModuleType(f'_sweep_config_{path.stem}')
  module.__file__ = str(path)
  try:
    exec(code, module.__dict__)  # pylint: disable=exec-used
  except Exception as e:  # pylint: disable=broad-except
    raise SweepError(f'--config={config_path}: loading the file raised {_oneline(e)}') from None
  return module


def _oneline(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def expand(config_path: str, arg: str | None = None) -> list[dict[str, Any]]:
  """The override dicts of ``sweep(add, arg)`` in ``config_path``, in the order they were added.

  >>> expand('configs/quickstart.py')[:1]  # doctest: +SKIP
  [{'peft.lora.rank': 4, 'optim.learning_rate': 0.0005}]
  """
  module = _load(config_path)
  if not callable(getattr(module, 'sweep', None)):
    raise SweepError(f'--config={config_path}: the file defines no sweep(add, arg); valid: a '
                     'config file with one, e.g. configs/tiny.py')
  runs: list[dict] = []
  try:
    module.sweep(lambda **overrides: runs.append(dict(overrides)), arg)
  except UserInputError as e:
    raise SweepError(f'--config={config_path}{":" + arg if arg else ""}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  (a sweep that cannot read its arg)
    raise SweepError(f'--config={config_path}{":" + arg if arg else ""}: sweep(add, {arg!r}) '
                     f'raised {_oneline(e)}') from None
  if not runs:
    raise SweepError(f'sweep() in {config_path} added no runs')
  seen = set()
  for r in runs:
    key = run_name(r)
    if key in seen:
      raise SweepError(f'sweep() in {config_path} adds the same run twice: {r}')
    seen.add(key)
  return runs


# ---------------------------------------------------------------- checking every run up front

def load_config(spec: str):
  """The locked config of ``spec = 'path[:arg]'``, loaded as ``peftjax.main`` loads it."""
  from peftjax import cli  # pylint: disable=g-import-not-at-top
  return cli.load_config_file(spec)


# Prints peftjax.main's flags (name, kind, bounds, choices) as JSON. Read in a subprocess: the
# flags are defined on absl's global registry when peftjax.main is imported, which would clash
# with another entry point's flags already defined in this process (a test session, a notebook).
_DESCRIBE_MAIN_FLAGS = r"""
import json
from absl import flags
import peftjax.main  # noqa: F401
out = []
for name in flags.FLAGS:
  f = flags.FLAGS[name]
  if f.name != name or name in ('config', 'workdir'):  # aliases; the sweep sets these per run
    continue
  p = f.parser
  out.append({'name': name, 'short_name': f.short_name, 'kind': type(p).__name__,
              'choices': list(getattr(p, 'enum_values', None) or []),
              'lower_bound': getattr(p, 'lower_bound', None),
              'upper_bound': getattr(p, 'upper_bound', None)})
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=1)
def main_flags() -> tuple[dict, ...]:
  """``peftjax.main``'s flags (and absl's) as the runs will parse them, without --config and
  --workdir (which the sweep sets per run)."""
  proc = subprocess.run([sys.executable, '-c', _DESCRIBE_MAIN_FLAGS], cwd=ROOT,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'could not list the flags of peftjax.main: {proc.stderr.strip()[-500:]}')
  return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def _define(fv, desc: dict) -> None:
  """One of :func:`main_flags` on the flag registry ``fv`` (its value is never used)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  kw = dict(flag_values=fv, short_name=desc['short_name'])
  kind = desc['kind']
  if kind == 'BooleanParser':
    flags.DEFINE_bool(desc['name'], None, '', **kw)
  elif kind == 'IntegerParser':
    flags.DEFINE_integer(desc['name'], None, '', lower_bound=desc['lower_bound'],
                         upper_bound=desc['upper_bound'], **kw)
  elif kind == 'FloatParser':
    flags.DEFINE_float(desc['name'], None, '', lower_bound=desc['lower_bound'],
                       upper_bound=desc['upper_bound'], **kw)
  elif kind == 'EnumParser':
    flags.DEFINE_enum(desc['name'], None, desc['choices'], '', **kw)
  else:
    flags.DEFINE_string(desc['name'], None, '', **kw)


def parse_run(config, argv: list[str], described=None):
  """``argv`` (a run's flags after ``--workdir``) parsed against a copy of ``config`` and
  ``peftjax.main``'s flags exactly as the run will parse them; returns the run's config.

  Raises :class:`UserInputError` naming the flag (a misspelled override or flag, a value of the
  wrong type, a stray argument).
  """
  import copy  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from peftjax import cli  # pylint: disable=g-import-not-at-top
  values = {}  # dotted name -> the value given (for a renamed field's message)
  for a in argv:
    if re.match(r'--?(no)?config\.', a):
      key, _, value = a.partition('=')
      values.setdefault(key.split('.', 1)[1], value)
  cli.check_override_names(config, list(values), values=values)
  fv = flags.FlagValues()
  for desc in described if described is not None else main_flags():
    _define(fv, desc)
  full = ['peftjax.main', *argv]
  try:
    config_flags.DEFINE_config_dict('config', copy.deepcopy(config), flag_values=fv,
                                    sys_argv=full, lock_config=True)
    rest = fv(full)
  except UserInputError:
    raise
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise UserInputError(_flag_message(e, config)) from None
  if len(rest) > 1:
    raise UserInputError(f'unexpected arguments {rest[1:]}; valid: --config.<field>=<value> '
                         'overrides and peftjax.main flags (e.g. --fresh)')
  return fv.config


_TYPE_WORDS = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string',
               tuple: 'a Python tuple literal'}


def _flag_message(e: BaseException, config) -> str:
  """One line for a flag-parsing failure; a config value of the wrong type names the type."""
  msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  m = re.match(r'flag --config\.([\w.]+)=', msg)
  if m:
    from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top
    try:
      kind = config_path.get_type(m.group(1), config)
      msg += f'; valid: {_TYPE_WORDS.get(kind, getattr(kind, "__name__", kind))}'
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
      pass
  return ' '.join(msg.split())


def check_runs(config_spec: str, runs: list[dict], extra=()) -> None:
  """Every run's command line parsed and its config validated, before anything runs.

  First the flags given to every run (``extra``: overrides and ``peftjax.main`` flags), then each
  run's own overrides applied to a copy of the locked config and checked by
  :func:`peftjax.validate.validate`. The first problem is a :class:`SweepError` naming the run
  (or the command line) and the field.
  """
  from peftjax import validate  # pylint: disable=g-import-not-at-top
  config = load_config(config_spec)
  described = main_flags()
  extra = list(extra)
  swept = sorted({k for r in runs for k in r})
  for a in extra:
    name = re.match(r'--?(?:no)?config\.([^=]+)', a)
    if name and name.group(1) in swept:
      raise SweepError(f'{a.split("=")[0]} is set per run by sweep() in {config_spec} (it '
                       f'sweeps {", ".join(swept)}); overriding it for every run would make the '
                       'runs differ only in name; drop it or edit the sweep')
  try:
    parse_run(config, extra, described)
  except UserInputError as e:
    raise SweepError(f'a flag passed to every run: {e}') from None
  for i, r in enumerate(runs, start=1):
    where = f'run {run_name(r)!r} ({i} of {len(runs)}, from sweep() in {config_spec})'
    argv = command(config_spec, pathlib.Path('.'), r, extra)[5:]
    try:
      run_config = parse_run(config, argv, described)
      validate.validate(run_config)
    except UserInputError as e:
      raise SweepError(f'{where}: {e}') from None


def check_workdir(workdir: str) -> pathlib.Path:
  """The sweep's root directory, refused if empty, a file, or not writable (nothing created)."""
  from peftjax import storage  # pylint: disable=g-import-not-at-top
  if not workdir or not workdir.strip():
    raise SweepError("--workdir='' is empty; valid: a directory (one subdirectory per run)")
  root = pathlib.Path(workdir).expanduser()
  if root.exists() and not root.is_dir():
    raise SweepError(f'--workdir={workdir!r} is a file; valid: a directory (one subdirectory '
                     'per run)')
  try:
    storage.probe_writable(root)
  except OSError as e:
    raise SweepError(f'--workdir={workdir!r} cannot be written ({e.strerror or e})') from None
  return root


def run_name(overrides: dict) -> str:
  """A readable, filesystem-safe directory name for one run, e.g. ``peft.lora.rank=4,seed=1``."""
  parts = [f'{k}={v}' for k, v in sorted(overrides.items())]
  return re.sub(r'[^A-Za-z0-9_.,=+-]', '_', ','.join(parts)) or 'default'


def apply_overrides(config, overrides: dict):
  """Sets dotted keys on a config in place, as the sweep's command-line flags do; returns it.

  >>> apply_overrides(common.get_config(), {'peft.lora.rank': 4}).peft.lora.rank  # doctest: +SKIP
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


def last_error(log_path: pathlib.Path) -> str:
  """The line of a run's log that says why it failed: its last ``error:`` line, else the last
  line that names an exception, else the last non-empty line."""
  try:
    lines = [l.strip() for l in log_path.read_text(errors='replace').splitlines() if l.strip()]
  except OSError:
    return f'(no log at {log_path})'
  for pick in (lambda l: l.startswith(('error:', 'interrupted:')),
               lambda l: re.match(r'^[\w.]+(Error|Exception|Exit)\b', l), lambda l: True):
    found = [l for l in lines if pick(l)]
    if found:
      return found[-1][:300]
  return '(empty log)'


def run_all(config_path: str, workdir: str, runs: list[dict], *, parallel: int = 1,
            extra=(), log=print) -> list[dict]:
  """Runs what is not finished yet (``parallel`` at a time); returns one record per run.

  A run that fails is reported as it ends, with the last error line of its ``sweep.log``.
  """
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  todo = [r for r in runs if not (root / run_name(r) / 'summary.json').exists()]
  log(f'{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run')
  running: list[tuple[subprocess.Popen, dict, Any]] = []
  try:
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
          path = root / run_name(r) / 'sweep.log'
          if proc.returncode == 0:
            log(f'done: {run_name(r)} (log: {path})')
          else:
            log(f'FAILED (exit {proc.returncode}): {run_name(r)}: {last_error(path)} '
                f'(log: {path})')
      time.sleep(0.2)
  finally:
    for proc, _, out in running:  # interrupted: stop the runs still going (they resume later)
      proc.terminate()
      proc.wait()
      out.close()
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


class _ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one line (``error: ...``, exit 1) like every entry point."""

  def error(self, message):
    raise SweepError(f'{message} (see python -m experiments.sweep --help)')


def main(argv=None):
  p = _ArgumentParser(prog='python -m experiments.sweep', description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True, help='config file, optionally path:arg')
  p.add_argument('--workdir', required=True, help='one subdirectory per run goes here')
  p.add_argument('--parallel', type=int, default=1, help='runs at a time')
  p.add_argument('--dry_run', action='store_true', help='print the runs and commands only')
  p.add_argument('--compilation_cache', default=None,
                 help="persistent XLA cache shared by the runs (default <workdir>/.jax_cache; "
                      "'' = off): runs differing only in seed compile once")
  args, extra = p.parse_known_args(argv)
  extra = [a for a in extra if a != '--']
  if args.parallel < 1:
    raise SweepError(f'--parallel={args.parallel} is invalid; valid: >= 1 (runs at a time)')
  # ---------------------------------------------------------------- everything checked first
  root = check_workdir(args.workdir)
  cache = (str(root.absolute() / '.jax_cache')
           if args.compilation_cache is None else args.compilation_cache)
  if cache:
    extra = [*extra, f'--compilation_cache={cache}']
  path, _, arg = args.config.partition(':')
  runs = expand(path, arg or None)
  check_runs(args.config, runs, extra)
  if args.dry_run:
    for r in runs:
      print(' '.join(command(args.config, root / run_name(r), r, extra)))
    return runs
  # ---------------------------------------------------------------- the runs
  from peftjax import storage  # pylint: disable=g-import-not-at-top
  records = run_all(args.config, str(root), runs, parallel=args.parallel, extra=extra)
  md = table(records)
  storage.write_bytes_atomic(root / 'results.md', (md + '\n').encode())
  storage.write_bytes_atomic(root / 'results.json',
                             (json.dumps(records, indent=2) + '\n').encode())
  print(md)
  missing = [r['run'] for r in records if not (root / r['run'] / 'summary.json').exists()]
  if missing:
    raise SystemExit(f'error: {len(missing)} of {len(records)} runs did not finish: '
                     f'{", ".join(missing)} (each one\'s reason is above and in '
                     f'{root}/<run>/sweep.log; rerun the same command to retry them)')
  return records


if __name__ == '__main__':
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  errors.guard(main)()
