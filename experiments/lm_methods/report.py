"""Tables and the Pareto plot of the LM method study, from its sweep workdir (and speed.json).

  python -m experiments.lm_methods.report --workdir=experiments/lm_methods/runs
  python -m experiments.lm_methods.report --workdir=experiments/lm_methods/pilot --pilot

Writes ``results.md`` and ``pareto.png`` next to this file. Exact match is the generated
answer equal to the reference (``summary.json``'s ``exact_match_after``), mean ± std over the
seeds; step time vs full FT and decode tokens/s come from ``speed.json``
(:mod:`experiments.lm_methods.speed`, every method timed together in one process), not from
the runs, which shared the machine with other work.
"""
from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

from experiments import sweep
from experiments.lm_methods import config as study

HERE = pathlib.Path(__file__).resolve().parent
TASK_LABELS = {'rt': 'RT exact match', 'reverse': 'word reverse exact match'}


def task_rows(workdir: str, task: str) -> dict[str, dict]:
  """label -> {'mean', 'std', 'seeds', 'trainable_params', 'total_params', 'wall_seconds'}."""
  out = {}
  for label, overrides in study.METHODS.items():
    found = sweep.seed_runs(workdir, {**overrides, 'data.name': study.TASKS[task]}, study.SEEDS)
    if not found:
      continue
    em = np.array([s['exact_match_after'] for s, _ in found])
    out[label] = {'mean': float(em.mean()), 'std': float(em.std()), 'seeds': len(found),
                  'trainable_params': found[0][0]['trainable_params'],
                  'total_params': found[0][0]['total_params'],
                  'wall_seconds': float(sum(s['wall_seconds'] for s, _ in found))}
  return out


def rows(workdir: str, speed: dict | None) -> list[dict]:
  """One row per method: sizes, each task's exact match, speed (when measured)."""
  by_task = {t: task_rows(workdir, t) for t in study.TASKS}
  out = []
  for label in study.METHODS:
    cells = {t: by_task[t].get(label) for t in study.TASKS}
    some = next((c for c in cells.values() if c), None)
    if some is None:
      continue
    sp = (speed or {}).get('methods', {}).get(label, {})
    out.append({'method': label, 'trainable_params': some['trainable_params'],
                'percent_of_base': 100 * some['trainable_params'] / some['total_params'],
                'adapter_bytes': 4 * some['trainable_params'],  # the float32 trainable tree
                'tasks': cells, 'step_time_vs_full': sp.get('step_time_vs_full'),
                'decode_tokens_per_s_b16': sp.get('decode_tokens_per_s_b16')})
  return out


def _cell(c) -> str:
  return '—' if not c else f"{c['mean']:.4f} ± {c['std']:.4f} (n={c['seeds']})"


def _num(v, fmt) -> str:
  return '—' if v is None else format(v, fmt)


def markdown(table: list[dict]) -> str:
  head = ('| method | trainable params | % of base | adapter bytes | '
          + ' | '.join(TASK_LABELS[t] for t in study.TASKS)
          + ' | step time vs full FT | decode tok/s (b16) |\n|---|---|---|---|'
          + '---|' * len(study.TASKS) + '---|---|')
  lines = [head]
  for r in table:
    lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['percent_of_base']:.3f} | "
                 f"{r['adapter_bytes']:,} | "
                 + ' | '.join(_cell(r['tasks'][t]) for t in study.TASKS)
                 + f" | {_num(r['step_time_vs_full'], '.2f')} | "
                 f"{_num(r['decode_tokens_per_s_b16'], '.1f')} |")
  return '\n'.join(lines)


def pareto_plot(table: list[dict], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = [t for t in study.TASKS if any(r['tasks'][t] for r in table)]
  fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    same_x: dict[int, int] = {}
    for r in table:
      c = r['tasks'][task]
      if not c:
        continue
      ax.errorbar(r['trainable_params'], c['mean'], yerr=c['std'], fmt='o')
      k = same_x[r['trainable_params']] = same_x.get(r['trainable_params'], -1) + 1
      ax.annotate(r['method'], (r['trainable_params'], c['mean']), textcoords='offset points',
                  xytext=(6, 4 - 10 * k), fontsize=8)
    ax.set_xscale('log')
    ax.set_xlabel('trainable parameters (log)')
    ax.set_ylabel('test exact match')
    ax.set_title(f'SmolLM2-135M: {TASK_LABELS[task]}')
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def pilot_table(workdir: str) -> str:
  """The learning-rate pilot: validation exact match of each method at each rate tried."""
  lines = ['| method | learning rate | validation exact match |', '|---|---|---|']
  for label, rates in study.PILOT.items():
    for lr in rates:
      found = sweep.seed_runs(workdir, {**study.METHODS[label], 'optim.learning_rate': lr},
                              (0,))
      if found:
        s = found[0][0]
        lines.append(f"| {label} | {lr:g} | {s['validation']['exact_match']:.4f} |")
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='the sweep workdir')
  p.add_argument('--out', default=str(HERE), help='where results.md and pareto.png go')
  p.add_argument('--speed', default=str(HERE / 'speed.json'), help='speed.py results')
  p.add_argument('--pilot', action='store_true', help='print the learning-rate pilot table')
  args = p.parse_args(argv)
  if args.pilot:
    text = pilot_table(args.workdir)
    print(text)
    return text
  speed_path = pathlib.Path(args.speed)
  speed = json.loads(speed_path.read_text()) if speed_path.exists() else None
  table = rows(args.workdir, speed)
  if not table:
    raise SystemExit(f'error: no finished runs of the study in {args.workdir}')
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  runs = sum(c['seeds'] for r in table for c in r['tasks'].values() if c)
  minutes = sum(c['wall_seconds'] for r in table for c in r['tasks'].values() if c) / 60
  (out / 'results.md').write_text(
      '# LM method study: SmolLM2-135M-Instruct, exact match of generated answers\n\n'
      + markdown(table) + '\n\n'
      f'{runs} runs, {minutes:.0f} minutes of training and evaluation in total. '
      'Adapter bytes are the float32 trainable partition.\n')
  pareto_plot(table, out / 'pareto.png')
  print(markdown(table))
  return table


if __name__ == '__main__':
  main()
