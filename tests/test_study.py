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


# ---------------------------------------------------------------------------- the LM study

LM_CONFIG = 'experiments/lm_methods/config.py'


def test_lm_study_covers_every_method_seed_and_task():
  from experiments.lm_methods import config as lm_study
  runs = sweep.expand(LM_CONFIG)
  assert len(runs) == 10 * 3 * 2 and len({sweep.run_name(r) for r in runs}) == 60
  assert {r['peft.method'] for r in runs} == {'full', 'lora', 'dora', 'pissa', 'ia3', 'adapter',
                                               'prompt', 'prefix'}
  assert {r['data.name'] for r in runs} == {'rt_instructions', 'word_reverse'}
  pilot = sweep.expand(LM_CONFIG, 'pilot=1')
  assert len(pilot) == sum(len(v) for v in lm_study.PILOT.values()) == 20
  assert {r['seed'] for r in pilot} == {0} and all('data.name' not in r for r in pilot)
  c = lm_study.get_config('pilot=1,steps=20')
  assert c.data.eval_split == 'validation' and c.train.steps == 20
  assert lm_study.get_config().data.eval_split == ''  # the study itself: no validation pass
  assert len(sweep.expand(LM_CONFIG, 'tasks=rt')) == 30


def test_lm_report_aggregates_seeds_per_task(tmp_path):
  from experiments.lm_methods import config as lm_study
  from experiments.lm_methods import report as lm_report

  def fake(overrides, em, params):
    d = tmp_path / sweep.run_name(overrides)
    d.mkdir(parents=True)
    (d / 'summary.json').write_text(json.dumps({
        'exact_match_after': em, 'trainable_params': params, 'total_params': 134_515_008,
        'wall_seconds': 60.0}))

  for seed, em in zip(lm_study.SEEDS, (0.80, 0.82, 0.84)):
    fake({**lm_study.METHODS['LoRA'], 'data.name': 'rt_instructions', 'seed': seed}, em,
         921_600)
  fake({**lm_study.METHODS['LoRA'], 'data.name': 'word_reverse', 'seed': 0}, 0.25, 921_600)
  speed = tmp_path / 'speed.json'
  speed.write_text(json.dumps({'methods': {'LoRA': {'step_time_vs_full': 0.5,
                                                    'decode_tokens_per_s_b16': 300.0}}}))
  out = tmp_path / 'out'
  table = lm_report.main([f'--workdir={tmp_path}', f'--out={out}', f'--speed={speed}'])
  (lora,) = table
  assert np.isclose(lora['tasks']['rt']['mean'], 0.82)
  assert lora['tasks']['reverse']['seeds'] == 1 and lora['adapter_bytes'] == 4 * 921_600
  text = (out / 'results.md').read_text()
  assert ('| LoRA | 921,600 | 0.685 | 3,686,400 | 0.8200 ± 0.0163 (n=3) | '
          '0.2500 ± 0.0000 (n=1) | 0.50 | 300.0 |') in text
  assert '4 runs, 4 minutes' in text and (out / 'pareto.png').stat().st_size > 1000
