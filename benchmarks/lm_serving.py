"""Many LM adapters generating at once: mixed-adapter decode and prefill vs one merged model,
prefix tuning vs the base, recompiles on a hot swap, int8 vs float32 decoding.

SmolLM2-135M-Instruct (the bundled GGUF, dequantized to float32; 30 layers under ``nn.scan``),
random 128-token prompts, greedy, every candidate compiled and warmed up first, then timed
interleaved (A, B, A, B, ...); the figures are medians:

* ``mixed_adapters_decode_ratio``: 16 requests over 8 LoRA adapters (r=8 on q/k/v/o, the
  quickstart's, 2 requests each) in one batch through an :class:`LMAdapterLibrary` / the same 16
  prompts on one model with one of those adapters merged, per decode step: the candidates'
  ``step`` functions (what ``generation.generate``'s decode loop calls) jitted alone, one token
  per row on a cache of ``--prompt`` + ``--new-tokens`` slots filled by their own prefill. A
  step attends every slot of the cache (masked past each row's length), so its cost does not
  depend on the position written, and the cache (donated) is reused in place call after call;
* ``mixed_adapters_prefill_ratio``: the same two through ``generation.generate`` with 1 new
  token (the prefill of 16 x 128 tokens and the first token's choice);
* ``prefix_decode_ratio``: a prefix-tuned model (``peft.prefix.length`` 10, the default; the
  prefix in the KV cache, ``generation.method_cache``) / the base, 16 requests, per decode step;
* ``swap_recompiles``: programs compiled (``generation.compile_count``) by replacing one
  library adapter with another of the same rank and generating again, then another mix of
  adapters over the rows (0 expected);
* ``int8_decode_speedup``: float32 / int8 decode step time at batch 1
  (``peftjax.quant.int8``: every layer kernel and the tied embedding in int8, per-token dynamic
  activations, ``Int8Model.step()``).

  python benchmarks/lm_serving.py            # writes benchmarks/results/lm_serving.json
  python benchmarks/lm_serving.py --quick    # smoke test: a random 2-layer model, prints JSON
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import lm_compress  # noqa: E402
from configs import lm_quickstart  # noqa: E402
from peftjax import generation  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax import peft  # noqa: E402
from peftjax import timing  # noqa: E402
from peftjax.models.llama import init_cache  # noqa: E402
from peftjax.quant import int8  # noqa: E402
from peftjax.serving.lm_library import LMAdapterLibrary  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'lm_serving.json'
TARGETS = {'mixed_adapters_decode_ratio': ('<=', 1.3), 'mixed_adapters_prefill_ratio': ('<=', 1.3),
           'prefix_decode_ratio': ('<=', 1.15), 'swap_recompiles': ('<=', 0)}
ADAPTERS, REQUESTS = 8, 16


def config(args, method: str):
  """``configs/lm_quickstart.py`` with ``peft.method=method`` (a random 2-layer model with
  ``--quick``)."""
  c = lm_quickstart.get_config('lora')
  c.peft.method = method
  if args.quick:
    c.model.pretrained = 'random'  # configs/common.py's model.llama: 2 layers, width 64
  return c


def trained_like(method, module, params, seed: int):
  """A method's parameters off their initialisation (LoRA's B nonzero), as after training: the
  values do not change the cost, only that every adapter differs."""
  inputs = {'input_ids': jnp.ones((1, 8), jnp.int32)}
  p = method.init(jax.random.key(seed), module, params, inputs)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + 0.01 * rng.standard_normal(x.shape, np.float32),
                      p)


def fixed(make_cache, slots: int):
  """A cache maker that always makes ``slots`` slots (``generate`` asks for the bucketed prompt
  length + max_new_tokens): the N-token and 1-token programs then share the prefill and cache."""
  def make(batch: int, n: int):
    if n > slots:
      raise ValueError(f'generate asked for {n} cache slots; this benchmark made {slots}')
    return make_cache(batch, slots)
  return make


def runner(step, make_cache, ids, new_tokens: int):
  """A zero-argument greedy ``generate`` of right-padded ``ids`` (no stop tokens, no shared
  prefix: a library batch computes none, so neither does its reference)."""
  lengths = np.full((ids.shape[0],), ids.shape[1], np.int32)
  return lambda: generation.generate(step, make_cache, ids, lengths, max_new_tokens=new_tokens,
                                     share_prefix=False)


@functools.partial(jax.jit, donate_argnames=('cache',))
def _prefill(step, ids, cache):
  """Every prompt through ``step`` (all rows the same length) and its first greedy token."""
  b, p = ids.shape
  positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  logits, cache = step(ids, positions, cache, logits_at=jnp.full((b, 1), p - 1, jnp.int32))
  return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache


@functools.partial(jax.jit, donate_argnames=('cache',))
def _decode(step, tok, pos, cache):
  """One decode step, as ``generation.generate``'s loop body runs it: each row's token at its
  position, the greedy next token."""
  logits, cache = step(tok[:, None], pos[:, None], cache)
  return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache


class DecodeStepper:
  """Calls one decode step of ``step`` per call, on a cache its prefill of ``ids`` filled: the
  token each call feeds is the previous call's, always at the position after the prompt (the
  step's cost does not depend on it; the cache is donated and reused in place)."""

  def __init__(self, step, make_cache, ids, slots: int):
    self.step = step
    self.tok, self.cache = _prefill(step, jnp.asarray(ids), make_cache(ids.shape[0], slots))
    self.pos = jnp.full((ids.shape[0],), ids.shape[1], jnp.int32)

  def __call__(self):
    self.tok, self.cache = _decode(self.step, self.tok, self.pos, self.cache)
    return self.tok


def run(args) -> dict:
  c = config(args, 'lora')
  t0 = time.perf_counter()
  built, _ = models.build_lm(c.model, seed=c.seed)
  load_s = time.perf_counter() - t0
  module, params, cfg = built.module, built.params, built.module.cfg
  n_new, prompt = args.new_tokens, args.prompt
  slots = generation.length_bucket(prompt) + n_new
  rng = np.random.default_rng(1)
  ids = rng.integers(1, cfg.vocab_size, (REQUESTS, prompt)).astype(np.int32)
  plain = fixed(functools.partial(init_cache, cfg), slots)

  # ------------------------------------------------------------------ candidates
  lora = peft.build(c.peft)
  adapters = [trained_like(lora, module, params, 10 + i) for i in range(ADAPTERS)]
  t0 = time.perf_counter()
  lib = LMAdapterLibrary(module, params, max_rank=c.peft.lora.rank)
  for i, p in enumerate(adapters):
    lib.add_method(f'a{i}', lora, p)
  library_s = time.perf_counter() - t0
  rows = [f'a{i % ADAPTERS}' for i in range(REQUESTS)]  # 2 requests per adapter
  mixed_step, mixed_cache = lib.step(rows)
  merged = generation.model_step(module, lib.merged_params('a0'))
  base = generation.model_step(module, params)
  pc = config(args, 'prefix')
  prefix_method = peft.build(pc.peft)
  prefix_params = trained_like(prefix_method, module, params, 99)
  prefix_step = generation.method_step(module, prefix_method, params, prefix_params)
  prefix_cache = fixed(generation.method_cache(functools.partial(init_cache, cfg), module,
                                               prefix_method, params, prefix_params), slots)
  candidates = {'mixed': (mixed_step, fixed(mixed_cache, slots)), 'merged': (merged, plain),
                'prefix': (prefix_step, prefix_cache), 'base': (base, plain)}
  compile_s, outputs = {}, {}
  prefills, decodes = {}, {}
  for name, (step, cache) in candidates.items():  # the first call compiles each program
    prefills[name] = runner(step, cache, ids, 1)
    t0 = time.perf_counter()
    prefills[name]()
    decodes[name] = DecodeStepper(step, cache, ids, slots)
    decodes[name]()
    compile_s[name] = time.perf_counter() - t0
  for name in ('mixed', 'merged'):  # greedy tokens, untimed: the same adapter on row 0
    outputs[name] = runner(*candidates[name], ids, n_new)()

  # ------------------------------------------------------------------ hot swap
  before = generation.compile_count()
  lib.add_method('a3', lora, trained_like(lora, module, params, 1000))  # same rank and layers
  swap_step, swap_cache = lib.step(rows)
  runner(swap_step, fixed(swap_cache, slots), ids, n_new)()
  remix_step, remix_cache = lib.step(rows[::-1])
  runner(remix_step, fixed(remix_cache, slots), ids, n_new)()
  swap_recompiles = generation.compile_count() - before

  # ------------------------------------------------------------------ timing
  step_times = timing.interleaved(decodes, steps=args.steps, warmup=args.warmup)
  prefill_times = timing.interleaved(prefills, steps=args.rounds, warmup=args.warmup)
  per_step = {k: float(np.median(v)) for k, v in step_times.items()}
  prefill = {k: float(np.median(v)) for k, v in prefill_times.items()}

  # ------------------------------------------------------------------ int8 vs float32, batch 1
  qc = lm_compress.get_config('qat,tiny' if args.quick else 'qat')
  t0 = time.perf_counter()
  q8 = int8.convert(module, params, {'input_ids': jnp.ones((1, 8), jnp.int32)}, qc.quant)
  convert_s = time.perf_counter() - t0
  one = ids[:1]
  b1 = {}
  for name, step in (('int8', q8.step()), ('f32', base)):
    t0 = time.perf_counter()
    b1[name] = DecodeStepper(step, plain, one, slots)
    b1[name]()
    compile_s[f'{name}_b1'] = time.perf_counter() - t0
    outputs[f'{name}_b1'] = runner(step, plain, one, n_new)()
  b1_times = timing.interleaved(b1, steps=args.steps, warmup=args.warmup)
  per_token = {k: float(np.median(v)) for k, v in b1_times.items()}

  result = {
      'mixed_adapters_decode_ratio': per_step['mixed'] / per_step['merged'],
      'mixed_adapters_prefill_ratio': prefill['mixed'] / prefill['merged'],
      'prefix_decode_ratio': per_step['prefix'] / per_step['base'],
      'swap_recompiles': int(swap_recompiles),
      'int8_decode_speedup': per_token['f32'] / per_token['int8'],
      'mixed_decode_ms_per_step': per_step['mixed'] * 1e3,
      'merged_decode_ms_per_step': per_step['merged'] * 1e3,
      'prefix_decode_ms_per_step': per_step['prefix'] * 1e3,
      'base_decode_ms_per_step': per_step['base'] * 1e3,
      'mixed_prefill_ms': prefill['mixed'] * 1e3,
      'merged_prefill_ms': prefill['merged'] * 1e3,
      'int8_decode_ms_per_token_b1': per_token['int8'] * 1e3,
      'f32_decode_ms_per_token_b1': per_token['f32'] * 1e3,
  }
  result['meets_targets'] = {k: timing.meets(result[k], t) for k, t in TARGETS.items()}
  result['target_notes'] = {k: f'{result[k]:.3f} ({timing.target_note(k, result, TARGETS)})'
                            for k in TARGETS}
  result['details'] = {
      'paired_mixed_decode_ratio': timing.paired_ratio(step_times['mixed'],
                                                       step_times['merged']),
      'paired_prefix_decode_ratio': timing.paired_ratio(step_times['prefix'], step_times['base']),
      'paired_mixed_prefill_ratio': timing.paired_ratio(prefill_times['mixed'],
                                                        prefill_times['merged']),
      'paired_int8_decode_speedup': 1.0 / timing.paired_ratio(b1_times['int8'], b1_times['f32']),
      'merged_vs_base_decode_ratio': per_step['merged'] / per_step['base'],
      'decode_step': {k: timing.spread(v) for k, v in step_times.items()},
      'decode_step_b1': {k: timing.spread(v) for k, v in b1_times.items()},
      'prefill': {k: timing.spread(v) for k, v in prefill_times.items()},
      'tokens_generated': {k: int(np.sum(o.lengths)) for k, o in outputs.items()},
      # Row 0 runs adapter a0 in the mixed batch and merged into the base beside it: the same
      # model (to float rounding), so greedy should agree.
      'greedy_mixed_row0_equals_merged_row0': bool(np.array_equal(outputs['mixed'].ids[0],
                                                                  outputs['merged'].ids[0])),
      'greedy_int8_equals_f32_b1': bool(np.array_equal(outputs['int8_b1'].ids,
                                                       outputs['f32_b1'].ids)),
      'library': {'slots': lib.slots, 'max_rank': lib.max_rank,
                  'lora_sites': list(lib.layout.lora),
                  'stack_bytes': int(sum(np.asarray(x).nbytes
                                         for x in jax.tree.leaves(lib.stacks)))},
      'int8_weight_bytes': int(q8.weight_bytes),
      'f32_weight_bytes': int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))),
      'compile_and_first_call_s': compile_s,
      'model_load_s': load_s,
      'library_build_s': library_s,
      'int8_convert_s': convert_s,
  }
  result['notes'] = {
      'decode': (f'median of {args.steps} interleaved calls of each candidate\'s jitted '
                 f'decode step (its generation step function, one token per row, greedy) on a '
                 f'{slots}-slot cache its own prefill of the {prompt}-token prompts filled'),
      'prefill': (f'median of {args.rounds} interleaved generation.generate calls on '
                  f'{REQUESTS} x {prompt} prompts with 1 new token: the prefill and the first '
                  'token, no shared prefix'),
      'mixed': (f'{REQUESTS} requests over {ADAPTERS} LoRA adapters (2 each) in one batch of an '
                'LMAdapterLibrary (each row gathers its factors in every adapted layer) vs the '
                'same batch on one model with adapter a0 merged'),
      'prefix': ('a prefix-tuned model as its run generates with it (method_step + '
                 'method_cache: the prefix computed once, in the KV cache) vs the base; '
                 f'peft.prefix.length={pc.peft.prefix.length}'),
      'int8': ('batch 1; layer kernels and the tied embedding in int8 (configs/lm_compress.py '
               'qat settings: per-channel weights, per-token dynamic activations) vs float32'),
      'machine': ('a shared machine: other jobs ran during the measurement (see '
                  'settings.load_average_1m); ratios are of interleaved runs in one process'),
  }
  result['settings'] = {
      'model': 'random 2-layer Llama (quick)' if args.quick else
               'SmolLM2-135M-Instruct (bundled GGUF, dequantized to float32)',
      'model_source': built.source,
      'num_layers': cfg.num_layers,
      'hidden_size': cfg.hidden_size,
      'requests': REQUESTS,
      'adapters': ADAPTERS,
      'prompt_length': prompt,
      'new_tokens': n_new,
      'cache_slots': slots,
      'lora': {k: c.peft.lora[k] for k in ('rank', 'alpha', 'targets')},
      'prefix_length': pc.peft.prefix.length,
      'quant': {k: qc.quant[k] for k in ('targets', 'embeddings', 'activations', 'per_channel')},
      'dtype': cfg.dtype,
      'timed_decode_steps': args.steps,
      'timed_prefill_rounds': args.rounds,
      'timing_warmup': args.warmup,
      'order': {'decode': 'interleaved ' + '/'.join(decodes),
                'prefill': 'interleaved ' + '/'.join(prefills),
                'int8': 'interleaved ' + '/'.join(b1)},
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
  s = r['settings']
  note = lambda k: timing.target_note(k, r, TARGETS)
  rows = [
      [f"mixed {s['requests']} requests / {s['adapters']} adapters vs merged, decode",
       r['mixed_adapters_decode_ratio'], note('mixed_adapters_decode_ratio')],
      ['mixed vs merged, prefill', r['mixed_adapters_prefill_ratio'],
       note('mixed_adapters_prefill_ratio')],
      ['prefix tuning vs base, decode', r['prefix_decode_ratio'], note('prefix_decode_ratio')],
      ['recompiles on a hot swap + another mix', r['swap_recompiles'], note('swap_recompiles')],
      ['int8 / float32 decode speedup, batch 1', r['int8_decode_speedup'], 'report'],
  ]
  return '\n'.join([
      f"{s['model']}, {s['num_layers']} layers ({s['backend']}, jax {s['jax']})",
      timing.format_table(rows, ['', 'value', 'target']),
      f"decode ms/step at batch {s['requests']}: mixed {r['mixed_decode_ms_per_step']:.1f}, "
      f"merged {r['merged_decode_ms_per_step']:.1f}, prefix {r['prefix_decode_ms_per_step']:.1f},"
      f" base {r['base_decode_ms_per_step']:.1f}; prefill ms: mixed {r['mixed_prefill_ms']:.0f}, "
      f"merged {r['merged_prefill_ms']:.0f}",
      f"batch 1 decode ms/step: int8 {r['int8_decode_ms_per_token_b1']:.1f}, float32 "
      f"{r['f32_decode_ms_per_token_b1']:.1f}",
  ])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=60, help='timed decode steps per candidate '
                 '(>= 20)')
  p.add_argument('--rounds', type=int, default=20, help='timed prefill rounds per candidate '
                 '(>= 20)')
  p.add_argument('--warmup', type=int, default=2, help='untimed calls per candidate')
  p.add_argument('--prompt', type=int, default=128, help='prompt tokens per request')
  p.add_argument('--new-tokens', type=int, default=32,
                 help='decode room in the cache beyond the prompt (>= 2)')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: a random 2-layer model, tiny shapes, 2 rounds; prints, writes '
                      'only --out')
  p.add_argument('--out', default=None,
                 help=f'JSON output path (default {RESULTS.relative_to(ROOT)}; none with --quick)')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.rounds, args.warmup = min(args.steps, 3), min(args.rounds, 2), 1
    args.prompt, args.new_tokens = 16, 4
  else:
    for flag, value in (('--steps', args.steps), ('--rounds', args.rounds)):
      if value < 20:
        p.error(f'{flag}={value}; the figures are medians over at least 20 calls (use --quick '
                'for a smoke test)')
  if args.new_tokens < 2:
    p.error(f'--new-tokens={args.new_tokens}; valid: >= 2 (decode time is the difference '
            'between N and 1 new tokens)')
  return timing.run_and_publish(run, report, args, RESULTS)


if __name__ == '__main__':
  main()
