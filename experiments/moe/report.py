"""The MoE study's table and expert-utilisation plot, from a finished sweep's workdir.

  python -m experiments.moe.report --workdir=/tmp/moe_study

Writes ``results.md`` and ``expert_utilisation.png`` next to this file. Utilisation is measured
by restoring each MoE run's final checkpoint (seed 0) and routing the whole test split through
it: the fraction of (real-token) assignments each expert of each MoE layer receives, before
capacity. The same is measured on the upcycled model before training, for contrast.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np

from experiments import sweep
from experiments.method_comparison.report import seed_summary
from experiments.moe import config as study
from peftjax import moe as moe_lib
from peftjax import peft
from peftjax import run

HERE = pathlib.Path(__file__).resolve().parent
NOTES = """
Notes:

- Upcycled MoE layers replace the FFN of layers 1, 3 and 5; every expert starts as a copy of the
  pretrained FFN, with a small random router. Top-k weights are renormalized to sum to 1, so at
  initialisation the MoE model computes exactly the dense one on every token that is not dropped
  over capacity (capacity factor 1.25: 4% of assignments on a real batch, see moe.json).
- With k=1 the renormalized weight is always 1, so the router learns from the balance and z
  losses only (the task loss does not reach it); with k=2 it gets the task gradient as soon as
  the experts differ.
- The sweep ran while other jobs (tests, the MoE benchmark) shared the 2 cores for its first
  half, so its wall time is inflated; the step-time column is measured separately (see above).
- The MoE step times are full fine-tuning of 1.5-2.1x the dense parameters (AdamW over every
  expert); LoRA on the experts of the E=8, k=2 model costs 0.97 of the dense full-FT step.
"""


def _last_train_metrics(run_dir: pathlib.Path) -> dict:
  logs = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
  return [m for m in logs if m['split'] == 'train'][-1]


def utilisation(overrides: dict, run_dir: pathlib.Path | None, batches: int = 0) -> dict:
  """``{moe layer path: (E,) fraction of assignments}`` over the test split.

  ``run_dir=None`` measures the upcycled model before training. ``batches > 0`` stops early.
  """
  c = sweep.apply_overrides(study.get_config(), overrides)
  if run_dir is None:
    setup = run.build_setup(c)
    params = {'base': setup.base(), 'peft': setup.trainable['peft']}
  else:
    setup, params = run.restore_trained(c, str(run_dir))
  built, method = setup.built, setup.method

  @jax.jit
  def loads(batch):
    inputs = {k: batch[k] for k in built.input_keys}
    _, aux = peft.apply(built.module, method, params['base'], params['peft'], inputs,
                        with_aux=True)
    stats = moe_lib.layer_stats(aux)
    real = (batch['attention_mask'] > 0).sum()
    return {layer: s['expert_load'] * real for layer, s in stats.items()}

  total: dict[str, np.ndarray] = {}
  for i, b in enumerate(setup.data.eval_batches(c.data.test_split, c.train.eval_batch_size)):
    if batches and i >= batches:
      break
    for layer, v in jax.device_get(loads(b)).items():
      total[layer] = total.get(layer, 0) + v
  return {layer: v / v.sum() for layer, v in sorted(total.items())}


def step_time_ratios(steps: int) -> dict[str, float]:
  """Each study run's train step / the dense full-FT step, timed in one process: every config's
  step compiled first, then ``steps`` calls of each interleaved, medians (the sweep's own step
  times come from separate processes at different moments of a shared machine)."""
  from benchmarks import lora_vs_full  # pylint: disable=g-import-not-at-top
  from peftjax import timing  # pylint: disable=g-import-not-at-top
  runners = {}
  for label, overrides in study.RUNS.items():
    c = sweep.apply_overrides(study.get_config(), {**overrides, 'seed': 0})
    setup = run.build_setup(c)
    batch = setup.data.train_batches(c.train.batch_size, c.seed)[0]
    cand = lora_vs_full.build_candidate(c, setup.built, batch)
    runners[label] = timing.DonatingStepper(cand['compiled'], cand['state'], cand['frozen'],
                                            batch)
    print(f'compiled: {label}', flush=True)
  times = timing.interleaved(runners, steps=steps)
  dense = timing.median_ms(times['dense, full FT'])
  return {label: timing.median_ms(t) / dense for label, t in times.items()}


def rows(workdir: str) -> list[dict]:
  """One row per study run: accuracy mean ± std over seeds, sizes, speed and routing figures."""
  out = []
  for label, overrides in study.RUNS.items():
    found = sweep.seed_runs(workdir, overrides, study.SEEDS)
    if not found:
      continue
    last = [_last_train_metrics(d) for _, d in found]
    moe = overrides.get('moe.num_experts', 0) > 0
    mean = lambda k: float(np.mean([m[k] for m in last])) if moe else None
    out.append({'run': label, 'overrides': overrides, 'dir': str(found[0][1]),
                **seed_summary(found), 'balance_loss': mean('balance_loss'),
                'dropped_fraction': mean('dropped_fraction')})
  dense = next((r for r in out if r['run'] == 'dense, full FT'), None)
  for r in out:
    r['step_time_vs_dense'] = r['step_seconds'] / dense['step_seconds'] if dense else None
  return out


def markdown(table: list[dict]) -> str:
  head = ('| run | params | trainable | test accuracy (mean ± std) | ECE | step time vs dense '
          'full FT | balance loss | dropped |\n|---|---|---|---|---|---|---|---|')
  fmt = lambda v, f: '—' if v is None else format(v, f)
  lines = [head]
  for r in table:
    lines.append(
        f"| {r['run']} | {r['total_params']:,} | {r['trainable_params']:,} | "
        f"{r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} (n={r['seeds']}) | "
        f"{r['ece_mean']:.3f} | {fmt(r['step_time_vs_dense'], '.2f')} | "
        f"{fmt(r['balance_loss'], '.3f')} | {fmt(r['dropped_fraction'], '.3f')} |")
  return '\n'.join(lines)


def utilisation_table(util: dict[str, dict]) -> str:
  lines = ['| model | layer | fraction of assignments per expert | max / uniform |',
           '|---|---|---|---|']
  for label, layers in util.items():
    for layer, v in layers.items():
      lines.append(f"| {label} | {layer.split('/')[1]} | {' '.join(f'{x:.3f}' for x in v)} | "
                   f'{v.max() * len(v):.2f} |')
  return '\n'.join(lines)


def plot(util: dict[str, dict], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(util)
  fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.4), squeeze=False, sharey=True)
  for ax, (label, layers) in zip(axes[0], util.items()):
    width = 0.8 / max(len(layers), 1)
    for j, (layer, v) in enumerate(layers.items()):
      ax.bar(np.arange(len(v)) + j * width, v, width, label=layer.split('/')[1])
    e = len(next(iter(layers.values())))
    ax.axhline(1.0 / e, color='k', lw=0.8, ls='--')
    ax.set_title(label, fontsize=8)
    ax.set_xlabel('expert')
    ax.set_xticks(np.arange(e) + 0.4 - width / 2, [str(i) for i in range(e)])
  axes[0][0].set_ylabel('fraction of assignments (test split)')
  axes[0][-1].legend(fontsize=7)
  fig.suptitle('Expert utilisation of the upcycled MiniLM-MoE (dashed: uniform)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='the sweep workdir')
  p.add_argument('--out', default=str(HERE), help='where results.md and the PNG go')
  p.add_argument('--batches', type=int, default=0, help='test batches for utilisation (0 = all)')
  p.add_argument('--time_steps', type=int, default=10,
                 help='interleaved steps per run for the step-time ratios (0 = from the logs)')
  args = p.parse_args(argv)
  table = rows(args.workdir)
  if not table:
    raise SystemExit(f'error: no finished runs of the study in {args.workdir}')
  if args.time_steps:
    ratios = step_time_ratios(args.time_steps)
    for r in table:
      r['step_time_vs_dense'] = ratios[r['run']]
  util = {}
  for r in table:
    if r['overrides'].get('moe.num_experts', 0) > 0 and r['run'].endswith('full FT'):
      if not util:  # the upcycled model before any training, for contrast
        util[r['run'].split(',')[0].replace('MoE ', '') + ', before training'] = utilisation(
            {**r['overrides'], 'seed': 0}, None, args.batches)
      util[r['run'].split(',')[0].replace('MoE ', '')] = utilisation(
          {**r['overrides'], 'seed': 0}, pathlib.Path(r['dir']), args.batches)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  minutes = sum(r['wall_seconds'] for r in table) / 60
  text = ('# MoE study: upcycled MiniLM-MoE on Rotten Tomatoes\n\n' + markdown(table) + '\n\n'
          f"{sum(r['seeds'] for r in table)} runs, {minutes:.0f} minutes of training and "
          'evaluation on this machine (2 CPU cores). '
          + (f'Step time: every run\'s train step timed in one process, {args.time_steps} '
             'interleaved calls each after compilation, medians, relative to the dense full-FT '
             'step. ' if args.time_steps else
             'Step time: the steady-state median of each run\'s logs (compilation excluded). ')
          + 'Balance loss (1.0 = uniform) and dropped fraction are the last logged training '
          'window.\n' + NOTES + '\n## Expert utilisation (test split, seed 0)\n\n'
          '![expert utilisation](expert_utilisation.png)\n\n' + utilisation_table(util) + '\n')
  (out / 'results.md').write_text(text)
  if util:
    plot(util, out / 'expert_utilisation.png')
  print(text)
  return table, util


if __name__ == '__main__':
  main()
