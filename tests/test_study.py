"""The method-comparison study: its sweep covers every method x 3 seeds; the report aggregates."""
import json

import numpy as np

from experiments import sweep
from experiments.method_comparison import config as study
from experiments.method_comparison import report

CONFIG = 'experiments/method_comparison/config.py'


def test_sweep_covers_every_method_and_seed():
  runs = sweep.expand(CONFIG)
  assert len(runs) == 13 * 3
  methods = {r['peft.method'] for r in runs}
  assert methods == {'full', 'linear_probe', 'bitfit', 'lora', 'dora', 'pissa', 'ia3',
                     'adapter', 'prompt', 'prefix'}
  assert study.get_config('steps=50').train.steps == 50


def _fake_summary(path, acc, params, total, seconds):
  """A finished run: its summary, and a metrics log whose first window holds a slow compile."""
  path.mkdir(parents=True)
  (path / 'summary.json').write_text(json.dumps({
      'accuracy_after': acc, 'ece_after': 0.05, 'trainable_params': params, 'total_params': total,
      'train_seconds': 10 * seconds, 'wall_seconds': 12 * seconds, 'steps': 10,
      'config': {'train': {'batch_size': 32}}}))
  lines = [{'step': 1, 'split': 'train', 'examples_per_sec': 1.0}]  # compile: excluded
  lines += [{'step': s, 'split': 'train', 'examples_per_sec': 32 / seconds} for s in (2, 3, 4)]
  lines += [{'step': 4, 'split': 'test', 'accuracy': acc}]
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in lines))


def test_report_aggregates_seeds(tmp_path):
  for seed, acc in zip(study.SEEDS, (0.80, 0.82, 0.84)):
    _fake_summary(tmp_path / sweep.run_name({**study.METHODS['LoRA'], 'seed': seed}), acc,
                  74_498, 22_639_874, 7.0)
    _fake_summary(tmp_path / sweep.run_name({**study.METHODS['full FT'], 'seed': seed}), 0.83,
                  22_566_146, 22_566_146, 10.0)
  out = tmp_path / 'out'
  table = report.main([f'--workdir={tmp_path}', f'--out={out}'])
  lora = next(r for r in table if r['method'] == 'LoRA')
  assert np.isclose(lora['accuracy_mean'], 0.82) and np.isclose(lora['accuracy_std'],
                                                               np.std([0.80, 0.82, 0.84]))
  assert np.isclose(lora['step_time_vs_full'], 0.7) and lora['adapter_bytes'] == 4 * 74_498
  assert '| LoRA | 74,498 | 0.329 | 0.8200 ± 0.0163 (n=3)' in (out / 'results.md').read_text()
  assert (out / 'pareto.png').stat().st_size > 1000
  # 3 LoRA runs of 12 x 7 s and 3 full runs of 12 x 10 s wall time: 612 s.
  assert '6 runs, 10 minutes of training' in (out / 'results.md').read_text()
