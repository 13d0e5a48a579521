"""Sweeps: pure expansion, resumable local runs, one collected table."""
import json
import pathlib

import pytest

from experiments import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'configs' / 'tiny.py')
FAST = ['--config.train.steps=2', '--config.optim.warmup_steps=0', '--config.train.eval_before=False']


def test_expand_is_pure_and_ordered():
  runs = sweep.expand(TINY)
  assert runs == [{'peft.method': 'lora', 'peft.lora.rank': r, 'seed': s}
                  for r in (2, 4) for s in (0, 1)]
  assert sweep.expand(TINY) == runs
  assert sweep.run_name(runs[1]) == 'peft.lora.rank=2,peft.method=lora,seed=1'
  assert len(sweep.expand(str(ROOT / 'configs' / 'quickstart.py'))) == 9


def test_command_line_of_a_run(tmp_path):
  cmd = sweep.command('configs/tiny.py', tmp_path, {'peft.lora.rank': 2, 'peft.method': 'ia3'})
  assert cmd[1:] == ['-m', 'peftjax.main', '--config=configs/tiny.py', f'--workdir={tmp_path}',
                     '--config.peft.lora.rank=2', '--config.peft.method=ia3',
                     '--config.train.progress=False']


def test_config_without_sweep_is_an_error():
  with pytest.raises(sweep.SweepError, match='defines no sweep'):
    sweep.expand(str(ROOT / 'configs' / 'bitfit.py'))


def test_sweep_runs_collects_and_resumes(tmp_path):
  records = sweep.main([f'--config={TINY}', f'--workdir={tmp_path}', '--parallel=2', *FAST])
  assert [r['run'] for r in records] == [sweep.run_name(r) for r in sweep.expand(TINY)]
  assert all(0 <= r['accuracy_after'] <= 1 for r in records)
  # One layer, query and value: rank 4 has (384 + 384) x 2 more LoRA parameters per kernel.
  by_rank = {r['overrides']['peft.lora.rank']: r['trainable_params'] for r in records}
  assert by_rank[4] - by_rank[2] == 2 * (384 * 2 + 2 * 384)
  md = (tmp_path / 'results.md').read_text()
  assert md.count('\n') == 2 + 4 and 'accuracy_after' in md and '| 4 | lora | 1 |' in md
  assert json.loads((tmp_path / 'results.json').read_text()) == records
  # A second call finds every run finished and runs nothing.
  logs = []
  again = sweep.run_all(TINY, str(tmp_path), sweep.expand(TINY), log=logs.append)
  assert logs == ['4 runs, 4 already finished, 0 to run'] and again == records
