"""The MoE study: its sweep, the report's aggregation, and expert utilisation on the real model."""
import json

import numpy as np

from experiments import sweep
from experiments.moe import config as study
from experiments.moe import report
from peftjax import validate

CONFIG = 'experiments/moe/config.py'


def test_sweep_covers_every_run_and_seed_with_valid_configs():
  runs = sweep.expand(CONFIG)
  assert len(runs) == len(study.RUNS) * 3 == 21
  assert [r['seed'] for r in runs[:len(study.RUNS)]] == [0] * len(study.RUNS)  # seed-major
  experts = {(r['moe.num_experts'], r.get('moe.top_k')) for r in runs}
  assert experts == {(0, None), (4, 1), (4, 2), (8, 1), (8, 2)}
  for r in runs[:len(study.RUNS)]:
    c = sweep.apply_overrides(study.get_config(), r)
    validate.validate(c)
    assert (c.train.steps, c.data.max_length, c.moe.every) == (120, 48, 2)


def _fake_run(path, acc, params, moe: bool):
  path.mkdir(parents=True)
  (path / 'summary.json').write_text(json.dumps({
      'accuracy_after': acc, 'ece_after': 0.05, 'trainable_params': params,
      'total_params': params, 'wall_seconds': 60.0, 'config': {'train': {'batch_size': 32}}}))
  extra = {'balance_loss': 1.25, 'z_loss': 2.0, 'dropped_fraction': 0.04} if moe else {}
  lines = [{'step': s, 'split': 'train', 'examples_per_sec': 16.0, **extra} for s in (10, 20)]
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in lines))


def test_report_rows_aggregate_seeds(tmp_path):
  dense, moe = study.RUNS['dense, full FT'], study.RUNS['MoE E=8 k=2, full FT']
  for seed, acc in zip(study.SEEDS, (0.80, 0.81, 0.82)):
    _fake_run(tmp_path / sweep.run_name({**dense, 'seed': seed}), 0.80, 100, moe=False)
    _fake_run(tmp_path / sweep.run_name({**moe, 'seed': seed}), acc, 200, moe=True)
  table = report.rows(str(tmp_path))
  assert [r['run'] for r in table] == ['dense, full FT', 'MoE E=8 k=2, full FT']
  row = table[1]
  assert np.isclose(row['accuracy_mean'], 0.81) and row['seeds'] == 3
  assert row['balance_loss'] == 1.25 and row['dropped_fraction'] == 0.04
  assert table[0]['balance_loss'] is None and np.isclose(row['step_time_vs_dense'], 1.0)
  assert '| MoE E=8 k=2, full FT | 200 | 200 | 0.8100 ± 0.0082 (n=3)' in report.markdown(table)


def test_utilisation_of_the_upcycled_model_sums_to_one_per_layer():
  util = report.utilisation({**study.RUNS['MoE E=4 k=2, full FT'], 'seed': 0}, None, batches=1)
  assert list(util) == [f'encoder/layer_{i}/moe' for i in (1, 3, 5)]
  for v in util.values():
    assert v.shape == (4,) and np.isclose(v.sum(), 1.0) and (v > 0).all()
