"""Two adapters trained on the real data, served together: does a mixed batch reproduce each run?

  python -m experiments.serving.demo --workdir=/tmp/peftjax_serving

1. Trains (or reuses, if finished) two adapters over the bundled MiniLM-L6 on Rotten Tomatoes:
   LoRA r=8 (configs/quickstart.py) and IA3 (lr 1e-2, as in the method comparison), each saving
   ``adapter.safetensors``.
2. Writes the test split as a JSONL of requests, alternating the two adapters line by line, and
   labels it with ``peftjax.predict`` (every batch holds both adapters).
3. Scores each adapter's lines, and the whole test split with each adapter, against the labels,
   and compares with the accuracy each training run reported on the test split.

Writes ``results.md`` and ``results.json`` beside this file.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

RUNS = {
    'lora': ['--config=configs/quickstart.py'],
    'ia3': ['--config=configs/quickstart.py', '--config.peft.method=ia3',
            '--config.optim.learning_rate=1e-2'],
}


def train(workdir: pathlib.Path) -> dict[str, dict]:
  """Each run's summary (runs that finished earlier are reused)."""
  out = {}
  for name, args in RUNS.items():
    wd = workdir / name
    if not (wd / 'summary.json').exists():
      subprocess.run([sys.executable, '-m', 'peftjax.main', *args, f'--workdir={wd}',
                      '--config.train.save_adapter=True', '--config.train.progress=False'],
                     check=True, cwd=ROOT)
    out[name] = json.loads((wd / 'summary.json').read_text())
  return out


def test_split():
  """``(texts, labels)`` of the test split the runs were scored on."""
  from configs import quickstart
  from peftjax import data as data_lib
  cfg = quickstart.get_config()
  src = data_lib.load_source(cfg.data.name, cfg.data.test_split)
  records = src.__getitems__(list(range(len(src))))
  texts = [r['text'].decode() if isinstance(r['text'], bytes) else r['text'] for r in records]
  return texts, [int(r['label']) for r in records]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', default='/tmp/peftjax_serving')
  args = p.parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  summaries = train(workdir)
  from peftjax import delta
  from peftjax import predict
  texts, labels = test_split()
  names = list(RUNS)
  specs = [f'{n}={workdir / n / "adapter.safetensors"}' for n in names]
  results = {}
  # Alternating adapters (every batch mixed), then each adapter on the whole split.
  plans = {'mixed': [names[i % 2] for i in range(len(texts))],
           **{f'all_{n}': [n] * len(texts) for n in names}}
  for plan, assign in plans.items():
    req = workdir / f'{plan}.jsonl'
    req.write_text(''.join(json.dumps({'text': t, 'adapter': a}) + '\n'
                           for t, a in zip(texts, assign)))
    s = predict.run(specs, str(req), str(workdir / f'{plan}_predictions.jsonl'), progress=False)
    preds = [json.loads(l) for l in (workdir / f'{plan}_predictions.jsonl').read_text()
             .splitlines()]
    for n in names:
      rows = [(p, y) for p, y in zip(preds, labels) if p['adapter'] == n]
      classes = delta.read_manifest(workdir / n / 'adapter.safetensors')['class_names']
      correct = sum(classes.index(p['label']) == y for p, y in rows)
      results.setdefault(plan, {})[n] = {'examples': len(rows),
                                         'accuracy': correct / max(len(rows), 1)}
    results[plan]['compiles'] = s['compiles']
  # Per line: does the mixed batch give exactly what that adapter gives alone?
  read = lambda plan: [json.loads(l) for l in (workdir / f'{plan}_predictions.jsonl')
                       .read_text().splitlines()]
  mixed, alone = read('mixed'), {n: read(f'all_{n}') for n in names}
  agree = {n: {'labels_equal': 0, 'max_abs_prob_diff': 0.0} for n in names}
  for i, p in enumerate(mixed):
    q = alone[p['adapter']][i]
    a = agree[p['adapter']]
    a['labels_equal'] += p['label'] == q['label']
    a['max_abs_prob_diff'] = max(a['max_abs_prob_diff'],
                                 max(abs(p['probs'][c] - q['probs'][c]) for c in p['probs']))
  table = {n: {'run_test_accuracy': summaries[n]['accuracy_after'],
               'served_alone_accuracy': results[f'all_{n}'][n]['accuracy'],
               'served_mixed_accuracy_on_its_lines': results['mixed'][n]['accuracy'],
               'mixed_lines_equal_to_alone': agree[n]['labels_equal'],
               'mixed_max_abs_prob_diff_vs_alone': agree[n]['max_abs_prob_diff'],
               'adapter_file_bytes': summaries[n]['adapter']['file_bytes'],
               'adapter_to_base_bytes': summaries[n]['adapter']['adapter_to_base_bytes']}
           for n in names}
  out = {'adapters': table, 'plans': results, 'test_examples': len(texts)}
  (HERE / 'results.json').write_text(json.dumps(out, indent=2) + '\n')
  lines = ['# Two adapters served together (Rotten Tomatoes test split, '
           f'{len(texts)} reviews)', '',
           'Written by `python -m experiments.serving.demo`. `served alone`: the whole test split '
           'through `peftjax.predict` with one adapter; `mixed`: lines alternate between the two '
           'adapters, so every batch of 64 holds both, and each adapter is scored on its own half.',
           '', '| adapter | run test accuracy | served alone | mixed (its half) | mixed lines with '
           'the label served alone gives | max abs prob diff | file bytes | of base |',
           '|---|---|---|---|---|---|---|---|']
  for n, r in table.items():
    lines.append(f"| {n} | {r['run_test_accuracy']:.4f} | {r['served_alone_accuracy']:.4f} | "
                 f"{r['served_mixed_accuracy_on_its_lines']:.4f} | "
                 f"{r['mixed_lines_equal_to_alone']} / {results['mixed'][n]['examples']} | "
                 f"{r['mixed_max_abs_prob_diff_vs_alone']:.1e} | {r['adapter_file_bytes']:,d} | "
                 f"{100 * r['adapter_to_base_bytes']:.2f}% |")
  (HERE / 'results.md').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
