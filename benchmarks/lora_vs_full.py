"""LoRA vs full fine-tuning: step time, FLOPs, optimizer state and peak memory, as ratios.

The quickstart model (MiniLM-L6 + a 2-class head) on a batch of 32 Rotten Tomatoes reviews x 64
tokens. Both candidates are
the trainer's own jitted, donated step (``step.make_train_step``) with AdamW and dropout 0.1:

* LoRA: ``configs/quickstart.py`` as is (r=8 on query and value);
* full: the same config with ``peft.method='full'``.

Both steps are compiled first; FLOPs come from XLA's cost analysis and peak memory from its
memory analysis of those executables. The steps (and a forward of the merged LoRA model) are
then timed interleaved, A/B/C/D/A/B/C/D..., after a warm-up; the figures are medians. The fourth
candidate, a large float32 matmul, gives the FLOP/s against which the LoRA step's MFU is taken.

  python benchmarks/lora_vs_full.py            # writes benchmarks/results/lora_vs_full.json
  python benchmarks/lora_vs_full.py --quick    # smoke test: 2 layers, 3 steps, prints JSON only
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from peftjax import timing  # noqa: E402
from configs import quickstart  # noqa: E402
from peftjax import data as data_lib  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax import optim  # noqa: E402
from peftjax import peft  # noqa: E402
from peftjax import quant  # noqa: E402
from peftjax import run as run_lib  # noqa: E402
from peftjax import step as step_lib  # noqa: E402
from peftjax import tree as tree_lib  # noqa: E402
from peftjax.components import moe_aux  # noqa: E402
from peftjax.models.build import sample_inputs  # noqa: E402
from peftjax.tasks.classification import Classification  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'lora_vs_full.json'
TARGETS = {'step_time_ratio': ('<=', 0.70), 'flops_ratio': ('<=', 0.70),
           'opt_state_bytes_ratio': ('<=', 0.01), 'peak_memory_ratio': ('<=', 0.6),
           'lora_mfu': ('>=', 0.8)}


def make_batch(config, batch: int) -> dict:
  """The first training batch of the quickstart data (real Rotten Tomatoes reviews)."""
  data = data_lib.build(config.data, tokenizer_path=str(data_lib.minilm_dir() / 'tokenizer.json'))
  return {k: jnp.asarray(v) for k, v in data.train_batches(batch, config.seed)[0].items()}


def _copy(tree):
  """Fresh buffers, so donating one candidate's state never deletes another's arrays."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def build_candidate(config, built, batch) -> dict:
  """The trainer's step for ``config``: initial state, frozen tree and compiled executable."""
  method = quant.wrap(peft.build(config.peft), config.quant)  # QAT/QLoRA when the config asks
  inputs = sample_inputs(built.input_keys, length=config.data.max_length)
  peft_params = method.init(jax.random.key(config.seed + 1), built.module, built.params, inputs)
  base = method.prepare_base(built.params, peft_params, module=built.module, inputs=inputs)
  if getattr(method, 'needs_calibration', False):
    peft_params = method.calibrate(built.module, base, peft_params, [batch], built.input_keys)
  base_trainable, frozen = tree_lib.partition(base, method.trainable_base)
  trainable = _copy({'base': base_trainable, 'peft': peft_params})
  # -- as train.train_and_evaluate builds them; the one loop component these configs can turn
  # on is MoE's auxiliary losses (experiments/moe/report.py times MoE configs with this step)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  state = run_lib.TrainState.create(tx, trainable, seed=config.seed)
  forward = run_lib.make_forward(built, method)
  comps = [c for c in [moe_aux.from_config(config, None)] if c is not None]
  step = jax.jit(step_lib.make_train_step(forward, tx, Classification(config), comps),
                 donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = timing.compile_fn(step, state, frozen, batch)
  return {'method': method, 'state': state, 'frozen': frozen, 'compiled': compiled,
          'compile_s': time.perf_counter() - t0,
          'size': tree_lib.size_report(trainable, frozen),
          'opt_state_bytes': tree_lib.nbytes(state.opt_state),
          'flops': timing.cost_flops(compiled), 'memory': timing.memory_bytes(compiled)}


def merged_forward(built, lora: dict, batch) -> Callable[[], Any]:
  """A jitted deterministic forward of the merged LoRA model on ``batch`` (no donation)."""
  params = lora['state'].params
  base = tree_lib.combine(lora['frozen'], params['base'])
  merged = _copy(lora['method'].merge(base, params['peft']))
  inputs = {k: batch[k] for k in built.input_keys}
  fwd = jax.jit(lambda p, x: built.module.apply({'params': p}, **x, deterministic=True))
  compiled = timing.compile_fn(fwd, merged, inputs)
  return lambda: compiled(merged, inputs)



def run(args) -> dict:
  lora_cfg = quickstart.get_config()
  full_cfg = quickstart.get_config()
  full_cfg.peft.method = 'full'  # everything else (optimizer, dropout, data shape) identical
  for c in (lora_cfg, full_cfg):
    c.train.batch_size, c.data.max_length = args.batch, args.length
    if args.layers:
      c.model.num_layers = args.layers
  built = models.build(lora_cfg.model, num_classes=2, pretrained_dir=str(data_lib.minilm_dir()),
                       seed=lora_cfg.seed)
  batch = make_batch(lora_cfg, args.batch)

  # ------------------------------------------------------------------ compile both steps
  lora = build_candidate(lora_cfg, built, batch)
  full = build_candidate(full_cfg, built, batch)
  # A few LoRA steps first so the merged model carries a non-zero update (B != 0).
  lora_run = timing.DonatingStepper(lora['compiled'], lora['state'], lora['frozen'], batch)
  full_run = timing.DonatingStepper(full['compiled'], full['state'], full['frozen'], batch)
  for _ in range(2):
    jax.block_until_ready(lora_run())
  lora['state'] = lora_run.state
  infer_run = merged_forward(built, lora, batch)

  # ------------------------------------------------------------------ timing, the FLOP/s probe included
  # The matmul probe is one more candidate of the rotation: MFU is then a ratio of interleaved
  # medians like the other figures (a probe timed before or after the steps sees another load).
  probe, probe_flops = timing.matmul_probe(args.matmul_n)
  times = timing.interleaved({'lora': lora_run, 'full': full_run, 'infer': infer_run,
                              'matmul': probe}, steps=args.steps, warmup=args.warmup)
  matmul_flops = probe_flops / float(np.median(times['matmul']))

  lora_ms, full_ms = timing.median_ms(times['lora']), timing.median_ms(times['full'])
  result = {
      'lora_step_ms': lora_ms,
      'full_step_ms': full_ms,
      'infer_ms': timing.median_ms(times['infer']),
      'step_time_ratio': lora_ms / full_ms,
      'flops_ratio': lora['flops'] / full['flops'],
      'opt_state_bytes_ratio': lora['opt_state_bytes'] / full['opt_state_bytes'],
      'peak_memory_ratio': lora['memory']['peak'] / full['memory']['peak'],
      'trainable_fraction': lora['size']['trainable_fraction'],
      'lora_mfu': lora['flops'] / (lora_ms * 1e-3 * matmul_flops),
  }
  result['meets_targets'] = {k: timing.meets(result[k], t) for k, t in TARGETS.items()}
  result['details'] = {
      'paired_step_time_ratio': timing.paired_ratio(times['lora'], times['full']),
      'lora_step': timing.spread(times['lora']),
      'full_step': timing.spread(times['full']),
      'infer': timing.spread(times['infer']),
      'matmul_gflops': matmul_flops / 1e9,
      'matmul': timing.spread(times['matmul']),
      'lora_gflops_per_step': lora['flops'] / 1e9,
      'full_gflops_per_step': full['flops'] / 1e9,
      'lora_opt_state_bytes': lora['opt_state_bytes'],
      'full_opt_state_bytes': full['opt_state_bytes'],
      'lora_memory_bytes': lora['memory'],
      'full_memory_bytes': full['memory'],
      'lora_trainable_params': lora['size']['trainable_params'],
      'full_trainable_params': full['size']['trainable_params'],
      'total_params': lora['size']['total_params'],
      'compile_s': {'lora': lora['compile_s'], 'full': full['compile_s']},
  }
  result['settings'] = {
      'model': 'all-MiniLM-L6-v2 + 2-class head',
      'num_layers': built.module.cfg.num_layers,
      'batch_size': args.batch,
      'max_length': args.length,
      'peft': {'method': lora_cfg.peft.method,
               **{k: lora_cfg.peft.lora[k] for k in ('rank', 'alpha', 'dropout', 'targets')}},
      'optimizer': {**{k: lora_cfg.optim[k] for k in ('learning_rate', 'schedule', 'warmup_steps',
                                                      'weight_decay', 'clip_norm')},
                    'name': 'adamw', 'total_steps': lora_cfg.train.steps},
      'dropout_rate': lora_cfg.model.dropout_rate,
      'grad_barrier': lora_cfg.model.grad_barrier,
      'dtype': lora_cfg.dtype,
      'timed_steps': args.steps,
      'timing_warmup_steps': args.warmup,
      'order': 'interleaved lora/full/infer/matmul',
      'matmul_probe': f'{args.matmul_n}x{args.matmul_n} float32, jitted, interleaved',
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
  d = r['details']
  rows = [
      ['step time (ms, median)', r['lora_step_ms'], r['full_step_ms'], r['step_time_ratio'],
       timing.target_note('step_time_ratio', r, TARGETS)],
      ['GFLOPs per step (cost analysis)', d['lora_gflops_per_step'], d['full_gflops_per_step'],
       r['flops_ratio'], timing.target_note('flops_ratio', r, TARGETS)],
      ['optimizer state (MiB)', d['lora_opt_state_bytes'] / 2**20,
       d['full_opt_state_bytes'] / 2**20, r['opt_state_bytes_ratio'],
       timing.target_note('opt_state_bytes_ratio', r, TARGETS)],
      ['peak memory (MiB, memory analysis)', d['lora_memory_bytes']['peak'] / 2**20,
       d['full_memory_bytes']['peak'] / 2**20, r['peak_memory_ratio'],
       timing.target_note('peak_memory_ratio', r, TARGETS)],
      ['trainable parameters', d['lora_trainable_params'], d['full_trainable_params'],
       r['trainable_fraction'], '(fraction of all)'],
  ]
  table = timing.format_table(rows, ['', 'LoRA', 'full', 'LoRA/full', 'target'])
  s = r['settings']
  lines = [
      f"LoRA r={s['peft']['rank']} on query/value vs full fine-tuning, {s['num_layers']} layers, "
      f"batch {s['batch_size']} x {s['max_length']}, AdamW, dropout {s['dropout_rate']}, "
      f"{s['timed_steps']} interleaved steps each ({s['backend']}, jax {s['jax']})",
      table,
      f"paired step-time ratio (median of per-round ratios): {d['paired_step_time_ratio']:.3f}",
      f"merged-model forward: {r['infer_ms']:.1f} ms",
      f"matmul probe (interleaved): {d['matmul_gflops']:.1f} GFLOP/s; LoRA MFU "
      f"{r['lora_mfu']:.3f} ({timing.target_note('lora_mfu', r, TARGETS)})",
  ]
  return '\n'.join(lines)



def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=30, help='timed steps per candidate (>= 20)')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps per candidate')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--length', type=int, default=64)
  p.add_argument('--layers', type=int, default=0, help='encoder layers kept; 0 = all (6)')
  p.add_argument('--matmul-n', type=int, default=2048, help='size of the FLOP/s probe matmul')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: 2 layers, 3 steps, small probe; prints, writes only --out')
  p.add_argument('--out', default=None,
                 help=f'JSON output path (default {RESULTS.relative_to(ROOT)}; none with --quick)')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup, args.matmul_n = min(args.steps, 3), 1, 512
    args.layers = args.layers or 2
  elif args.steps < 20:
    p.error(f'--steps={args.steps}; the figures are medians over at least 20 steps '
            '(use --quick for a smoke test)')
  return timing.run_and_publish(run, report, args, RESULTS)


if __name__ == '__main__':
  main()
