"""Every command the Makefile and the README show, run (or resolved) exactly as users type them.

* ``make bench``: each recipe line ``$(PY) benchmarks/X.py`` runs as a subprocess from the
  repository root in quick mode (``sys.executable`` stands for ``.venv/bin/python``), exits 0,
  prints its results as JSON and writes no results file. Run as scripts, the benchmarks have
  ``benchmarks/`` first on ``sys.path``: a file there named like a module jax imports broke
  every one of them at ``import jax`` while the in-process tests passed.
* No folder whose scripts run as ``python folder/x.py`` holds a file named like a standard or
  third-party module (the cause of that breakage).
* README shell commands: ``make`` targets exist (``make -n``); ``python -m`` modules exist and
  their flags parse through the real entry point (absl's ``--only_check_args``, which loads the
  config file and applies every ``--config.*`` override, or argparse's ``--help``), without
  creating the workdir or output they name; every ``--config=path[:arg]`` loads and every
  ``--config.x.y`` names a field of it.

The heavy benchmarks' quick modes (one to two minutes each) are marked slow; in the default run
each of them is started as a script (``--help``: every import, jax's included, as ``make bench``
runs it), the committed-results tests in tests/test_benchmarks.py check the files they write, and
their parts have unit tests.
"""
from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / 'Makefile'
README = ROOT / 'README.md'
RESULTS = ROOT / 'benchmarks' / 'results'
TIMEOUT = 900


def _run(cmd, timeout=TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
  if cmd[0] == 'make':
    # Under `make test` the parent make's variables would make this one print "Entering
    # directory" lines and inherit its flags: run it as a user would, from a shell.
    env = {k: v for k, v in os.environ.items() if k not in ('MAKEFLAGS', 'MAKELEVEL', 'MFLAGS')}
    kwargs = {'env': env, **kwargs}
    cmd = ['make', '--no-print-directory', *cmd[1:]]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        **kwargs)


def _explain(p: subprocess.CompletedProcess) -> str:
  return f'exit {p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}'


# ---------------------------------------------------------------------------- the Makefile


def _recipe(target: str) -> list[list[str]]:
  """The recipe lines of ``target`` in the Makefile, each split into words as the shell does."""
  lines = MAKEFILE.read_text().splitlines()
  start = next(i for i, l in enumerate(lines) if re.match(rf'{re.escape(target)}\s*:', l))
  out = []
  for line in lines[start + 1:]:
    if not line.startswith('\t'):
      break
    out.append(shlex.split(line))
  return out


def _make_targets() -> set[str]:
  return set(re.findall(r'^([A-Za-z][\w-]*)\s*:(?!=)', MAKEFILE.read_text(), re.M))


def _bench_scripts() -> list[str]:
  """``benchmarks/X.py`` of every ``$(PY) benchmarks/X.py`` line of ``make bench``."""
  return [words[1] for words in _recipe('bench')]


def test_make_bench_runs_every_benchmark_as_a_script():
  recipe = _recipe('bench')
  assert recipe, 'the Makefile has no bench recipe'
  for words in recipe:
    # `$(PY) benchmarks/X.py`: the venv's python runs the file (its folder first on sys.path).
    assert len(words) == 2 and words[0] == '$(PY)' and words[1].startswith('benchmarks/'), words
    assert (ROOT / words[1]).is_file(), words
  shipped = sorted(f'benchmarks/{p.name}' for p in (ROOT / 'benchmarks').glob('*.py')
                   if p.name != '__init__.py')
  assert sorted(_bench_scripts()) == shipped
  if shutil.which('make'):
    # What make itself would run (the venv's set-up step left out) is what was parsed.
    p = _run(['make', '-n', '-o', '.venv/.installed', 'bench'], timeout=60)
    assert p.returncode == 0, _explain(p)
    assert [l.split() for l in p.stdout.splitlines()] == [
        ['.venv/bin/python', s] for s in _bench_scripts()]


# Quick modes: per benchmark, its headline keys and the exact (not timed) figures it must report.
# The heavy ones take 1-2 min of CPU each; their default-run cover is test_benchmark_starts_as_a_script
# (any_model's agreement of its candidates is test_scan_stack's and test_nnx's in the default run).
HEAVY = {'quant', 'moe', 'precision', 'compression_bench', 'any_model', 'lm_serving'}


def _check_lora_vs_full(r):
  for k in ('lora_step_ms', 'full_step_ms', 'infer_ms', 'step_time_ratio', 'flops_ratio',
            'opt_state_bytes_ratio', 'peak_memory_ratio', 'trainable_fraction', 'lora_mfu'):
    assert r[k] > 0, k
  # With 2 layers LoRA trains 2 x 2 x (384*8 + 8*384) + the 770-param head.
  assert r['details']['lora_trainable_params'] == 2 * 2 * 6144 + 770
  # Adam keeps 2 moments per trainable scalar (+ a step count), so the ratio is exact too.
  assert abs(r['opt_state_bytes_ratio'] - (2 * 2 * 2 * 6144 + 2 * 770 + 2) /
             (2 * r['details']['full_trainable_params'] + 2)) < 1e-3
  assert r['flops_ratio'] < 1.0 and r['peak_memory_ratio'] < 1.0


def _check_quant(r):
  for k in ('int8_infer_time_ratio', 'int8_weight_bytes_ratio', 'qat_step_time_ratio',
            'qlora_base_bytes_ratio'):
    assert r[k] > 0, k
  # Bytes are exact, not timed: int8 weights + float32 scales, biases and norms.
  d = r['details']
  assert r['int8_weight_bytes_ratio'] == d['int8_bytes'] / d['float_bytes'] < 0.27
  assert r['qlora_base_bytes_ratio'] == d['qlora_base_bytes'] / d['float_bytes'] < 0.27
  assert d['int8_layers'] == 2 * 6 + 3  # 6 matmuls per layer + 3 embedding tables


def _check_moe(r):
  import math  # pylint: disable=g-import-not-at-top
  for k in ('moe_vs_dense_step_ratio', 'experts_scaling_ratio', 'onehot_vs_sorted_ratio',
            'experts_scaling_fwd_bwd_ratio', 'onehot_experts_scaling_ratio'):
    assert math.isfinite(r[k]) and r[k] > 0, k
  for k in ('dropped_fraction', 'dropped_fraction_random_init'):
    assert 0.0 <= r[k] <= 1.0, k
  s = r['settings']
  for k in ('num_experts', 'top_k', 'capacity_factor', 'scaling_experts', 'device_count',
            'batch_size', 'max_length', 'timed_steps'):
    assert k in s, k
  # Not timed: the MoE layer's capacity is exact (top-2 of 8, 16 tokens, cf 1.25 -> 5 slots).
  assert r['details']['capacity_per_group']['e8'] == 5


def _check_multi_adapter(r):
  for k in ('mixed_batch_8_vs_merged', 'mixed_batch_64_vs_merged', 'active_fixed_scaling',
            'single_adapter_vs_merged'):
    assert r[k] > 0, k
  d = r['details']
  # Not timed: switching, re-mixing and hot-swapping compile nothing and retrace nothing ...
  assert r['swap_recompiles'] == 0 and d['swap']['compiled'] == []
  assert d['swap']['forward_traces'] == 0 and d['swap']['slots_unchanged']
  # ... and the swapped-in adapter computes exactly what it computed in its own slot.
  assert d['swap']['hot_swap_max_abs_diff'] == 0.0
  # The library's forward equals the merged model's (float rounding).
  for v in d['max_abs_error_vs_merged'].values():
    assert v < 1e-4
  # The delta file holds 1 layer x (query, value) x (384*8 + 8*384) LoRA floats + the 770-float
  # head, plus its JSON header.
  tensors = 4 * (2 * 2 * 384 * 8 + 770)
  assert tensors < d['adapter_file_bytes'] < tensors + 16384
  assert r['adapter_bytes_ratio'] == d['adapter_file_bytes'] / d['base_file_bytes']


def _check_precision(r):
  for k in ('bf16_step_time_ratio', 'remat_peak_memory_ratio', 'f32_step_ms', 'bf16_step_ms',
            'f32_peak_bytes', 'remat_peak_bytes'):
    assert r[k] > 0, k
  # Not timed: the bf16 run's trainable partition and optimizer state stay float32.
  assert r['details']['bf16_master_dtypes'] == ['float32']
  assert r['remat_policy'] in ('full', 'dots')
  assert r['remat_peak_memory_ratio'] == r['remat_peak_bytes'] / r['f32_peak_bytes']


def _check_compression(r):
  for k in ('student_infer_time_ratio', 'head_pruned_50_infer_time_ratio',
            'svd_half_rank_infer_time_ratio', 'deep_compression_size_ratio'):
    assert r[k] > 0, k
  p = r['details']['params']
  # Not timed: every smaller model really has fewer parameters than the teacher.
  assert p['student'] < p['heads_pruned_50'] < p['teacher'] and p['svd_half_rank'] < p['teacher']
  stages = r['details']['deep_compression_mnist']['stages']
  assert r['deep_compression_size_ratio'] == stages[-1]['bytes'] / stages[0]['bytes']
  assert r['huffman_roundtrip_exact'] is True


def _check_any_model(r):
  for k in ('scan_vs_unrolled_step_ratio', 'nnx_vs_linen_step_ratio', 'scan_step_ms',
            'unrolled_step_ms', 'nnx_step_ms'):
    assert r[k] > 0, k
  # r=8 on query and value ((128, 4, 32) kernels) of 2 layers: 2 x 2 x (128*8 + 8*128).
  assert r['details']['lora_params'] == 2 * 2 * 2048
  first = r['details']['first_losses']
  assert set(first) == {'scan', 'unrolled', 'nnx'} and max(first.values()) - min(first.values()) < 1e-3


def _check_lm_serving(r):
  for k in ('mixed_adapters_decode_ratio', 'mixed_adapters_prefill_ratio', 'prefix_decode_ratio',
            'int8_decode_speedup'):
    assert r[k] > 0, k
  assert r['swap_recompiles'] == 0  # a count, not a timing: a hot swap compiles nothing


def _check_lm(r):
  for k in ('lora_vs_full_step_ratio', 'train_mfu', 'decode_tokens_per_s_b1',
            'decode_tokens_per_s_b16', 'decode_roofline_b1', 'batch16_vs_batch1_throughput',
            'prefill_ms'):
    assert r[k] > 0, k
  d = r['details']
  # Not timed: the random 2-layer Llama (width 64, 4 x 16 query and 2 x 16 key/value dims,
  # SwiGLU 128, the 49152-token tied embedding) and LoRA r=8 on its q/k/v/o kernels.
  layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
  assert d['full_trainable_params'] == 49152 * 64 + 2 * layer + 64
  assert d['lora_trainable_params'] == 2 * 8 * (2 * (64 + 64) + 2 * (64 + 32))
  assert d['weight_bytes'] == 4 * d['full_trainable_params']  # float32, every weight once
  assert d['kv_bytes_per_position'] == 2 * 2 * 2 * 16 * 4  # layers x (k, v) x heads x dim x f32
  # 16-token prompts, 4 new tokens: the decode steps timed attend 16 + 2 positions on average.
  assert d['decode_bytes_per_token_b1'] == d['weight_bytes'] + d['kv_bytes_per_position'] * 18
  # Greedy without stop tokens: every row generates every token asked for.
  assert d['tokens_generated'] == {'b1_n': 4, 'b1_1': 1, 'b16_n': 16 * 4, 'b16_1': 16}
  assert r['batch16_vs_batch1_throughput'] == (r['decode_tokens_per_s_b16'] /
                                               r['decode_tokens_per_s_b1'])
  targets = {'lora_vs_full_step_ratio', 'train_mfu', 'decode_roofline_b1',
             'batch16_vs_batch1_throughput'}
  assert set(r['meets_targets']) == set(r['target_notes']) == targets
  for k, note in r['target_notes'].items():
    assert note.endswith('ok)' if r['meets_targets'][k] else 'MISSED)'), (k, note)


CHECKS = {'lora_vs_full': _check_lora_vs_full, 'quant': _check_quant, 'moe': _check_moe,
          'multi_adapter': _check_multi_adapter, 'precision': _check_precision,
          'compression_bench': _check_compression, 'any_model': _check_any_model,
          'lm': _check_lm, 'lm_serving': _check_lm_serving}


def _printed_json(stdout: str) -> dict:
  """The JSON object a quick run prints last (after its readable report)."""
  lines = stdout.splitlines()
  assert '{' in lines, f'no JSON printed:\n{stdout[-2000:]}'
  start = len(lines) - 1 - lines[::-1].index('{')
  return json.loads('\n'.join(lines[start:]))


def _results_snapshot() -> dict:
  return {p.name: p.read_bytes() for p in RESULTS.iterdir()}


def _name(script: str) -> str:
  return pathlib.Path(script).stem


@pytest.mark.parametrize('script', [
    pytest.param(s, id=_name(s), marks=[pytest.mark.slow] if _name(s) in HEAVY else [])
    for s in _bench_scripts()])
def test_benchmark_quick_mode_as_make_bench_runs_it(script):
  before = _results_snapshot()
  p = _run([sys.executable, script, '--quick'])
  assert p.returncode == 0, _explain(p)
  r = _printed_json(p.stdout)
  s = r['settings']
  assert s['quick'] is True
  # Which CPU measured is part of every result (timing.run_and_publish).
  assert s['cpu']['model'] and s['cpu']['logical_cpus'] >= 1 and 'isa' in s['cpu']
  assert isinstance(r['meets_targets'], dict)
  CHECKS[_name(script)](r)
  # A quick run prints; it never replaces the committed figures.
  assert _results_snapshot() == before
  assert 'wrote ' not in p.stdout


@pytest.mark.parametrize('script', [s for s in _bench_scripts() if _name(s) in HEAVY],
                         ids=_name)
def test_benchmark_starts_as_a_script(script):
  # Every import of the script, jax's included, with benchmarks/ first on sys.path as under
  # `make bench`; argparse's --help then exits before any work.
  p = _run([sys.executable, script, '--help'], timeout=300)
  assert p.returncode == 0, _explain(p)
  assert p.stdout.startswith('usage: ') and '--quick' in p.stdout and '--out' in p.stdout
  assert not p.stderr.strip(), p.stderr


def test_every_benchmark_has_a_quick_check():
  assert sorted(CHECKS) == sorted(_name(s) for s in _bench_scripts())


# ---------------------------------------------------------------------------- shadowing names

# Standard modules of newer Pythons than this one (jax's compilation cache already tries
# `from compression import zstd`, the 3.14 module).
NEWER_STDLIB = {'annotationlib', 'compression', '_colorize', '_pyrepl'}
SCRIPT_RE = re.compile(r'(?:python[\d.]*|\$\(PY\))\s+((?:[\w.-]+/)+)[\w-]+\.py\b')
TEXT_SUFFIXES = {'.py', '.sh', '.md', '.toml', '.cfg', '.ipynb', ''}


def _project_files():
  import os  # pylint: disable=g-import-not-at-top
  skip = {'.venv', '.git', 'build', 'node_modules', '__pycache__', '.pytest_cache'}
  for folder, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if d not in skip and not d.endswith('.egg-info')]
    for f in files:
      yield pathlib.Path(folder) / f


def _script_folders() -> set[pathlib.Path]:
  """Folders whose files some command runs as ``python folder/x.py`` (Makefile, README, docs,
  docstrings), plus tests/ (pytest puts it first on sys.path)."""
  found = {ROOT / 'tests'}
  for p in _project_files():
    if p.suffix not in TEXT_SUFFIXES or (p.suffix == '' and p.name != 'Makefile'):
      continue
    try:
      text = p.read_text()
    except (UnicodeDecodeError, OSError):
      continue
    for m in SCRIPT_RE.finditer(text):
      folder = ROOT / m.group(1).strip('/')
      if folder.is_dir() and folder.resolve() != ROOT and not m.group(1).startswith('/'):
        found.add(folder)
  return found


def _dependency_modules() -> set[str]:
  """Top-level module names of peftjax's installed dependencies (their dependencies too)."""
  from packaging.requirements import Requirement  # pylint: disable=g-import-not-at-top
  norm = lambda n: re.sub(r'[-_.]+', '-', n).lower()
  seen, todo = set(), ['peftjax']
  while todo:
    name = todo.pop()
    if norm(name) in seen:
      continue
    seen.add(norm(name))
    try:
      dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      continue
    for spec in dist.requires or []:
      req = Requirement(spec)
      env = {'extra': 'test' if norm(name) == 'peftjax' else ''}
      if req.marker is None or req.marker.evaluate(env):
        todo.append(req.name)
  return {top for top, dists in importlib.metadata.packages_distributions().items()
          if any(norm(d) in seen for d in dists)}


def _project_imports() -> set[str]:
  """Top-level names the project's own code imports (absolute imports; a regex over lines)."""
  names = set()
  for folder in ('peftjax', 'configs', 'experiments', 'benchmarks', 'tests', 'notebooks'):
    for p in (ROOT / folder).rglob('*.py'):
      text = p.read_text()
      names |= set(re.findall(r'^\s*from\s+([A-Za-z_]\w*)[\w.]*\s+import\b', text, re.M))
      for line in re.findall(r'^\s*import\s+([\w., ]+)', text, re.M):
        names |= {n.strip().split('.')[0].split(' ')[0] for n in line.split(',') if n.strip()}
  return names


def _importable_names(folder: pathlib.Path) -> set[str]:
  """What ``import NAME`` finds in ``folder`` when it is on sys.path: modules and packages."""
  return ({p.stem for p in folder.glob('*.py')} |
          {p.name for p in folder.iterdir() if (p / '__init__.py').is_file()})


def test_no_script_folder_shadows_a_module():
  folders = _script_folders()
  assert ROOT / 'benchmarks' in folders  # `make bench` runs `python benchmarks/X.py`
  own_packages = _importable_names(ROOT)  # peftjax, configs, experiments, benchmarks
  # Standard modules, every module of the dependencies, the project's own packages ...
  reserved = (set(sys.stdlib_module_names) | NEWER_STDLIB | _dependency_modules() |
              own_packages)
  assert {'jax', 'flax', 'optax', 'numpy', 'compression', 'json', 'peftjax', 'configs'} <= reserved
  # ... and whatever else the project imports that exists outside the folder (a name that exists
  # only in the folder is a sibling module: tests/ imports its helpers that way).
  imported = _project_imports()
  clashes = []
  for folder in sorted(folders):
    others = [p for p in sys.path if p and pathlib.Path(p).resolve() != folder.resolve()]
    for name in sorted(_importable_names(folder)):
      if name in reserved or (
          name in imported and importlib.machinery.PathFinder.find_spec(name, others)):
        clashes.append(f'{folder.relative_to(ROOT)}/{name}')
  assert not clashes, (f'these names shadow a module when their folder comes first on sys.path '
                       f'(python folder/x.py): {clashes}; rename them')


# ---------------------------------------------------------------------------- README commands


def _readme_blocks() -> list[tuple[str, str]]:
  return re.findall(r'^```(\w*)\n(.*?)^```', README.read_text(), re.M | re.S)


def _readme_shell_commands() -> list[list[str]]:
  """Every command of the README's ``sh`` blocks (continuations joined, comments dropped)."""
  out = []
  for lang, body in _readme_blocks():
    if lang not in ('sh', 'bash', 'shell'):
      continue
    for line in re.sub(r'\\\n\s*', ' ', body).splitlines():
      words = shlex.split(line, comments=True)
      if words:
        out.append(words)
  return out


PLACEHOLDER = 'PLACEHOLDER'


def _readme_inline_commands() -> list[list[str]]:
  """Commands quoted inline in the prose: `make ...`, `python -m ...`, `python x/y.py ...`.

  Table rows are left out: the catalogue's rows quote inputs that must fail. In a template such
  as ``--adapter=<HF PEFT dir> [--base=DIR]`` each ``<...>`` becomes :data:`PLACEHOLDER` and
  the brackets of an optional part go.
  """
  text = re.sub(r'^```.*?^```', '', README.read_text(), flags=re.M | re.S)
  text = '\n'.join(l for l in text.splitlines() if not l.lstrip().startswith('|'))
  out = []
  for span in re.findall(r'`([^`]+)`', text):
    words = re.sub(r'[\[\]]', ' ', re.sub(r'<[^>]*>', PLACEHOLDER, span)).split()
    if words and (words[0] == 'make' or re.fullmatch(r'(\.venv/bin/)?python3?', words[0])):
      if words not in out:
        out.append(words)
  return out


def _strip_python(words: list[str]) -> list[str] | None:
  """``[python, -m, mod, ...]`` / ``[python, x.py, ...]`` -> the part after python."""
  if words and re.fullmatch(r'(\.venv/bin/)?python3?', words[0]):
    return words[1:]
  return None


def _module_file(module: str) -> pathlib.Path | None:
  base = ROOT.joinpath(*module.split('.'))
  for p in (base.with_suffix('.py'), base / '__main__.py'):
    if p.is_file():
      return p
  return None


def _is_absl(path: pathlib.Path) -> bool:
  text = path.read_text()
  return 'errors.run(' in text or 'app.run(' in text


def _flag_value(args: list[str], name: str) -> str | None:
  for i, a in enumerate(args):
    if a.startswith(f'--{name}='):
      return a.split('=', 1)[1]
    if a == f'--{name}' and i + 1 < len(args):
      return args[i + 1]
  return None


def _check_config_flags(args: list[str]) -> None:
  """``--config=path[:arg]`` loads; every ``--config.x.y`` names a field of that config."""
  spec = _flag_value(args, 'config')
  overrides = [a[len('--config.'):].split('=', 1)[0] for a in args if a.startswith('--config.')]
  if spec is None:
    assert not overrides, f'overrides without --config: {overrides}'
    return
  path, _, arg = spec.partition(':')
  assert (ROOT / path).is_file(), f'--config={spec}: no file {path}'
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  module_name = '_readme_config_' + re.sub(r'\W', '_', path)
  module_spec = importlib.util.spec_from_file_location(module_name, ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for dotted in overrides:
    node = config
    for part in dotted.split('.'):
      assert part in node, f'--config.{dotted}: {part!r} is not a field of {spec}'
      node = node[part]


def _paths_named(args: list[str]) -> list[pathlib.Path]:
  return [pathlib.Path(v) for n in ('workdir', 'out', 'output')
          if (v := _flag_value(args, n)) and not v.startswith('gs://') and v != '...']


def _flag_names(args: list[str]) -> list[str]:
  # `--config.*` overrides are checked against the loaded config instead.
  return [a.split('=', 1)[0][2:] for a in args
          if a.startswith('--') and not a.startswith('--config.')]


def _check_argparse_command(cmd: list[str], args: list[str]) -> None:
  """argparse's ``--help`` (after the positional words: a subcommand's) exits 0 and lists every
  flag the command uses."""
  p = _run([*cmd, *[a for a in args if not a.startswith('-') and a != PLACEHOLDER], '--help'],
           timeout=300)
  assert p.returncode == 0, _explain(p)
  for name in _flag_names(args):
    assert re.search(rf'--{re.escape(name)}\b', p.stdout), f'{cmd}: --{name} is not a flag'


def _check_module_command(module: str, args: list[str], inline: bool = False) -> None:
  path = _module_file(module)
  assert path is not None, f'python -m {module}: no module {module} in the repository'
  if inline and not args:
    return  # prose naming the entry point, not a full command
  template = PLACEHOLDER in ' '.join(args)
  if not template:
    _check_config_flags(args)
  created = [p for p in _paths_named(args) if not p.exists()]
  if not _is_absl(path):
    _check_argparse_command([sys.executable, '-m', module], args)
  elif template:
    # A template's values are not values: its flags must be ones the entry point defines.
    p = _run([sys.executable, '-m', module, '--helpshort'], timeout=300)
    for name in _flag_names(args):
      assert re.search(rf'^\s+--(\[no\])?{re.escape(name)}:', p.stdout, re.M), (
          f'python -m {module}: --{name} is not a flag\n{_explain(p)}')
  else:
    # absl parses every flag (loading the config and applying its overrides), then stops.
    p = _run([sys.executable, '-m', module, *args, '--only_check_args'], timeout=300)
    assert p.returncode == 0, _explain(p)
    assert not re.search(r'^error:', p.stderr, re.M), p.stderr
  assert [p for p in created if p.exists()] == [], 'checking the flags created files'


def _check_make_command(args: list[str]) -> None:
  targets = [a for a in args if '=' not in a and not a.startswith('-')]
  assert set(targets) <= _make_targets(), (args, sorted(_make_targets()))
  if shutil.which('make'):
    p = _run(['make', '-n', *args], timeout=60)
    assert p.returncode == 0 and p.stdout.strip(), _explain(p)


def _check(words: list[str], inline: bool = False) -> None:
  if words[0] == 'make':
    return _check_make_command(words[1:])
  if words[0].startswith('--'):
    # The Configuration section's flag lines: overrides for `python -m peftjax.main`.
    return _check_module_command('peftjax.main',
                                 ['--config=configs/quickstart.py', *words,
                                  '--workdir=/tmp/peftjax_readme_flags_check'])
  rest = _strip_python(words)
  assert rest, f'not a command this test knows: {words}'
  if rest[0] == '-m':
    return _check_module_command(rest[1], rest[2:], inline)
  script = ROOT / rest[0]
  assert script.is_file(), f'python {rest[0]}: no such file'
  _check_argparse_command([sys.executable, rest[0]], rest[1:])


def _id(words: list[str]) -> str:
  return ' '.join(words)[:90]


@pytest.mark.parametrize('words', _readme_shell_commands(), ids=_id)
def test_readme_shell_command_resolves(words):
  _check(words)


@pytest.mark.parametrize('words', _readme_inline_commands(), ids=_id)
def test_readme_inline_command_resolves(words):
  _check(words, inline=True)


def test_readme_commands_were_found():
  # The parsers above see what a reader sees (a changed README format would check nothing).
  shell = [' '.join(w) for w in _readme_shell_commands()]
  assert sum(c.startswith('.venv/bin/python -m peftjax.main ') for c in shell) >= 10
  assert any(c.startswith('.venv/bin/python -m peftjax.predict ') for c in shell)
  assert any(c.startswith('.venv/bin/python -m experiments.sweep ') for c in shell)
  assert 'make run' in shell and 'make test' in shell
  assert ['make', 'bench'] in _readme_inline_commands()


# ---------------------------------------------------------------------------- README Python


def _readme_python() -> str:
  """Every Python block of the README, one program per block."""
  return '\n'.join(body for lang, body in _readme_blocks() if lang == 'python')


def test_readme_python_names_exist():
  """Every module the README's Python example imports, and every attribute it uses of them,
  exists (the example itself runs in test_readme_python_runs)."""
  import importlib  # pylint: disable=g-import-not-at-top
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  tree = ast.parse(_readme_python())
  modules = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        modules[a.asname or a.name] = importlib.import_module(a.name)
    elif isinstance(node, ast.ImportFrom):
      parent = importlib.import_module(node.module)
      for a in node.names:
        obj = getattr(parent, a.name, None)
        if obj is None:
          obj = importlib.import_module(f'{node.module}.{a.name}')
        modules[a.asname or a.name] = obj
  used = [(n.value.id, n.attr) for n in ast.walk(tree)
          if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
          and n.value.id in modules]
  assert len(used) >= 8
  missing = [f'{m}.{a}' for m, a in used if not hasattr(modules[m], a)]
  assert not missing, missing


@pytest.mark.slow  # ~12 s CPU: loads MiniLM; test_readme_python_names_exist covers the names
def test_readme_python_runs():
  p = _run([sys.executable, '-c', _readme_python()], timeout=600)
  assert p.returncode == 0, _explain(p)
  assert 'trainable' in p.stdout
