"""int8 quantization costs on MiniLM-L6, as ratios measured in one process.

The quickstart model (MiniLM-L6 + a 2-class head) on a batch of 32 Rotten Tomatoes reviews x 64
tokens:

* ``int8_infer_time_ratio`` — the converted int8 model's forward (int8 x int8 -> int32 matmuls,
  static activation scales calibrated on 4 other training batches) over the float32 forward;
* ``int8_weight_bytes_ratio`` — its parameter bytes (int8 weights and embedding tables +
  float32 scales, biases, norms) over float32;
* ``qat_step_time_ratio`` — a full fine-tuning train step with QAT (int8 fake quant of weights and
  dynamic activations of every encoder matmul, STE) over the same step in float;
* ``qlora_base_bytes_ratio`` — the QLoRA frozen base (int8 + scales) over float32.

Also reported: the dynamic-activation int8 forward, LoRA+QAT over LoRA, and QLoRA over LoRA.
Every candidate is compiled first and the candidates are timed interleaved (A/B/A/B...) after a
warm-up; the figures are medians.

  python benchmarks/quant.py            # writes benchmarks/results/quant.json
  python benchmarks/quant.py --quick    # smoke test: 2 layers, 3 steps, prints JSON only
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import lora_vs_full  # noqa: E402
from configs import quickstart  # noqa: E402
from peftjax import data as data_lib  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax import timing  # noqa: E402
from peftjax import tree as tree_lib  # noqa: E402
from peftjax.models.build import sample_inputs  # noqa: E402
from peftjax.quant import int8  # noqa: E402
from peftjax.quant import qat  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'quant.json'
TARGETS = {'int8_infer_time_ratio': ('<=', 0.80), 'int8_weight_bytes_ratio': ('<=', 0.27),
           'qat_step_time_ratio': ('<=', 1.30), 'qlora_base_bytes_ratio': ('<=', 0.27)}


def _config(args, method: str, **quant):
  c = quickstart.get_config()
  c.peft.method = method
  c.train.batch_size, c.data.max_length = args.batch, args.length
  if args.layers:
    c.model.num_layers = args.layers
  for k, v in quant.items():
    c.quant[k] = v
  return c


def _batches(config, n: int) -> list[dict]:
  data = data_lib.build(config.data, tokenizer_path=str(data_lib.minilm_dir() / 'tokenizer.json'))
  ds = data.train_batches(config.train.batch_size, config.seed)
  return [{k: jnp.asarray(v) for k, v in ds[i].items()} for i in range(n)]


def run(args) -> dict:
  base_cfg = _config(args, 'full')
  built = models.build(base_cfg.model, num_classes=2, pretrained_dir=str(data_lib.minilm_dir()),
                       seed=base_cfg.seed)
  batches = _batches(base_cfg, 5)
  batch, calib = batches[0], batches[1:]
  keys = built.input_keys
  inputs = {k: batch[k] for k in keys}

  # ------------------------------------------------------------------ inference: float vs int8
  qcfg = _config(args, 'full', embeddings=True, activations='static').quant
  fwd = lambda p, b: built.module.apply({'params': p}, **{k: b[k] for k in keys})
  sites = qat.find_quant_sites(built.module, built.params, sample_inputs(keys), qcfg)
  ranges = qat.calibrate_ranges(fwd, built.params, sites, calib, qcfg)
  static = int8.convert(built.module, built.params, sample_inputs(keys), qcfg, ranges=ranges)
  dynamic = int8.convert(built.module, built.params, sample_inputs(keys), qcfg)
  f_fwd = jax.jit(lambda p, x: built.module.apply({'params': p}, **x)).lower(
      built.params, inputs).compile()
  s_fwd, d_fwd = static.jit(), dynamic.jit()  # weights as arguments, as the float forward
  infer = timing.interleaved({'float': lambda: f_fwd(built.params, inputs),
                              'int8': lambda: s_fwd(inputs), 'int8_dynamic': lambda: d_fwd(inputs)},
                             steps=args.steps, warmup=args.warmup)
  float_bytes = qat.bytes_of(built.params)

  # ------------------------------------------------------------------ training steps
  cands = {
      'full': _config(args, 'full'),
      'full_qat': _config(args, 'full', qat=True),
      'lora': _config(args, 'lora'),
      'lora_qat': _config(args, 'lora', qat=True),
      'qlora': _config(args, 'lora', qlora=True, embeddings=True),
  }
  built_steps = {n: lora_vs_full.build_candidate(c, built, batch) for n, c in cands.items()}
  runners = {n: timing.DonatingStepper(b['compiled'], b['state'], b['frozen'], batch)
             for n, b in built_steps.items()}
  steps = timing.interleaved(runners, steps=args.steps, warmup=args.warmup)
  qlora = built_steps['qlora']
  qlora_base = tree_lib.combine(qlora['frozen'], qlora['state'].params['base'])

  ms = {n: timing.median_ms(t) for n, t in {**infer, **steps}.items()}
  result = {
      'int8_infer_time_ratio': ms['int8'] / ms['float'],
      'int8_weight_bytes_ratio': static.weight_bytes / float_bytes,
      'qat_step_time_ratio': ms['full_qat'] / ms['full'],
      'qlora_base_bytes_ratio': qat.bytes_of(qlora_base) / float_bytes,
      'int8_dynamic_infer_time_ratio': ms['int8_dynamic'] / ms['float'],
      'lora_qat_step_time_ratio': ms['lora_qat'] / ms['lora'],
      'qlora_step_time_ratio': ms['qlora'] / ms['lora'],
  }
  result['meets_targets'] = {k: timing.meets(result[k], t) for k, t in TARGETS.items()}
  result['details'] = {
      'median_ms': ms,
      'spread': {n: timing.spread(t) for n, t in {**infer, **steps}.items()},
      'paired_qat_step_time_ratio': timing.paired_ratio(steps['full_qat'], steps['full']),
      'paired_int8_infer_time_ratio': timing.paired_ratio(infer['int8'], infer['float']),
      'float_bytes': float_bytes, 'int8_bytes': static.weight_bytes,
      'qlora_base_bytes': qat.bytes_of(qlora_base),
      'int8_layers': len(static.sites),
  }
  result['settings'] = {
      'model': 'all-MiniLM-L6-v2 + 2-class head', 'num_layers': built.module.cfg.num_layers,
      'batch_size': args.batch, 'max_length': args.length, 'timed_steps': args.steps,
      'timing_warmup_steps': args.warmup, 'quant_targets': qcfg.targets,
      'embeddings_int8': True, 'calibration': 'minmax over 4 other train batches',
      'qat': 'weights per-channel + dynamic per-tensor activations, 8 bits, STE',
      'quick': args.quick, 'jax': jax.__version__, 'backend': jax.default_backend(),
      'cpu_count': os.cpu_count(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  return result


def report(r: dict) -> str:
  ms = r['details']['median_ms']
  rows = [[k, r[k], f"{op} {bound} {'ok' if r['meets_targets'][k] else 'MISSED'}"]
          for k, (op, bound) in TARGETS.items()]
  rows += [[k, r[k], ''] for k in ('int8_dynamic_infer_time_ratio', 'lora_qat_step_time_ratio',
                                   'qlora_step_time_ratio')]
  s = r['settings']
  return '\n'.join([
      f"int8 quantization, {s['num_layers']} layers, batch {s['batch_size']} x "
      f"{s['max_length']}, {s['timed_steps']} interleaved calls each ({s['backend']})",
      timing.format_table(rows, ['figure', 'value', 'target']),
      'median ms: ' + ', '.join(f'{k} {v:.1f}' for k, v in ms.items()),
  ])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=20, help='timed calls per candidate (>= 20)')
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--length', type=int, default=64)
  p.add_argument('--layers', type=int, default=0, help='encoder layers kept; 0 = all (6)')
  p.add_argument('--quick', action='store_true', help='smoke test: 2 layers, 3 steps')
  p.add_argument('--out', default=None, help='JSON output path (default: the results file)')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup, args.layers = min(args.steps, 3), 1, args.layers or 2
  elif args.steps < 20:
    p.error(f'--steps={args.steps}; the figures are medians over at least 20 calls')
  return timing.run_and_publish(run, report, args, RESULTS)


if __name__ == '__main__':
  main()
