"""Bad input to the tools, through their real entry points (``python -m ...`` subprocesses):
serving (``peftjax.predict``), PTQ (``peftjax.quant.convert``), HF export (``peftjax.export``)
and sweeps (``experiments.sweep``, ``experiments.pod_sweep``).

Every case asserts the exit code, the one ``error:`` line (the flag, path or field it names and
what would be valid) and the files left behind: none created, earlier ones intact. Most cases
fail before jax is imported, so a subprocess costs a fraction of a second; one finished tiny run
(module-scoped) serves the cases that need a real adapter or checkpoints.
"""
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from configs import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = 'configs/tiny.py'
# The fixture run's overrides (passed to convert too, so only the input under test is wrong).
RUN = {'train.steps': 2, 'optim.warmup_steps': 0, 'train.eval_before': False,
       'train.save_adapter': True}
RUN_FLAGS = [f'--config.{k}={v}' for k, v in RUN.items()]


def _run(module: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
  """The single stderr line of a refused command (exit 1, no traceback), which must contain
  every fragment."""
  assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-3000:]
  for f in fragments:
    assert f in lines[0], (f, lines[0])
  assert 'this is a bug in peftjax' not in lines[0], lines[0]  # known, not the bug fallback
  return lines[0]


def _files(root: pathlib.Path) -> dict:
  """Every file and directory under ``root`` with its bytes (the tree, to compare after)."""
  if not root.exists():
    return {}
  return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
          for p in sorted(root.rglob('*'))}


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory) -> pathlib.Path:
  """A finished tiny run (2 steps) with its checkpoints, summary and adapter file."""
  from peftjax import train
  workdir = tmp_path_factory.mktemp('finished_run')
  c = tiny.get_config()
  c.update_from_flattened_dict(RUN)
  train.train_and_evaluate(c, str(workdir))
  assert (workdir / 'summary.json').is_file() and (workdir / 'adapter.safetensors').is_file()
  return workdir


def _jsonl(path: pathlib.Path, lines) -> pathlib.Path:
  path.write_bytes(b''.join((l if isinstance(l, bytes) else
                             (l if isinstance(l, str) else json.dumps(l)).encode()) + b'\n'
                            for l in lines))
  return path


# ================================================================= peftjax.predict

def _predict(adapter, inp, out, *flags):
  return _run('peftjax.predict', f'--adapter=a={adapter}', f'--input={inp}', f'--output={out}',
              *flags)


def test_predict_non_utf8_input_names_the_line_and_byte(run_dir, tmp_path):
  inp = _jsonl(tmp_path / 'in.jsonl', [{'text': 'fine'}, '{"text": "caf\xe9"}'.encode('latin-1')])
  before = _files(tmp_path)
  err = _error(_predict(run_dir / 'adapter.safetensors', inp, tmp_path / 'out.jsonl'),
               f'{inp}:2: not UTF-8', "b'\\xe9'", 'valid: a UTF-8 JSONL file')
  assert 'column 14' in err
  assert _files(tmp_path) == before  # no output, no temporary file


@pytest.mark.parametrize('value,fragments', [
    (1000, ["--max_length=1000 exceeds the base model's 512 positions", 'valid: 2..512',
            'training length, 16']),
    (-3, ['--max_length=-3 is invalid', 'valid: 0 (the training length) or an integer >= 2']),
    (1, ['--max_length=1 is invalid', '>= 2']),
])
def test_predict_max_length_outside_the_model_positions(run_dir, tmp_path, value, fragments):
  inp = _jsonl(tmp_path / 'in.jsonl', [{'text': 'fine'}])
  out = tmp_path / 'out.jsonl'
  out.write_text('previous\n')
  before = _files(tmp_path)
  _error(_predict(run_dir / 'adapter.safetensors', inp, out, f'--max_length={value}'),
         *fragments)
  assert _files(tmp_path) == before and out.read_text() == 'previous\n'


def test_predict_output_that_is_a_directory(run_dir, tmp_path):
  inp = _jsonl(tmp_path / 'in.jsonl', [{'text': 'fine'}])
  (tmp_path / 'outdir').mkdir()
  before = _files(tmp_path)
  _error(_predict(run_dir / 'adapter.safetensors', inp, tmp_path / 'outdir'),
         f"--output='{tmp_path / 'outdir'}' is a directory", 'valid: a file path',
         'predictions.jsonl')
  assert _files(tmp_path) == before


@pytest.mark.parametrize('where', ['missing', 'file'])
def test_predict_output_in_a_directory_that_is_missing_or_a_file(run_dir, tmp_path, where):
  inp = _jsonl(tmp_path / 'in.jsonl', [{'text': 'fine'}])
  parent = tmp_path / 'nodir' if where == 'missing' else inp
  before = _files(tmp_path)
  proc = _predict(run_dir / 'adapter.safetensors', inp, parent / 'out.jsonl')
  _error(proc, f"--output='{parent / 'out.jsonl'}'", f"'{parent}'",
         'does not exist' if where == 'missing' else 'is not a directory')
  assert _files(tmp_path) == before


def test_predict_output_that_is_the_input_is_refused(run_dir, tmp_path):
  inp = _jsonl(tmp_path / 'in.jsonl', [{'text': 'fine'}])
  before = _files(tmp_path)
  _error(_predict(run_dir / 'adapter.safetensors', inp, inp), 'is the --input file',
         'choose another output path')
  assert _files(tmp_path) == before


@pytest.mark.parametrize('line,fragments', [
    ('{"text": "unclosed"', ['not valid JSON', 'valid: one JSON object per line']),
    ('{"txt": "misspelled key"}', ['the record has no "text"', "keys: ['txt']"]),
    ('{"text": "x", "adapter": "b"}', ["unknown adapter 'b'; loaded: ['a']"]),
    ('{"text": "x", "adapter": 3}', ['"adapter" must be a string', "got 3; loaded: ['a']"]),
])
def test_predict_bad_jsonl_line_names_it_and_keeps_the_previous_output(run_dir, tmp_path, line,
                                                                       fragments):
  inp = _jsonl(tmp_path / 'in.jsonl', [{'text': 'fine'}, line])
  out = tmp_path / 'out.jsonl'
  out.write_text('previous\n')
  before = _files(tmp_path)
  _error(_predict(run_dir / 'adapter.safetensors', inp, out), f'{inp}:2: ', *fragments)
  assert _files(tmp_path) == before


@pytest.mark.parametrize('content', [b'', b'\n\n'])
def test_predict_empty_input_file(run_dir, tmp_path, content):
  inp = tmp_path / 'in.jsonl'
  inp.write_bytes(content)
  before = _files(tmp_path)
  _error(_predict(run_dir / 'adapter.safetensors', inp, tmp_path / 'out.jsonl'),
         f"--input='{inp}' has no records", 'valid: one JSON object per line')
  assert _files(tmp_path) == before


def test_predict_input_that_is_missing_or_a_directory(run_dir, tmp_path):
  before = _files(tmp_path)
  _error(_predict(run_dir / 'adapter.safetensors', tmp_path / 'nope.jsonl', tmp_path / 'o.jsonl'),
         f"--input='{tmp_path / 'nope.jsonl'}' does not exist")
  _error(_predict(run_dir / 'adapter.safetensors', tmp_path, tmp_path / 'o.jsonl'),
         f"--input='{tmp_path}' is a directory")
  assert _files(tmp_path) == before


def test_predict_adapter_file_missing_corrupt_or_a_directory(run_dir, tmp_path):
  inp = _jsonl(tmp_path / 'in.jsonl', [{'text': 'fine'}])
  truncated = tmp_path / 'truncated.safetensors'
  truncated.write_bytes((run_dir / 'adapter.safetensors').read_bytes()[:1000])
  before = _files(tmp_path)
  _error(_predict(tmp_path / 'nope.safetensors', inp, tmp_path / 'o.jsonl'),
         f"--adapter a='{tmp_path / 'nope.safetensors'}' does not exist",
         'written with train.save_adapter=True')
  _error(_predict(run_dir, inp, tmp_path / 'o.jsonl'), f"--adapter a='{run_dir}' is a directory",
         f"did you mean '{run_dir / 'adapter.safetensors'}'")
  _error(_predict(truncated, inp, tmp_path / 'o.jsonl'), f"'{truncated}' is corrupt or truncated")
  assert _files(tmp_path) == before


@pytest.mark.parametrize('flags,fragments', [
    (['--batch_size=0'], ['--batch_size=0 is invalid; valid: a positive integer']),
    (['--max_rank=-1'], ['--max_rank=-1 is invalid', 'valid: 0 (the largest loaded)']),
    (['--max_rank=4'], ['--max_rank=4 is below the LoRA rank 8 of --adapter a', 'valid: >= 8']),
    (['--default_adapter=b'], ["--default_adapter='b' is not among the loaded adapters ['a']"]),
    (['--base=/nonexistent/bert'], ["--base='/nonexistent/bert' does not exist",
                                    'valid: a Hugging Face BERT directory']),
])
def test_predict_bad_flag_values(run_dir, tmp_path, flags, fragments):
  inp = _jsonl(tmp_path / 'in.jsonl', [{'text': 'fine'}])
  before = _files(tmp_path)
  _error(_predict(run_dir / 'adapter.safetensors', inp, tmp_path / 'o.jsonl', *flags), *fragments)
  assert _files(tmp_path) == before


# ================================================================= peftjax.quant.convert

def _convert(workdir, *flags):
  return _run('peftjax.quant.convert', f'--config={TINY}', f'--workdir={workdir}', *RUN_FLAGS,
              *flags)


def test_convert_a_workdir_without_a_run_creates_nothing(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  _error(_convert(empty), f'{empty}/checkpoints holds no checkpoint',
         'train with this config first')
  assert _files(empty) == {}  # no checkpoints/ (nor int8/) made in it
  _error(_convert(tmp_path / 'missing'), f"--workdir='{tmp_path / 'missing'}' does not exist")
  (tmp_path / 'file').write_text('x')
  _error(_convert(tmp_path / 'file'), f"--workdir='{tmp_path / 'file'}' is a file")
  assert sorted(p.name for p in tmp_path.iterdir()) == ['empty', 'file']


def test_convert_an_unfinished_run_is_refused(run_dir, tmp_path):
  run = tmp_path / 'unfinished'
  shutil.copytree(run_dir, run)
  (run / 'summary.json').unlink()
  before = _files(run)
  _error(_convert(run), 'has checkpoints but no summary.json: the run has not finished',
         'rerun its training command')
  assert _files(run) == before


def test_convert_an_existing_output_is_left_intact(run_dir, tmp_path):
  taken = tmp_path / 'taken'
  taken.mkdir()
  (taken / 'model.txt').write_text('earlier model')
  (tmp_path / 'file').write_text('a file')
  before, run_before = _files(tmp_path), _files(run_dir)
  _error(_convert(run_dir, f'--out={taken}'), f'--out={taken} exists; choose a new directory')
  _error(_convert(run_dir, f'--out={tmp_path / "file"}'), 'exists', '(it is a file)')
  assert _files(tmp_path) == before and _files(run_dir) == run_before


def test_convert_an_output_inside_the_run_checkpoints_is_refused(run_dir):
  before = _files(run_dir)
  out = run_dir / 'checkpoints' / 'int8'
  _error(_convert(run_dir, f'--out={out}'), f"--out={out} is inside the run's checkpoints/",
         f'e.g. {run_dir / "int8"}')
  assert _files(run_dir) == before


def test_convert_an_output_under_a_file_is_refused(run_dir, tmp_path):
  (tmp_path / 'file').write_text('x')
  before = _files(tmp_path)
  _error(_convert(run_dir, f'--out={tmp_path / "file" / "int8"}'), 'cannot be created',
         f'{tmp_path / "file"} is not a directory')
  assert _files(tmp_path) == before


@pytest.mark.parametrize('flags,fragments', [
    (['--timing_steps=0'], ['--timing_steps=0 is invalid; valid: a positive number']),
    (['--config.quant.activations=static', '--config.quant.calibration_batches=0'],
     ['quant.calibration_batches=0 is invalid; valid: >= 1']),
    (['--config.quant.activations=lsq'], ["quant.activations='lsq' is invalid for PTQ",
                                          "valid: 'static' or 'dynamic'"]),
])
def test_convert_bad_calibration_settings_create_nothing(run_dir, flags, fragments):
  before = _files(run_dir)
  _error(_convert(run_dir, *flags), *fragments)
  assert _files(run_dir) == before  # in particular no <run>/int8


def test_convert_with_another_config_than_the_run_names_the_fields(run_dir):
  before = _files(run_dir)
  _error(_convert(run_dir, '--config.peft.method=ia3'), 'peft.method', "'lora'", "'ia3'")
  assert _files(run_dir) == before


# ================================================================= peftjax.export

def _export(*flags):
  return _run('peftjax.export', *flags)


def test_export_a_missing_adapter_creates_nothing(tmp_path):
  _error(_export(f'--adapter={tmp_path / "nope.safetensors"}', f'--out={tmp_path / "hf"}'),
         f"--adapter='{tmp_path / 'nope.safetensors'}' does not exist")
  assert list(tmp_path.iterdir()) == []


def test_export_an_existing_output_is_left_intact(run_dir, tmp_path):
  adapter = run_dir / 'adapter.safetensors'
  (tmp_path / 'file').write_text('a file')
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'config.json').write_text('{}')
  before = _files(tmp_path)
  _error(_export(f'--adapter={adapter}', f'--out={tmp_path / "file"}'),
         'exists and is not a directory')
  _error(_export(f'--adapter={adapter}', f'--out={tmp_path / "full"}'),
         'exists and is not empty', 'pass --overwrite')
  _error(_export(f'--adapter={adapter}', '--out='), "--out='' is empty")
  assert _files(tmp_path) == before


def test_export_unknown_format(run_dir, tmp_path):
  _error(_export(f'--adapter={run_dir / "adapter.safetensors"}', f'--out={tmp_path / "hf"}',
                 '--format=onnx'), '--format=onnx', 'merged|peft')
  assert list(tmp_path.iterdir()) == []


def test_export_overwrite_of_the_directory_holding_the_adapter_is_refused(run_dir, tmp_path):
  run = tmp_path / 'run'
  run.mkdir()
  shutil.copy(run_dir / 'adapter.safetensors', run / 'adapter.safetensors')
  before = _files(tmp_path)
  _error(_export(f'--adapter={run / "adapter.safetensors"}', f'--out={run}', '--overwrite'),
         f"--out='{run}' holds the --adapter=", 'would delete the source')
  assert _files(tmp_path) == before


# ================================================================= experiments.sweep

def _sweep(*flags):
  return _run('experiments.sweep', *flags)


def _config(tmp_path, body: str) -> pathlib.Path:
  path = tmp_path / 'study.py'
  path.write_text('from configs import tiny\n\n\ndef get_config(arg=None):\n'
                  '  return tiny.get_config()\n\n\n' + body)
  return path


def test_sweep_config_with_a_syntax_error(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n  pass\n')
  _error(_sweep(f'--config={bad}', f'--workdir={tmp_path / "sw"}'),
         f'--config={bad}: syntax error at line 1')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['bad.py']


@pytest.mark.parametrize('flags,fragments', [
    (['--parallel=abc'], ["argument --parallel: invalid int value: 'abc'"]),
    (['--parallel=0'], ['--parallel=0 is invalid; valid: >= 1']),
    (['--config.train.stesp=2'], ["--config.train.stesp: unknown field 'stesp' in section "
                                  "'train' (did you mean 'steps'?)"]),
    (['--config.train.steps=x'], ['--config.train.steps=x', 'valid: an integer']),
    (['--fersh'], ["a flag passed to every run: Unknown command line flag 'fersh'",
                   'Did you mean: fresh']),
    (['--config.peft.lora.rank=16'], ['--config.peft.lora.rank is set per run by sweep()']),
    (['stray'], ["unexpected arguments ['stray']"]),
])
def test_sweep_bad_arguments_are_refused_before_any_run(tmp_path, flags, fragments):
  _error(_sweep(f'--config={TINY}', f'--workdir={tmp_path / "sw"}', *flags), *fragments)
  assert list(tmp_path.iterdir()) == []  # no sweep directory, no run directory


def test_sweep_unknown_config_variant(tmp_path):
  _error(_sweep(f'--config={TINY}:nosuch', f'--workdir={tmp_path / "sw"}'),
         f"--config={TINY}:nosuch", "unknown variant 'nosuch'")
  assert list(tmp_path.iterdir()) == []


def test_sweep_argument_its_sweep_cannot_read(tmp_path):
  config = _config(tmp_path, 'def sweep(add, arg=None):\n'
                             '  for seed in range(int(arg or 2)):\n'
                             '    add(seed=seed)\n')
  _error(_sweep(f'--config={config}:many', f'--workdir={tmp_path / "sw"}'),
         f"--config={config}:many: sweep(add, 'many') raised ValueError")
  assert sorted(p.name for p in tmp_path.iterdir()) == ['study.py']


def test_sweep_a_bad_run_is_named_with_its_field_before_any_run_starts(tmp_path):
  config = _config(tmp_path, 'def sweep(add, arg=None):\n'
                             "  add(**{'peft.lora.rank': 4})\n"
                             "  add(**{'peft.lora.rank': 0})\n"
                             "  add(**{'peft.lora.rnak': 8})\n")
  _error(_sweep(f'--config={config}', f'--workdir={tmp_path / "sw"}'),
         "run 'peft.lora.rank=0' (2 of 3",
         'config.peft.lora.rank=0 is invalid; valid: a positive integer')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['study.py']
  config.write_text(config.read_text().replace("  add(**{'peft.lora.rank': 0})\n", ''))
  _error(_sweep(f'--config={config}', f'--workdir={tmp_path / "sw"}', '--dry_run'),
         "run 'peft.lora.rnak=8' (2 of 2", "--config.peft.lora.rnak: unknown field 'rnak'",
         "did you mean 'rank'")
  assert sorted(p.name for p in tmp_path.iterdir()) == ['study.py']


def test_sweep_workdir_that_is_a_file(tmp_path):
  (tmp_path / 'sw').write_text('not a directory')
  _error(_sweep(f'--config={TINY}', f'--workdir={tmp_path / "sw"}'),
         f"--workdir='{tmp_path / 'sw'}' is a file")
  assert (tmp_path / 'sw').read_text() == 'not a directory'


def test_sweep_failed_runs_are_listed_with_their_reason_and_counted(tmp_path):
  """A run that fails for a reason no up-front check sees (here --fresh refusing to clear a run
  directory holding someone's file): its last error line is printed as it ends, and the final
  line counts exactly the runs it lists."""
  config = _config(tmp_path, 'def sweep(add, arg=None):\n'
                             '  add(seed=0)\n'
                             '  add(seed=1)\n')
  root = tmp_path / 'sw'
  (root / 'seed=0').mkdir(parents=True)
  (root / 'seed=0' / 'summary.json').write_text(json.dumps({'accuracy_after': 0.5}))  # finished
  (root / 'seed=1').mkdir()
  (root / 'seed=1' / 'notes.txt').write_text('mine')
  proc = _sweep(f'--config={config}', f'--workdir={root}', '--fresh', '--compilation_cache=')
  log = (root / 'seed=1' / 'sweep.log').read_text()
  reason = [l.strip() for l in log.splitlines() if l.strip()][-1]
  assert 'notes.txt' in reason  # the run's own one-line refusal
  assert '2 runs, 1 already finished, 1 to run' in proc.stdout
  assert f'FAILED (exit 1): seed=1: {reason}' in proc.stdout
  _error(proc, 'error: 1 of 2 runs did not finish: seed=1 (')
  assert (root / 'seed=1' / 'notes.txt').read_text() == 'mine'
  records = json.loads((root / 'results.json').read_text())
  assert [r['run'] for r in records] == ['seed=0', 'seed=1']
  assert records[1]['accuracy_after'] is None


def test_pod_sweep_plan_validates_the_overrides_once(tmp_path):
  proc = _run('experiments.pod_sweep', 'plan', f'--config={TINY}', f'--workdir={tmp_path / "sw"}',
              '--slices=tpu-a', '--', '--config.train.stesp=2')
  _error(proc, "--config.train.stesp: unknown field 'stesp'")
  assert proc.stdout == '' and list(tmp_path.iterdir()) == []
