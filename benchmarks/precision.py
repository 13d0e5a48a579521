"""Mixed precision and rematerialization: bf16 step time and remat peak memory, as ratios.

The quickstart model (MiniLM-L6 + a 2-class head, LoRA r=8 on query/value) on a batch of 32
Rotten Tomatoes reviews x 64 tokens. Every candidate is the trainer's own jitted, donated step
(``step.make_train_step``, built as ``benchmarks/lora_vs_full.py`` builds it) with AdamW and
dropout 0.1; only the config differs:

* f32: ``configs/quickstart.py`` as is (``dtype='float32'``, ``model.remat='none'``);
* bf16: ``--config.dtype=bfloat16`` (bf16 matmuls and activations; float32 parameters,
  trainable partition, optimizer state and loss);
* remat: ``--config.model.remat=<policy>`` (float32), for each policy in ``--remat``.

All steps are compiled first; peak memory comes from XLA's memory analysis of those executables
(deterministic, not timed). The f32 and bf16 steps (and the remat steps, for their time cost)
are then timed interleaved, f32/bf16/remat.../f32/..., after a warm-up; the figures are medians.

  python benchmarks/precision.py            # writes benchmarks/results/precision.json
  python benchmarks/precision.py --quick    # smoke test: 2 layers, 3 steps, prints JSON only
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import platform
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.lora_vs_full import build_candidate  # noqa: E402
from benchmarks.lora_vs_full import make_batch  # noqa: E402
from configs import quickstart  # noqa: E402
from peftjax import data as data_lib  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax import timing  # noqa: E402
from peftjax import tree as tree_lib  # noqa: E402
from peftjax.models.bert import REMAT_POLICIES  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'precision.json'
TARGETS = {'bf16_step_time_ratio': ('<=', 0.9), 'remat_peak_memory_ratio': ('<=', 0.7)}


def _config(args, dtype: str = 'float32', remat: str = 'none'):
  c = quickstart.get_config()
  c.train.batch_size, c.data.max_length = args.batch, args.length
  if args.layers:
    c.model.num_layers = args.layers
  c.dtype, c.model.remat = dtype, remat
  return c


def _candidate(c, batch) -> dict:
  built = models.build(c.model, num_classes=2, pretrained_dir=str(data_lib.minilm_dir()),
                       seed=c.seed, dtype=c.dtype)
  cand = build_candidate(c, built, batch)
  cand['num_layers'] = built.module.cfg.num_layers
  cand['hlo'] = hlo_summary(cand['compiled'].as_text())
  return cand


def hlo_summary(text: str) -> dict:
  """What the optimized HLO computes matrix products in: counts of ``dot`` instructions (and
  of oneDNN/YNNPACK matmul custom calls or fusions) by result element type, and of ``convert``
  instructions by (operand -> result) type, e.g. ``'bf16->f32'``.

  Shows whether XLA CPU keeps bf16 dots in bf16 or converts them to f32 around the product.
  """
  dots, converts = collections.Counter(), collections.Counter()
  shapes = {}
  for line in text.splitlines():
    m = re.match(r'\s*(?:ROOT )?(%?[\w.\-]+) = (\w+)\[', line)
    if not m:
      continue
    name, dtype = m.group(1).lstrip('%'), m.group(2)
    shapes[name] = dtype
    if re.search(r'\bdot\(', line) or re.search(r'matmul|ynn', line, re.I) and 'custom' in line:
      dots[dtype] += 1
    c = re.search(r'\bconvert\((?:\w+\[[^\]]*\]\{?[^ ]*\}? )?%?([\w.\-]+)\)', line)
    if c:
      src = shapes.get(c.group(1).lstrip('%'), '?')
      converts[f'{src}->{dtype}'] += 1
  return {'dots_by_result_type': dict(dots), 'converts': dict(converts)}


def run(args) -> dict:
  policies = [p for p in args.remat.split(',') if p]
  bad = [p for p in policies if p not in REMAT_POLICIES or p == 'none']
  if bad:
    raise SystemExit(f'--remat={args.remat!r}: {bad} invalid; valid: '
                     f'{", ".join(p for p in REMAT_POLICIES if p != "none")}')
  batch = make_batch(_config(args), args.batch)

  # ------------------------------------------------------------------ compile every step
  cands = {'f32': _candidate(_config(args), batch),
           'bf16': _candidate(_config(args, dtype='bfloat16'), batch)}
  for p in policies:
    cands[f'remat_{p}'] = _candidate(_config(args, remat=p), batch)
  runners = {k: timing.DonatingStepper(c['compiled'], c['state'], c['frozen'], batch)
             for k, c in cands.items()}

  # ------------------------------------------------------------------ timing, interleaved
  load_before = os.getloadavg()
  times = timing.interleaved(runners, steps=args.steps, warmup=args.warmup)
  load_after = os.getloadavg()
  # Master weights: after the timed steps the bf16 run's trainable state is still float32.
  bf16_state = runners['bf16'].state
  master_dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(
      {'params': bf16_state.params, 'opt_state': bf16_state.opt_state})
      if np.issubdtype(x.dtype, np.floating)})

  ms = {k: timing.median_ms(t) for k, t in times.items()}
  peak = {k: c['memory']['peak'] for k, c in cands.items()}
  head = policies[0]
  result = {
      'bf16_step_time_ratio': ms['bf16'] / ms['f32'],
      'remat_peak_memory_ratio': peak[f'remat_{head}'] / peak['f32'],
      'remat_policy': head,
      'f32_step_ms': ms['f32'],
      'bf16_step_ms': ms['bf16'],
      'f32_peak_bytes': peak['f32'],
      'remat_peak_bytes': peak[f'remat_{head}'],
  }
  result['meets_targets'] = {k: timing.meets(result[k], t) for k, t in TARGETS.items()}
  result['details'] = {
      'paired_bf16_step_time_ratio': timing.paired_ratio(times['bf16'], times['f32']),
      'steps': {k: timing.spread(t) for k, t in times.items()},
      'memory_bytes': {k: c['memory'] for k, c in cands.items()},
      # Without the arguments (parameters, optimizer state, batch), which remat cannot change.
      'temp_bytes_ratio': {f'remat_{p}': cands[f'remat_{p}']['memory']['temp'] /
                           cands['f32']['memory']['temp'] for p in policies},
      'peak_memory_ratio': {f'remat_{p}': peak[f'remat_{p}'] / peak['f32'] for p in policies},
      'step_time_ratio_vs_f32': {k: ms[k] / ms['f32'] for k in ms if k != 'f32'},
      'bf16_peak_memory_ratio': peak['bf16'] / peak['f32'],
      'gflops_per_step': {k: timing.cost_flops(c['compiled']) / 1e9 for k, c in cands.items()},
      'hlo': {k: cands[k]['hlo'] for k in ('f32', 'bf16')},
      'bf16_master_dtypes': master_dtypes,
      'trainable_params': cands['f32']['size']['trainable_params'],
      'compile_s': {k: c['compile_s'] for k, c in cands.items()},
      'load_average_before': list(load_before),
      'load_average_after': list(load_after),
  }
  c = _config(args)
  result['settings'] = {
      'model': 'all-MiniLM-L6-v2 + 2-class head',
      'num_layers': cands['f32']['num_layers'],
      'batch_size': args.batch,
      'max_length': args.length,
      'peft': {'method': c.peft.method,
               **{k: c.peft.lora[k] for k in ('rank', 'alpha', 'dropout', 'targets')}},
      'dropout_rate': c.model.dropout_rate,
      'grad_barrier': c.model.grad_barrier,
      'remat_policies': policies,
      'frozen_base_dtype': 'float32 (cast to the compute dtype inside the step)',
      'timed_steps': args.steps,
      'timing_warmup_steps': args.warmup,
      'order': 'interleaved ' + '/'.join(cands),
      'quick': args.quick,
      'jax': jax.__version__,
      'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind,
      'cpu_count': os.cpu_count(),
      'machine': platform.machine(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  return result




def report(r: dict) -> str:
  d, s = r['details'], r['settings']
  mib = lambda b: b / 2**20
  rows = [['f32 step', d['steps']['f32']['median_ms'], mib(d['memory_bytes']['f32']['peak']),
           mib(d['memory_bytes']['f32']['temp']), 1.0, 1.0]]
  for k in d['steps']:
    if k == 'f32':
      continue
    m = d['memory_bytes'][k]
    rows.append([f'{k} step', d['steps'][k]['median_ms'], mib(m['peak']), mib(m['temp']),
                 d['step_time_ratio_vs_f32'][k], m['peak'] / d['memory_bytes']['f32']['peak']])
  table = timing.format_table(rows, ['', 'median ms', 'peak MiB', 'temp MiB', 'time / f32',
                                     'peak / f32'])
  return '\n'.join([
      f"LoRA r={s['peft']['rank']} q/v, {s['num_layers']} layers, batch {s['batch_size']} x "
      f"{s['max_length']}, {s['timed_steps']} interleaved steps each ({s['backend']}, "
      f"jax {s['jax']}; load {d['load_average_before'][0]:.1f} -> "
      f"{d['load_average_after'][0]:.1f})",
      table,
      f"bf16_step_time_ratio {r['bf16_step_time_ratio']:.3f} "
      f"({timing.target_note('bf16_step_time_ratio', r, TARGETS)}; paired {d['paired_bf16_step_time_ratio']:.3f})",
      f"remat_peak_memory_ratio {r['remat_peak_memory_ratio']:.3f} (policy "
      f"{r['remat_policy']!r}; {timing.target_note('remat_peak_memory_ratio', r, TARGETS)})",
      f"bf16 trainable + optimizer state dtypes after the steps: {d['bf16_master_dtypes']}",
      f"bf16 HLO: {d['hlo']['bf16']}",
  ])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=30, help='timed steps per candidate (>= 20)')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps per candidate')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--length', type=int, default=64)
  p.add_argument('--layers', type=int, default=0, help='encoder layers kept; 0 = all (6)')
  p.add_argument('--remat', default='full,dots',
                 help='remat policies compared with none; the first is the headline figure')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: 2 layers, batch 8, 3 steps; prints, writes only --out')
  p.add_argument('--out', default=None,
                 help=f'JSON output path (default {RESULTS.relative_to(ROOT)}; none with --quick)')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup = min(args.steps, 3), 1
    args.layers, args.batch = args.layers or 2, min(args.batch, 8)
  elif args.steps < 20:
    p.error(f'--steps={args.steps}; the figures are medians over at least 20 steps '
            '(use --quick for a smoke test)')
  return timing.run_and_publish(run, report, args, RESULTS)


if __name__ == '__main__':
  main()
