"""The decoder LM: LoRA vs full step time, training MFU, decode throughput and roofline, prefill.

SmolLM2-135M-Instruct (the bundled GGUF, dequantized to float32; 30 layers under ``nn.scan``),
float32 throughout. Two rotations, each timed interleaved after compiling and a warm-up, the
figures medians, every ratio measured in this one process:

* **training**: the trainer's own jitted, donated step (``step.make_train_step`` over
  ``run.make_forward``, AdamW, the causal-LM task's completion-only loss) on a batch of 8 x 128
  tokens, for ``configs/lm_quickstart.py``'s LoRA (r=8 on ``attn/(q|k|v|o)_proj/kernel``) and
  the same config with ``peft.method='full'``, with a large float32 matmul as the FLOP/s probe.
  The batch is synthetic (random ids, two packed examples a row, loss on each one's second
  half): the step's cost does not depend on the tokens.
* **generation**: ``peftjax.generation.generate`` (greedy, no stop tokens, 128-token prompts) at
  batch 1 and 16, each with ``--new-tokens`` N and with 1 new token, given the same cache of
  128 + N slots; with a large-array reduction and an in-place copy as the memory-bandwidth
  probes.

Derived figures:

* decode time per token = (median time with N new tokens - median with 1) / (N - 1): the two
  programs run the same prefill on the same cache, so the difference is N - 1 decode steps;
* ``train_mfu`` = LoRA step FLOPs / (LoRA step time x the probe's FLOP/s). The FLOPs are XLA's
  cost analysis of the same step with the layers unrolled (``model.scan_layers=False``),
  compiled but not run: XLA's cost analysis counts a while loop's body once, so the scanned
  step's own figure (reported beside it) counts one of the 30 layers;
* ``decode_roofline_b1`` = (weight bytes + KV-cache bytes of the context) per token / (time per
  token x the best probe bandwidth);
* ``prefill_ms`` = the median of ``generate`` on 16 x 128 prompts with 1 new token (the prefill
  and the first token's choice).

  python benchmarks/lm.py            # writes benchmarks/results/lm.json
  python benchmarks/lm.py --quick    # smoke test: a random 2-layer model, prints JSON only
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import lm_quickstart  # noqa: E402
from peftjax import generation  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax import optim  # noqa: E402
from peftjax import peft  # noqa: E402
from peftjax import quant  # noqa: E402
from peftjax import run as run_lib  # noqa: E402
from peftjax import step as step_lib  # noqa: E402
from peftjax import timing  # noqa: E402
from peftjax import tree as tree_lib  # noqa: E402
from peftjax.models import Built  # noqa: E402
from peftjax.models.lm_build import INPUT_KEYS  # noqa: E402
from peftjax.models.llama import LlamaForCausalLM  # noqa: E402
from peftjax.models.llama import init_cache  # noqa: E402
from peftjax.tasks.causal_lm import CausalLM  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'lm.json'
LORA_TARGETS = r'attn/(q|k|v|o)_proj/kernel$'
TARGETS = {'lora_vs_full_step_ratio': ('<=', 0.70), 'train_mfu': ('>=', 0.7),
           'decode_roofline_b1': ('>=', 0.6), 'batch16_vs_batch1_throughput': ('>=', 8.0)}


# ----------------------------------------------------------------------------- training


def lm_step_config(args, method: str):
  """``configs/lm_quickstart.py`` at the benchmark's batch shape, with ``peft.method=method``
  (everything else, optimizer included, identical between the candidates)."""
  c = lm_quickstart.get_config()
  c.peft.method = method
  c.peft.lora.rank, c.peft.lora.targets = 8, LORA_TARGETS
  c.train.batch_size, c.data.max_length = args.batch, args.length
  if args.quick:
    c.model.pretrained = 'random'  # configs/common.py's model.llama: 2 layers, width 64
  return c


def make_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
  """A causal-LM batch in the loop's format: two packed examples a row (segments 1 and 2,
  positions restarting), next-token targets, the loss on the second half of each example."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, vocab, (batch, length)).astype(np.int32)
  half = length // 2
  seg = np.where(np.arange(length) < half, 1, 2).astype(np.int32)
  pos = np.where(np.arange(length) < half, np.arange(length), np.arange(length) - half)
  targets = np.zeros_like(ids)
  targets[:, :-1] = ids[:, 1:]
  last = np.r_[seg[1:] != seg[:-1], True]  # an example's last token predicts nothing
  scored = (pos >= (half // 2)) & ~last
  return {'input_ids': jnp.asarray(ids),
          'attention_mask': jnp.asarray(np.broadcast_to(seg, ids.shape)),
          'positions': jnp.asarray(np.broadcast_to(pos.astype(np.int32), ids.shape)),
          'targets': jnp.asarray(targets),
          'loss_mask': jnp.asarray(np.broadcast_to(scored.astype(np.int32), ids.shape))}


def _copy(tree):
  """Fresh buffers, so donating one candidate's state never deletes another's arrays."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def build_candidate(config, built, batch) -> dict:
  """The trainer's step for ``config``: initial state, frozen tree and compiled executable."""
  method = quant.wrap(peft.build(config.peft), config.quant)
  length = batch['input_ids'].shape[1]
  ids = jnp.ones((1, length), jnp.int32)
  inputs = {'input_ids': ids, 'attention_mask': ids,
            'positions': jnp.arange(length, dtype=jnp.int32)[None]}
  peft_params = method.init(jax.random.key(config.seed + 1), built.module, built.params, inputs)
  base = method.prepare_base(built.params, peft_params, module=built.module, inputs=inputs)
  base_trainable, frozen = tree_lib.partition(base, method.trainable_base)
  trainable = _copy({'base': base_trainable, 'peft': peft_params})
  # -- as train.train_and_evaluate builds them (the LM configs turn no loop component on)
  tx = optim.make_optimizer(config.optim, config.train.steps,
                            num_layers=built.module.cfg.num_layers)
  state = run_lib.TrainState.create(tx, trainable, seed=config.seed)
  forward = run_lib.make_forward(built, method)
  step = jax.jit(step_lib.make_train_step(forward, tx, CausalLM(config)), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = timing.compile_fn(step, state, frozen, batch)
  return {'state': state, 'frozen': frozen, 'compiled': compiled,
          'compile_s': time.perf_counter() - t0,
          'size': tree_lib.size_report(trainable, frozen),
          'opt_state_bytes': tree_lib.nbytes(state.opt_state),
          'flops': timing.cost_flops(compiled), 'memory': timing.memory_bytes(compiled)}


def unrolled_flops(config, cfg, batch) -> float:
  """XLA's FLOPs of the LoRA step of ``config`` with the layers of ``cfg`` unrolled, compiled on
  abstract arguments (nothing is initialised or run): the scanned step's cost analysis counts
  the loop body, one layer, once."""
  module = LlamaForCausalLM(dataclasses.replace(cfg, scan_layers=False))
  ids = jnp.ones((1, batch['input_ids'].shape[1]), jnp.int32)
  boxed = jax.eval_shape(lambda k: module.init(k, ids)['params'], jax.random.key(0))
  built = Built(module, nn.meta.unbox(boxed), INPUT_KEYS, nn.get_partition_spec(boxed),
                'abstract')
  method = quant.wrap(peft.build(config.peft), config.quant)
  inputs = {'input_ids': ids, 'attention_mask': ids,
            'positions': jnp.arange(ids.shape[1], dtype=jnp.int32)[None]}
  tx = optim.make_optimizer(config.optim, config.train.steps, num_layers=cfg.num_layers)

  def initial(params):
    peft_params = method.init(jax.random.key(config.seed + 1), module, params, inputs)
    base = method.prepare_base(params, peft_params, module=module, inputs=inputs)
    base_trainable, frozen = tree_lib.partition(base, method.trainable_base)
    state = run_lib.TrainState.create(tx, {'base': base_trainable, 'peft': peft_params},
                                      seed=config.seed)
    return state, frozen
  state, frozen = jax.eval_shape(initial, built.params)
  forward = run_lib.make_forward(built, method)
  step = jax.jit(step_lib.make_train_step(forward, tx, CausalLM(config)), donate_argnums=(0,))
  return timing.cost_flops(timing.compile_fn(step, state, frozen, batch))


def forward_flops(cfg, batch: int, length: int, rank: int = 0) -> float:
  """Matmul FLOPs of one forward (2 per multiply-add): the projections, the tied output layer,
  causal attention computed over the whole (length x length) score matrix, and LoRA's ``rank``
  adapters on q/k/v/o. An analytic cross-check of the cost analysis, not a reported target."""
  d, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per_token = cfg.num_layers * (d * q + 2 * d * kv + q * d + 3 * d * m) + d * v
  attention = cfg.num_layers * 2 * length * q  # scores and the weighted sum of values
  lora = cfg.num_layers * rank * ((d + q) + 2 * (d + kv) + (q + d)) if rank else 0
  return 2.0 * batch * length * (per_token + attention + lora)


# ----------------------------------------------------------------------------- generation


def fixed_cache(cfg, slots: int):
  """A ``generate`` cache maker that always makes ``slots`` slots (``generate`` asks for the
  bucketed prompt length + max_new_tokens): the N-token and 1-token programs then run the same
  prefill on the same cache, and their time difference is N - 1 decode steps."""
  def make(batch: int, n: int):
    if n > slots:
      raise ValueError(f'generate asked for {n} cache slots; this benchmark made {slots}')
    return init_cache(cfg, batch, slots)
  return make


def generate_runner(step, cache, ids, new_tokens: int):
  """A zero-argument call of greedy ``generate`` (no stop tokens) on right-padded ``ids``."""
  lengths = np.full((ids.shape[0],), ids.shape[1], np.int32)
  return lambda: generation.generate(step, cache, ids, lengths, max_new_tokens=new_tokens)


def bandwidth_probes(mib: int) -> dict:
  """``{'sum': (run, bytes), 'copy': (run, bytes)}``: a jitted sum of a ``mib`` MiB float32
  array (reads it once) and a donated in-place ``x + 1`` of another (reads and writes it).

  The in-place copy reuses its buffer, so no fresh output pages are faulted in per call (a
  non-donated copy ran at about a tenth of the sum's rate here for that reason alone).
  """
  n = mib * 2**20 // 4
  x = jnp.arange(n, dtype=jnp.float32)
  total = jax.jit(jnp.sum).lower(x).compile()
  bump = jax.jit(lambda a: a + 1.0, donate_argnums=(0,)).lower(x).compile()
  holder = {'y': jnp.array(x, copy=True)}

  def copy():
    holder['y'] = bump(holder['y'])
    return holder['y']
  return {'sum': ((lambda: total(x)), 4 * n), 'copy': (copy, 8 * n)}


def weight_bytes(params) -> int:
  """Bytes of the weights one decode step reads: every parameter once (the tied embedding is
  the output layer's matrix; the lookup reads one row of it)."""
  return int(tree_lib.nbytes(params))


def kv_bytes_per_position(cfg, dtype_bytes: int = 4) -> int:
  """Bytes of keys and values one cached position holds, over all layers."""
  return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes


# ----------------------------------------------------------------------------- the benchmark


def run(args) -> dict:
  lora_cfg, full_cfg = lm_step_config(args, 'lora'), lm_step_config(args, 'full')
  t0 = time.perf_counter()
  built, _ = models.build_lm(lora_cfg.model, seed=lora_cfg.seed)
  load_s = time.perf_counter() - t0
  cfg = built.module.cfg
  batch = make_batch(args.batch, args.length, cfg.vocab_size)

  # ------------------------------------------------------------------ training rotation
  lora = build_candidate(lora_cfg, built, batch)
  full = build_candidate(full_cfg, built, batch)
  lora_run = timing.DonatingStepper(lora['compiled'], lora['state'], lora['frozen'], batch)
  full_run = timing.DonatingStepper(full['compiled'], full['state'], full['frozen'], batch)
  probe, probe_flops = timing.matmul_probe(args.matmul_n)
  times = timing.interleaved({'lora': lora_run, 'full': full_run, 'matmul': probe},
                             steps=args.steps, warmup=args.warmup)
  final_loss = {'lora': float(lora_run()[1]['loss']), 'full': float(full_run()[1]['loss'])}
  del lora_run, full_run, lora['state'], full['state'], lora['compiled'], full['compiled']
  matmul_flops = probe_flops / float(np.median(times['matmul']))
  t0 = time.perf_counter()
  lora_flops = unrolled_flops(lora_cfg, cfg, batch)
  flops_s = time.perf_counter() - t0
  lora_ms, full_ms = timing.median_ms(times['lora']), timing.median_ms(times['full'])

  # ------------------------------------------------------------------ generation rotation
  n_new, prompt = args.new_tokens, args.prompt
  slots = generation.length_bucket(prompt) + n_new
  cache = fixed_cache(cfg, slots)
  step = generation.model_step(built.module, built.params)
  rng = np.random.default_rng(1)
  ids16 = rng.integers(1, cfg.vocab_size, (16, prompt)).astype(np.int32)
  ids1 = ids16[:1]
  gens = {'b1_n': generate_runner(step, cache, ids1, n_new),
          'b1_1': generate_runner(step, cache, ids1, 1),
          'b16_n': generate_runner(step, cache, ids16, n_new),
          'b16_1': generate_runner(step, cache, ids16, 1)}
  compile_s, outputs = {}, {}
  for name, fn in gens.items():  # the first call compiles each program
    t0 = time.perf_counter()
    outputs[name] = fn()
    compile_s[name] = time.perf_counter() - t0
  probes = bandwidth_probes(args.bandwidth_mib)
  gen_times = timing.interleaved({**gens, **{f'bw_{k}': p[0] for k, p in probes.items()}},
                                 steps=args.decode_rounds, warmup=args.warmup)
  bandwidth = {k: p[1] / float(np.median(gen_times[f'bw_{k}'])) for k, p in probes.items()}
  best_bw = max(bandwidth.values())

  def per_token_s(b: str) -> float:
    return (float(np.median(gen_times[f'{b}_n'])) - float(np.median(gen_times[f'{b}_1']))) / (
        n_new - 1)

  def paired_per_token_s(b: str) -> float:
    return float(np.median(gen_times[f'{b}_n'] - gen_times[f'{b}_1'])) / (n_new - 1)

  tok_s_b1, tok_s_b16 = 1.0 / per_token_s('b1'), 16.0 / per_token_s('b16')
  w_bytes = weight_bytes(built.params)
  kv_pos = kv_bytes_per_position(cfg)
  # The decode steps timed attend contexts of prompt + 1 .. prompt + N - 1 positions.
  mean_context = prompt + n_new / 2.0
  bytes_per_token_b1 = w_bytes + kv_pos * mean_context

  result = {
      'lora_vs_full_step_ratio': lora_ms / full_ms,
      'train_mfu': lora_flops / (lora_ms * 1e-3 * matmul_flops),
      'decode_tokens_per_s_b1': tok_s_b1,
      'decode_tokens_per_s_b16': tok_s_b16,
      'decode_roofline_b1': bytes_per_token_b1 / (per_token_s('b1') * best_bw),
      'batch16_vs_batch1_throughput': tok_s_b16 / tok_s_b1,
      'prefill_ms': timing.median_ms(gen_times['b16_1']),
      'lora_step_ms': lora_ms,
      'full_step_ms': full_ms,
      'decode_ms_per_token_b1': per_token_s('b1') * 1e3,
      'decode_ms_per_step_b16': per_token_s('b16') * 1e3,
  }
  result['meets_targets'] = {k: timing.meets(result[k], t) for k, t in TARGETS.items()}
  result['target_notes'] = {k: f'{result[k]:.3f} ({timing.target_note(k, result, TARGETS)})'
                            for k in TARGETS}
  result['probes'] = {
      'matmul_gflops': matmul_flops / 1e9,
      'matmul': timing.spread(times['matmul']),
      'bandwidth_gb_s': {k: v / 1e9 for k, v in bandwidth.items()},
      'bandwidth_used_gb_s': best_bw / 1e9,
      'bandwidth': {k: timing.spread(gen_times[f'bw_{k}']) for k in probes},
  }
  result['details'] = {
      'paired_step_time_ratio': timing.paired_ratio(times['lora'], times['full']),
      'lora_step': timing.spread(times['lora']),
      'full_step': timing.spread(times['full']),
      'lora_gflops_per_step': lora_flops / 1e9,
      'lora_gflops_scanned_cost_analysis': lora['flops'] / 1e9,
      'full_gflops_scanned_cost_analysis': full['flops'] / 1e9,
      'forward_gflops_analytic': {
          'lora': forward_flops(cfg, args.batch, args.length, rank=8) / 1e9,
          'full': forward_flops(cfg, args.batch, args.length) / 1e9},
      'lora_trainable_params': lora['size']['trainable_params'],
      'full_trainable_params': full['size']['trainable_params'],
      'total_params': lora['size']['total_params'],
      'lora_opt_state_bytes': lora['opt_state_bytes'],
      'full_opt_state_bytes': full['opt_state_bytes'],
      'lora_memory_bytes': lora['memory'],
      'full_memory_bytes': full['memory'],
      'final_loss': final_loss,
      'generate': {k: timing.spread(gen_times[k]) for k in gens},
      'paired_decode_ms_per_token_b1': paired_per_token_s('b1') * 1e3,
      'paired_decode_ms_per_step_b16': paired_per_token_s('b16') * 1e3,
      'tokens_generated': {k: int(np.sum(o.lengths)) for k, o in outputs.items()},
      'greedy_b1_equals_b16_row0': bool(np.array_equal(outputs['b1_n'].ids[0],
                                                      outputs['b16_n'].ids[0])),
      'weight_bytes': w_bytes,
      'kv_bytes_per_position': kv_pos,
      'decode_bytes_per_token_b1': bytes_per_token_b1,
      'cache_slots': slots,
      'compile_s': {'lora': lora['compile_s'], 'full': full['compile_s'],
                    'unrolled_lora_flops_only': flops_s, **{f'generate_{k}': v
                                                            for k, v in compile_s.items()}},
      'model_load_s': load_s,
  }
  result['notes'] = {
      'decode': (f'decode time per token = (median generate with {n_new} new tokens - median '
                 f'with 1) / {n_new - 1}, both on the same {slots}-slot cache (the same prefill);'
                 ' greedy, no stop tokens, every row generates all its tokens; tokens/s at b16 '
                 'counts the 16 rows'),
      'prefill_ms': (f'median generate of 16 x {prompt} prompts with 1 new token: the prefill '
                     f'and the first token, on the {slots}-slot cache'),
      'train_flops': ('XLA cost analysis of the LoRA step built with model.scan_layers=False '
                      '(compiled, not run); the scanned step timed is the same computation, '
                      'but cost analysis counts a while-loop body once (see '
                      'details.lora_gflops_scanned_cost_analysis)'),
      'roofline': ('bytes per token = every weight once (float32) + the keys and values of the '
                   f'mean context ({mean_context:g} positions); bandwidth = the better of the '
                   'sum and in-place copy probes, timed in the same rotation'),
      'batch': ('synthetic 8 x 128 tokens: random ids, two packed examples a row, the loss on '
                "each example's second half (the step's cost does not depend on the tokens)"),
  }
  result['settings'] = {
      'model': 'random 2-layer Llama (quick)' if args.quick else
               'SmolLM2-135M-Instruct (bundled GGUF, dequantized to float32)',
      'model_source': built.source,
      'num_layers': cfg.num_layers,
      'hidden_size': cfg.hidden_size,
      'scan_layers': cfg.scan_layers,
      'batch_size': args.batch,
      'max_length': args.length,
      'prompt_length': prompt,
      'new_tokens': n_new,
      'peft': {'method': 'lora', **{k: lora_cfg.peft.lora[k]
                                    for k in ('rank', 'alpha', 'dropout', 'targets')}},
      'optimizer': {**{k: lora_cfg.optim[k] for k in ('learning_rate', 'schedule', 'warmup_steps',
                                                      'weight_decay', 'clip_norm')},
                    'name': 'adamw', 'total_steps': lora_cfg.train.steps},
      'grad_barrier': cfg.grad_barrier,
      'remat': cfg.remat,
      'dtype': cfg.dtype,
      'timed_steps': args.steps,
      'decode_rounds': args.decode_rounds,
      'timing_warmup_steps': args.warmup,
      'order': {'training': 'interleaved lora/full/matmul',
                'generation': 'interleaved b1_n/b1_1/b16_n/b16_1/bw_sum/bw_copy'},
      'matmul_probe': f'{args.matmul_n}x{args.matmul_n} float32, jitted, interleaved',
      'bandwidth_probe': f'{args.bandwidth_mib} MiB float32 sum and in-place x + 1, interleaved',
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
  d, p, s = r['details'], r['probes'], r['settings']
  note = lambda k: timing.target_note(k, r, TARGETS)
  rows = [
      ['LoRA / full step time', r['lora_vs_full_step_ratio'], note('lora_vs_full_step_ratio')],
      ['LoRA step MFU', r['train_mfu'], note('train_mfu')],
      ['decode tokens/s, batch 1', r['decode_tokens_per_s_b1'], ''],
      ['decode tokens/s, batch 16', r['decode_tokens_per_s_b16'], ''],
      ['decode roofline, batch 1', r['decode_roofline_b1'], note('decode_roofline_b1')],
      ['batch 16 / batch 1 throughput', r['batch16_vs_batch1_throughput'],
       note('batch16_vs_batch1_throughput')],
      [f"prefill 16 x {s['prompt_length']} (ms)", r['prefill_ms'], ''],
  ]
  lines = [
      f"{s['model']}, {s['num_layers']} layers, float32 ({s['backend']}, jax {s['jax']})",
      timing.format_table(rows, ['', 'value', 'target']),
      f"steps (ms, median of {s['timed_steps']}): LoRA {r['lora_step_ms']:.1f}, full "
      f"{r['full_step_ms']:.1f} (batch {s['batch_size']} x {s['max_length']}); paired ratio "
      f"{d['paired_step_time_ratio']:.3f}; LoRA step {d['lora_gflops_per_step']:.1f} GFLOPs",
      f"decode: {r['decode_ms_per_token_b1']:.1f} ms/token at batch 1, "
      f"{r['decode_ms_per_step_b16']:.1f} ms/step at batch 16; "
      f"{d['decode_bytes_per_token_b1'] / 2**20:.1f} MiB read per token at batch 1",
      f"probes: matmul {p['matmul_gflops']:.1f} GFLOP/s; bandwidth "
      + ', '.join(f'{k} {v:.1f} GB/s' for k, v in p['bandwidth_gb_s'].items()),
  ]
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=20, help='timed training rounds (>= 20)')
  p.add_argument('--decode-rounds', type=int, default=20, help='timed generation rounds (>= 20)')
  p.add_argument('--warmup', type=int, default=2, help='untimed calls per candidate')
  p.add_argument('--batch', type=int, default=8, help='training batch size')
  p.add_argument('--length', type=int, default=128, help='training tokens per row')
  p.add_argument('--prompt', type=int, default=128, help='prompt tokens per row for generation')
  p.add_argument('--new-tokens', type=int, default=32,
                 help='new tokens of the long generate call (>= 2)')
  p.add_argument('--matmul-n', type=int, default=2048, help='size of the FLOP/s probe matmul')
  p.add_argument('--bandwidth-mib', type=int, default=256,
                 help='MiB of the bandwidth probes (larger than every cache)')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: a random 2-layer model, tiny shapes, 3 rounds; prints, '
                      'writes only --out')
  p.add_argument('--out', default=None,
                 help=f'JSON output path (default {RESULTS.relative_to(ROOT)}; none with --quick)')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.decode_rounds, args.warmup = min(args.steps, 3), min(args.decode_rounds, 3), 1
    args.batch, args.length, args.prompt, args.new_tokens = 2, 32, 16, 4
    args.matmul_n, args.bandwidth_mib = 512, 16
  else:
    for flag, value in (('--steps', args.steps), ('--decode-rounds', args.decode_rounds)):
      if value < 20:
        p.error(f'{flag}={value}; the figures are medians over at least 20 rounds '
                '(use --quick for a smoke test)')
  if args.new_tokens < 2:
    p.error(f'--new-tokens={args.new_tokens}; valid: >= 2 (decode time is the difference '
            'between N and 1 new tokens)')
  return timing.run_and_publish(run, report, args, RESULTS)


if __name__ == '__main__':
  main()
