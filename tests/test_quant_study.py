"""The int8 study: its sweep, which conversions each variant gets, and the aggregated table."""
import json

import numpy as np

from experiments import sweep
from experiments.quantization import config as study
from experiments.quantization import study as runner


def test_sweep_covers_both_models_and_every_seed():
  runs = sweep.expand(runner.CONFIG)
  assert len(runs) == (len(study.TEXT) + len(study.MNIST)) * 3
  assert sum(r.get('model.name') == 'cnn' for r in runs) == 2 * 3
  assert sum(bool(r.get('quant.qlora')) for r in runs) == 3


def test_conversions_per_variant():
  tags = lambda v, m: [t for _, _, t in runner.conversions(v, m)]
  assert tags('float32', 'MiniLM') == ['int8-minmax', 'int8-percentile']
  assert tags('QLoRA', 'MiniLM') == ['int8-dynamic']
  assert runner.conversions('float32', 'MiniLM')[0][1]['quant.embeddings'] is True
  assert 'quant.embeddings' not in runner.conversions('QAT int8', 'CNN / MNIST-5k')[0][1]
  c = runner.run_config({**study.MNIST['QAT int8'], 'seed': 2})
  assert (c.model.name, c.quant.qat, c.quant.targets, c.seed) == ('cnn', True, 'kernel$', 2)


def _write(path, obj):
  path.mkdir(parents=True, exist_ok=True)
  (path / ('ptq_summary.json' if 'int8' in obj else 'summary.json')).write_text(json.dumps(obj))


def test_rows_aggregate_runs_and_conversions(tmp_path):
  model = 'CNN / MNIST-5k'
  for seed, (acc, qacc) in enumerate([(0.90, 0.89), (0.92, 0.90), (0.94, 0.91)]):
    d = tmp_path / sweep.run_name({**study.MNIST['float32'], 'seed': seed})
    _write(d, {'accuracy_after': acc, 'wall_seconds': 60.0})
    _write(d / 'int8-minmax', {'int8': {'accuracy': qacc}, 'int8_bytes': 250, 'float_bytes': 1000,
                               'infer_time_ratio': 0.5 + seed / 10, 'activations': 'static'})
  table = runner.rows(tmp_path)
  rows = {r['variant']: r for r in table if r['model'] == model}
  assert np.isclose(rows['float32']['acc_mean'], 0.92) and rows['float32']['bytes'] == 1000
  ptq = rows['PTQ int8, min/max calibration']
  assert np.isclose(ptq['delta_vs_float'], -2.0) and ptq['bytes_ratio'] == 0.25
  assert np.isclose(ptq['time_ratio'], 0.6)  # the median over seeds
  md = runner.markdown(table, 3.0)
  assert '| PTQ int8, min/max calibration | 0.9000 ± 0.0082 (n=3) | -2.00 | 250 | 0.250 | 0.60 |' in md
