"""Serving many LoRA adapters at once: mixed batches, the number loaded, hot swaps, file sizes.

The quickstart model (all-MiniLM-L6-v2 + a 2-class head, LoRA r=8 on attention query and value)
on one batch of 64 Rotten Tomatoes test reviews x 64 tokens. 64 adapters, each with its own
random non-zero ``lora_a``, ``lora_b`` and head, are put in an
:class:`~peftjax.serving.AdapterLibrary` (``max_rank=8``) -- all 64 in one library, the first 8
in another:

* ``mixed_batch_8_vs_merged`` -- the batch spread over 8 adapters (example ``i`` runs adapter
  ``i % 8``, 8 examples each; the 8-adapter library) over the same batch on one merged model
  (``lib.merged_params``: a plain MiniLM, no adapter work); target <= 1.5;
* ``mixed_batch_64_vs_merged`` -- every example its own adapter (the 64-adapter library) over
  the merged model; target <= 3.0;
* ``active_fixed_scaling`` -- the batch over 8 adapters with 64 loaded over the same with 8
  loaded (S-LoRA: throughput flat in the number of adapters loaded); target <= 1.1;
* ``single_adapter_vs_merged`` -- one active adapter (a scalar slot index) over merged;
* ``swap_recompiles`` -- XLA compilations (``jax.monitoring``'s backend-compile event, every
  program, not only the forward) while switching the active adapter through 8 names, running
  batches with new per-example adapter patterns, and hot-swapping an adapter from a delta file
  (``lib.save`` then ``lib.load`` over an existing name) followed by calls; must be 0;
* ``adapter_bytes_ratio`` -- the adapter's delta file (``lib.save``) over the base's
  ``model.safetensors``.

The forward passes are the library's own jitted function ``lib._fn(base, stacks, inputs,
index)`` with a precomputed slot index (no host-side name lookup timed) and a jitted
``module.apply`` of the merged parameters. All are compiled first, then timed interleaved
(A/B/C/..., after a warm-up); the figures are ratios of medians (``details`` holds spreads and
paired ratios).

  python benchmarks/multi_adapter.py          # writes benchmarks/results/multi_adapter.json
  python benchmarks/multi_adapter.py --quick  # smoke test: 1 layer, small batch, 3 steps
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import monitoring  # noqa: E402

from configs import quickstart  # noqa: E402
from peftjax import data as data_lib  # noqa: E402
from peftjax import run as run_lib  # noqa: E402
from peftjax import timing  # noqa: E402
from peftjax import tree as tree_lib  # noqa: E402
from peftjax.serving import AdapterLibrary  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'multi_adapter.json'
TARGETS = {'mixed_batch_8_vs_merged': ('<=', 1.5), 'mixed_batch_64_vs_merged': ('<=', 3.0),
           'active_fixed_scaling': ('<=', 1.1), 'swap_recompiles': ('<=', 0)}
KEYS = ('mixed_batch_8_vs_merged', 'mixed_batch_64_vs_merged', 'active_fixed_scaling',
        'swap_recompiles', 'adapter_bytes_ratio', 'single_adapter_vs_merged')
# jax's event for one XLA compilation (also recorded when served by the compilation cache).
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


# ----------------------------------------------------------------------------- compile counter


class CompileCounter:
  """Counts XLA backend compilations, by function name, from the moment it is registered."""

  def __init__(self):
    self.names: list[str] = []
    monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del duration
    if event == BACKEND_COMPILE_EVENT:
      self.names.append(str(kwargs.get('fun_name', '?')))

  def __len__(self) -> int:
    return len(self.names)


# ----------------------------------------------------------------------------- set-up


def _config(args):
  c = quickstart.get_config()  # LoRA r=8, alpha 16, on query/value; max_length 64
  c.data.max_length = args.length
  if args.layers:
    c.model.num_layers = args.layers
  return c


def _random_adapter(trainable: dict, seed: int) -> dict:
  """A copy of the quickstart's trainable partition with its own random, non-zero values:
  ``lora_a`` ~ N(0, 1/d_in), ``lora_b`` ~ N(0, 0.02^2), head kernel ~ N(0, 0.02^2), bias 0.02."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    x = np.asarray(x)
    if path.endswith('lora_a'):
      return (rng.normal(size=x.shape) / np.sqrt(x.shape[0])).astype(np.float32)
    return (rng.normal(size=x.shape) * 0.02).astype(np.float32)

  return tree_lib.map_with_path(draw, jax.device_get(trainable))


def _library(setup, adapters: list[dict], args) -> AdapterLibrary:
  built = setup.built
  base = setup.base()
  lib = AdapterLibrary(built.module, base, input_keys=built.input_keys, max_rank=args.rank,
                       base_source=str(data_lib.minilm_dir()))
  for i, tr in enumerate(adapters):
    lib.add_trained(f'a{i}', tr, setup.method.name, setup.config.peft)
  return lib


def _batch(setup, args) -> dict:
  """The first ``batch`` test reviews, tokenized and padded to ``length``."""
  b = setup.data.eval_batches('test', args.batch)[0]
  return {k: jnp.asarray(b[k]) for k in setup.built.input_keys}


# ----------------------------------------------------------------------------- measurements


def _cost(jitted, *args) -> dict:
  """GFLOPs and GB accessed of one call, from XLA's cost analysis of the compiled program."""
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return {'gflops': float(cost.get('flops', 0.0)) / 1e9,
          'gbytes_accessed': float(cost.get('bytes accessed', 0.0)) / 1e9}


def _swap_recompiles(lib: AdapterLibrary, inputs: dict, counter: CompileCounter, args,
                     tmp: pathlib.Path) -> dict:
  """Compilations while switching, re-mixing and hot-swapping adapters (after a warm-up)."""
  names, batch = lib.names, args.batch
  # Warm-up: one call of each kind (a scalar slot, a per-example vector) on this library.
  jax.block_until_ready(lib.logits(inputs))
  jax.block_until_ready(lib.logits(inputs, [names[i % len(names)] for i in range(batch)]))
  before, traces_before = len(counter), lib.compiles
  # 1. Switch the active adapter through 8 names, one call each.
  for name in names[:8]:
    lib.activate(name)
    jax.block_until_ready(lib.logits(inputs))
  # 2. Per-example batches with new index patterns (permutations, few adapters, one adapter).
  rng = np.random.default_rng(0)
  patterns = [list(rng.choice(names, batch)) for _ in range(3)]
  patterns += [[names[(i // 4) % 3] for i in range(batch)], [names[-1]] * batch]
  for pattern in patterns:
    jax.block_until_ready(lib.logits(inputs, pattern))
  # 3. Hot swap: write adapter a{k} to a delta file, load it over a{j} in place, then calls.
  src, dst = names[len(names) // 2 + 1], names[3]
  path = tmp / f'{src}.safetensors'
  lib.save(src, path)
  want = np.asarray(lib.logits(inputs, src))
  slots = lib.slots
  lib.load(dst, path)
  got = np.asarray(lib.logits(inputs, dst))
  lib.activate(dst)
  jax.block_until_ready(lib.logits(inputs))
  jax.block_until_ready(lib.logits(inputs, [dst if i % 2 else src for i in range(batch)]))
  compiled = counter.names[before:]
  return {'compiles': len(compiled), 'compiled': compiled,
          'forward_traces': lib.compiles - traces_before,
          'hot_swap_max_abs_diff': float(np.max(np.abs(got - want))),
          'slots_unchanged': lib.slots == slots, 'patterns': len(patterns) + 1,
          'hot_swap': f'{src} -> {dst}'}


def run(args) -> dict:
  counter = CompileCounter()
  t0 = time.perf_counter()
  config = _config(args)
  setup = run_lib.build_setup(config)
  inputs = _batch(setup, args)
  adapters = [_random_adapter(setup.trainable, seed=1000 + i) for i in range(args.adapters)]
  lib_many = _library(setup, adapters, args)
  lib_few = _library(setup, adapters[:args.few], args)
  setup_s = time.perf_counter() - t0

  # ------------------------------------------------------------------ index patterns
  few = jnp.asarray([i % args.few for i in range(args.batch)], jnp.int32)  # slots a0..a7
  many = lib_many.index([f'a{i % args.adapters}' for i in range(args.batch)])
  few_in_many = lib_many.index([f'a{i % args.few}' for i in range(args.batch)])
  assert np.array_equal(np.asarray(lib_few.index([f'a{i % args.few}' for i in range(args.batch)])),
                        np.asarray(few))
  single = lib_few.index('a0')

  # ------------------------------------------------------------------ correctness, then compile
  module = setup.built.module
  merged = jax.tree.map(jnp.asarray, lib_few.merged_params('a0'))
  merged_fn = jax.jit(lambda p, x: module.apply({'params': p}, **x, deterministic=True))
  t1 = time.perf_counter()
  ref = np.asarray(merged_fn(merged, inputs))
  err = {
      'single_vs_merged': float(np.max(np.abs(
          np.asarray(lib_few._fn(lib_few.base, lib_few.stacks, inputs, single)) - ref))),
      'mixed_row0_vs_merged': float(np.max(np.abs(
          np.asarray(lib_many._fn(lib_many.base, lib_many.stacks, inputs, many))[0] - ref[0]))),
  }
  runners = {
      'merged': lambda: merged_fn(merged, inputs),
      'single': lambda: lib_few._fn(lib_few.base, lib_few.stacks, inputs, single),
      f'mixed_{args.few}': lambda: lib_few._fn(lib_few.base, lib_few.stacks, inputs, few),
      f'mixed_{args.adapters}': lambda: lib_many._fn(lib_many.base, lib_many.stacks, inputs,
                                                     many),
      f'active_{args.few}_of_{args.adapters}': lambda: lib_many._fn(
          lib_many.base, lib_many.stacks, inputs, few_in_many),
  }
  for fn in runners.values():  # compile every candidate before any timing
    jax.block_until_ready(fn())
  compile_s = time.perf_counter() - t1
  # XLA's cost analysis of the executables just compiled (jit's cache: no new compilation).
  costs = {'merged': _cost(merged_fn, merged, inputs),
           'single': _cost(lib_few._fn, lib_few.base, lib_few.stacks, inputs, single),
           f'mixed_{args.few}': _cost(lib_few._fn, lib_few.base, lib_few.stacks, inputs, few),
           f'mixed_{args.adapters}': _cost(lib_many._fn, lib_many.base, lib_many.stacks, inputs,
                                           many)}

  # ------------------------------------------------------------------ timing
  times = timing.interleaved(runners, steps=args.steps, warmup=args.warmup)
  ms = {k: timing.median_ms(v) for k, v in times.items()}
  mix_few, mix_many = f'mixed_{args.few}', f'mixed_{args.adapters}'
  active = f'active_{args.few}_of_{args.adapters}'
  pairs = {'mixed_batch_8_vs_merged': (mix_few, 'merged'),
           'mixed_batch_64_vs_merged': (mix_many, 'merged'),
           'active_fixed_scaling': (active, mix_few),
           'single_adapter_vs_merged': ('single', 'merged')}

  # ------------------------------------------------------------------ hot swaps and file sizes
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    swap = _swap_recompiles(lib_many, inputs, counter, args, tmp)
    adapter_path = tmp / 'a0.safetensors'
    lib_few.save('a0', adapter_path)
    adapter_bytes = adapter_path.stat().st_size
  base_file = data_lib.minilm_dir() / 'model.safetensors'
  base_bytes = base_file.stat().st_size

  result = {k: ms[a] / ms[b] for k, (a, b) in pairs.items()}
  result['swap_recompiles'] = swap['compiles']
  result['adapter_bytes_ratio'] = adapter_bytes / base_bytes
  result['median_ms'] = ms
  result['meets_targets'] = {k: timing.meets(result[k], t) for k, t in TARGETS.items()}
  result['details'] = {
      'pairs': {k: list(v) for k, v in pairs.items()},
      'paired_ratios': {k: timing.paired_ratio(times[a], times[b]) for k, (a, b) in pairs.items()},
      'spread': {k: timing.spread(v) for k, v in times.items()},
      'swap': swap,
      'cost_analysis': costs,
      'flops_ratio_vs_merged': {k: v['gflops'] / costs['merged']['gflops']
                                for k, v in costs.items() if k != 'merged'},
      'adapter_file_bytes': adapter_bytes,
      'base_file_bytes': base_bytes,
      'base_file': base_file.name,
      'stack_bytes': {
          'few': int(sum(x.nbytes for x in jax.tree.leaves(lib_few.stacks))),
          'many': int(sum(x.nbytes for x in jax.tree.leaves(lib_many.stacks)))},
      'slots': {'few': lib_few.slots, 'many': lib_many.slots},
      'max_abs_error_vs_merged': err,
      'forward_traces': {'few': lib_few.compiles, 'many': lib_many.compiles},
      'setup_s': setup_s, 'compile_s': compile_s,
  }
  result['settings'] = {
      'model': 'all-MiniLM-L6-v2 + 2-class head (configs/quickstart.py)',
      'num_layers': module.cfg.num_layers,
      'batch_size': args.batch, 'max_length': args.length,
      'adapters': args.adapters, 'few_adapters': args.few, 'rank': args.rank,
      'peft': {'method': config.peft.method,
               **{k: config.peft.lora[k] for k in ('rank', 'alpha', 'targets')}},
      'adapter_values': ('random: lora_a ~ N(0, 1/d_in), lora_b ~ N(0, 0.02^2), head ~ '
                         'N(0, 0.02^2); distinct per adapter'),
      'tokens': f'the first {args.batch} Rotten Tomatoes test reviews, padded to {args.length}',
      'index_patterns': {mix_few: f'example i -> adapter i % {args.few} ({args.few} loaded)',
                         mix_many: f'example i -> adapter i ({args.adapters} loaded)',
                         active: f'example i -> adapter i % {args.few} ({args.adapters} loaded)',
                         'single': 'scalar slot index (one active adapter)'},
      'timed_steps': args.steps, 'timing_warmup_steps': args.warmup,
      'order': 'interleaved ' + '/'.join(runners),
      'quick': args.quick, 'jax': jax.__version__, 'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind, 'cpu_count': os.cpu_count(),
      'machine': platform.machine(), 'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  return result


def report(r: dict) -> str:
  d, s, ms = r['details'], r['settings'], r['median_ms']

  def target(key):
    if key not in TARGETS:
      return ''
    op, bound = TARGETS[key]
    return f"{op} {bound} {'ok' if r['meets_targets'][key] else 'MISSED'}"

  rows = [[k, ms[a], ms[b], r[k], d['paired_ratios'][k], target(k)]
          for k, (a, b) in d['pairs'].items()]
  sw = d['swap']
  return '\n'.join([
      f"{s['adapters']} LoRA adapters r={s['rank']} on MiniLM-L6 ({s['num_layers']} layers), "
      f"batch {s['batch_size']} x {s['max_length']}, {s['timed_steps']} interleaved steps each "
      f"({s['backend']}, jax {s['jax']})",
      timing.format_table(rows, ['figure', 'A (ms)', 'B (ms)', 'A/B', 'paired', 'target']),
      f"swap_recompiles {r['swap_recompiles']} ({target('swap_recompiles')}; forward traces "
      f"{sw['forward_traces']}; hot swap {sw['hot_swap']} max |diff| "
      f"{sw['hot_swap_max_abs_diff']:.2e})",
      f"adapter file {d['adapter_file_bytes']:,} B / base {d['base_file_bytes']:,} B = "
      f"{r['adapter_bytes_ratio']:.5f}",
      f"max |logits - merged|: {d['max_abs_error_vs_merged']}",
      'FLOPs vs merged (cost analysis): ' + ', '.join(
          f'{k} {v:.4f}' for k, v in d['flops_ratio_vs_merged'].items()),
  ])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=30, help='timed calls per candidate')
  p.add_argument('--warmup', type=int, default=2, help='untimed calls per candidate')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--length', type=int, default=64)
  p.add_argument('--adapters', type=int, default=64, help='adapters in the large library')
  p.add_argument('--few', type=int, default=8, help='adapters in the small library')
  p.add_argument('--rank', type=int, default=8, help="the libraries' max_rank")
  p.add_argument('--layers', type=int, default=0, help='encoder layers; 0 = all (6)')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: 1 layer, 16 adapters, batch 16 x 16, 3 steps; prints only')
  p.add_argument('--out', default=None,
                 help=f'JSON output path (default {RESULTS.relative_to(ROOT)}; none with --quick)')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup = min(args.steps, 3), 1
    args.batch, args.length, args.adapters, args.few, args.layers = 16, 16, 16, 4, 1
  if args.adapters % args.few or args.batch % args.adapters:
    p.error(f'--adapters={args.adapters} must be a multiple of --few={args.few}, and '
            f'--batch={args.batch} a multiple of --adapters')
  return timing.run_and_publish(run, report, args, RESULTS)


if __name__ == '__main__':
  main()
