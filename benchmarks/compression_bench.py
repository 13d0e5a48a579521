"""Compression: inference time of smaller models, and Deep Compression's size, as ratios.

The teacher is the quickstart model (MiniLM-L6 + a 2-class head) in eval mode on a batch of real
Rotten Tomatoes reviews. Every candidate is one jitted forward of a model this package makes:

* ``student``: the 3-layer student built from the teacher's layers 0, 2, 4
  (``distill.student_from_teacher``);
* ``heads_pruned_50``: 6 of 12 heads removed in every layer (``structured.prune_heads``, magnitude
  scores): a smaller model, not a masked one;
* ``svd_half_rank``: every FFN kernel (384 x 1536 and 1536 x 384) replaced by rank-192 SVD
  factors, run as two matmuls (``lowrank.factorize`` + ``lowrank.scope``).

All are compiled first, then timed interleaved (teacher, student, heads, svd, teacher, ...);
the figures are ratios of medians to the teacher. ``deep_compression_size_ratio`` runs the
Deep Compression pipeline (``peftjax.deep_compression``, ``configs/deep_compression.py``) on
LeNet-300-100 / MNIST-5k in a temporary directory: final bytes / float32 bytes, and whether the
Huffman round trip rebuilt the model exactly (``huffman_roundtrip_exact``, which also requires
a 1e6-symbol random round trip of :mod:`peftjax.compress.huffman`).

  python benchmarks/compression_bench.py            # writes benchmarks/results/compression_bench.json
  python benchmarks/compression_bench.py --quick    # smoke test: 2 layers, few steps, prints JSON only
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.lora_vs_full import make_batch  # noqa: E402
from configs import deep_compression  # noqa: E402
from configs import quickstart  # noqa: E402
from peftjax import data as data_lib  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax import timing  # noqa: E402
from peftjax import tree as tree_lib  # noqa: E402
from peftjax import deep_compression as deep  # noqa: E402
from peftjax.compress import distill  # noqa: E402
from peftjax.compress import huffman  # noqa: E402
from peftjax.compress import lowrank  # noqa: E402
from peftjax.compress import structured  # noqa: E402
from peftjax.models.bert import BertClassifier  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'compression_bench.json'
FFN = r'encoder/.*/(intermediate|output)/kernel$'
TARGETS = {'student_infer_time_ratio': ('<=', 0.6), 'deep_compression_size_ratio': ('<=', 0.05),
           'huffman_roundtrip_exact': ('==', True)}


def _forward(module, params, factored: bool = False):
  @jax.jit
  def f(params, batch):
    inputs = {k: batch[k] for k in ('input_ids', 'attention_mask', 'token_type_ids')}
    if factored:
      with lowrank.scope():
        return module.apply({'params': params}, **inputs)
    return module.apply({'params': params}, **inputs)
  return lambda batch: f(params, batch)


def candidates(args):
  c = quickstart.get_config()
  c.data.max_length = args.length
  if args.layers:
    c.model.num_layers = args.layers
  built = models.build(c.model, num_classes=2, pretrained_dir=str(data_lib.minilm_dir()),
                       seed=c.seed)
  cfg, params = built.module.cfg, built.params
  student = distill.student_from_teacher(cfg, params, 'every_other')
  heads, heads_cfg = structured.prune_heads(params, cfg, cfg.num_heads // 2)
  svd = lowrank.factorize(params, targets=FFN, rank=cfg.intermediate_size // 8)
  pool = built.module.pooling
  mk = lambda cfg_: BertClassifier(cfg_, num_classes=2, pooling=pool)
  models_ = {'teacher': (built.module, params, False),
             'student': (mk(student.cfg), student.params, False),
             'heads_pruned_50': (mk(heads_cfg), heads, False),
             'svd_half_rank': (built.module, svd, True)}
  sizes = {k: tree_lib.count(p) for k, (_, p, _) in models_.items()}
  return c, {k: _forward(*v) for k, v in models_.items()}, sizes, {
      'teacher_layers': cfg.num_layers, 'student_layers': student.cfg.num_layers,
      'heads': (cfg.num_heads, heads_cfg.num_heads), 'svd_rank': cfg.intermediate_size // 8,
      'svd_full_rank': min(cfg.hidden_size, cfg.intermediate_size)}


def deep_mnist(args) -> dict:
  c = deep_compression.get_config()
  c.train.progress = False
  if args.quick:
    c.train.steps, c.compress.prune.end_step, c.compress.share.finetune_steps = 60, 40, 10
  with tempfile.TemporaryDirectory() as d:
    return deep.run(c, d)


def random_roundtrip(n: int = 1_000_000) -> bool:
  rng = np.random.default_rng(0)
  symbols = np.minimum(rng.geometric(0.3, n) - 1, 31)  # skewed, as cluster indices are
  code = huffman.build_code(symbols, n_symbols=32)
  data, bits = huffman.encode(symbols, code)
  return bool(np.array_equal(huffman.decode(data, bits, code), symbols))


def run(args) -> dict:
  c, fwd, sizes, shapes = candidates(args)
  batch = make_batch(c, args.batch)
  runners = {k: (lambda f=f: f(batch)) for k, f in fwd.items()}
  load_before = os.getloadavg()
  times = timing.interleaved(runners, steps=args.steps, warmup=args.warmup)
  load_after = os.getloadavg()
  ms = {k: timing.median_ms(t) for k, t in times.items()}
  dc = deep_mnist(args)
  stages = {s['stage']: s for s in dc['stages']}
  rt = random_roundtrip()
  result = {
      'student_infer_time_ratio': ms['student'] / ms['teacher'],
      'head_pruned_50_infer_time_ratio': ms['heads_pruned_50'] / ms['teacher'],
      'svd_half_rank_infer_time_ratio': ms['svd_half_rank'] / ms['teacher'],
      'deep_compression_size_ratio': stages['huffman']['bytes'] / stages['dense']['bytes'],
      'huffman_roundtrip_exact': bool(dc['huffman_roundtrip_exact'] and rt),
      'teacher_forward_ms': ms['teacher'],
  }
  result['meets_targets'] = {k: _check(result[k], t) for k, t in TARGETS.items()}
  result['details'] = {
      'forward': {k: timing.spread(t) for k, t in times.items()},
      'paired_ratios': {k: timing.paired_ratio(times[k], times['teacher'])
                        for k in times if k != 'teacher'},
      'params': sizes,
      'params_ratio': {k: v / sizes['teacher'] for k, v in sizes.items()},
      'shapes': shapes,
      'deep_compression_mnist': {'stages': dc['stages'],
                                 'huffman_roundtrip_exact': dc['huffman_roundtrip_exact']},
      'random_roundtrip_1e6_exact': rt,
      'load_average_before': list(load_before), 'load_average_after': list(load_after),
  }
  result['settings'] = {
      'model': 'all-MiniLM-L6-v2 + 2-class head (eval mode)', 'batch_size': args.batch,
      'max_length': args.length, 'timed_calls': args.steps, 'warmup_calls': args.warmup,
      'order': 'interleaved ' + '/'.join(times), 'quick': args.quick, 'jax': jax.__version__,
      'backend': jax.default_backend(), 'cpu_count': os.cpu_count(),
      'machine': platform.machine(),
  }
  return result


def _check(value, target) -> bool:
  op, bound = target
  return value <= bound if op == '<=' else value == bound


def report(r: dict) -> str:
  d = r['details']
  rows = [[k, d['forward'][k]['median_ms'], d['params'][k], d['params_ratio'][k],
           d['forward'][k]['median_ms'] / d['forward']['teacher']['median_ms']]
          for k in d['forward']]
  lines = [timing.format_table(rows, ['forward', 'median ms', 'params', 'params / teacher',
                                      'time / teacher']), '',
           deep.format_table(d['deep_compression_mnist']), '']
  for k, (op, bound) in TARGETS.items():
    lines.append(f"{k}: {r[k]} (target {op} {bound}: "
                 f"{'ok' if r['meets_targets'][k] else 'MISSED'})")
  return '\n'.join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--length', type=int, default=64)
  ap.add_argument('--layers', type=int, default=0, help='keep the first N layers; 0 = all 6')
  ap.add_argument('--steps', type=int, default=30, help='timed calls per candidate')
  ap.add_argument('--warmup', type=int, default=3)
  ap.add_argument('--quick', action='store_true', help='2 layers, 3 calls, short MNIST run')
  ap.add_argument('--out', default='', help=f'result JSON (default {RESULTS}; none with --quick)')
  args = ap.parse_args(argv)
  if args.quick:
    args.layers, args.steps, args.warmup = args.layers or 2, 3, 1
  return timing.run_and_publish(run, report, args, RESULTS)


if __name__ == '__main__':
  main()
