"""Mixture-of-Experts costs on MiniLM-L6 dimensions, as ratios measured in one process.

A BERT-style encoder with MiniLM-L6's dimensions (hidden 384, 12 heads, 6 layers, vocabulary
30522, FFN 1536 per expert) + a 2-class head, trained on one batch of 32 Rotten Tomatoes reviews
x 64 tokens by the trainer's own jitted, donated step (``step.make_train_step`` with the
``moe_aux`` component: cross-entropy + 0.01 x balance loss + 0.001 x z-loss, value_and_grad, clipping + AdamW, dropout 0.1), with
every layer's FFN an MoE layer (random init):

* ``moe_vs_dense_step_ratio`` -- top-2 of 8 experts, sort-based dispatch, capacity factor 1.25,
  over the same encoder with a dense FFN of width 2 x 1536 = 3072 (the same active FLOPs per
  token, before capacity padding); target <= 1.6;
* ``experts_scaling_ratio`` -- the same step at 64 experts over 4 experts (k=2, experts of width
  1536: the same active FLOPs); target <= 1.3. The expert parameters, and with them AdamW's
  O(params) update and the dense expert-kernel gradients, grow 16x; the same ratio for the
  forward+backward alone (``experts_scaling_fwd_bwd_ratio``) and for one-hot dispatch
  (``onehot_experts_scaling_ratio``) are reported for contrast, with XLA's cost-analysis bytes;
* ``onehot_vs_sorted_ratio`` -- the 8-expert step with GShard's one-hot dispatch over sorted;
* ``dropped_fraction`` -- assignments past capacity (cf 1.25, top-2 of 8), averaged over the MoE
  layers, for the upcycled *pretrained* MiniLM (every FFN an MoE layer) on a real training batch;
  the random-init model's figure is reported for reference.

Candidates are compiled first and timed interleaved (A/B/C/A/B/C...) after a warm-up, in groups
whose members are compared with each other only: (dense, MoE sorted, MoE one-hot); (E=4 step,
its forward+backward, E=64 step, its forward+backward, one layer's expert matmuls alone at E=4
and E=64); (one-hot E=4, E=64). The figures are medians; ``details`` holds the spreads, the
paired ratios, XLA's cost and memory analyses and where the E=4 -> E=64 time goes.

  python benchmarks/moe.py            # writes benchmarks/results/moe.json
  python benchmarks/moe.py --quick    # smoke test: tiny model, 3 steps, prints only
"""
from __future__ import annotations

import argparse
import gc
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
import optax  # noqa: E402

from configs import common  # noqa: E402
from peftjax import data as data_lib  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax import moe as moe_lib  # noqa: E402
from peftjax import optim  # noqa: E402
from peftjax import peft  # noqa: E402
from peftjax import run as run_lib  # noqa: E402
from peftjax import step as step_lib  # noqa: E402
from peftjax import timing  # noqa: E402
from peftjax import tree as tree_lib  # noqa: E402
from peftjax.components import moe_aux  # noqa: E402
from peftjax.models.bert import BertClassifier  # noqa: E402
from peftjax.models.bert import BertConfig  # noqa: E402
from peftjax.models.bert import _gelu  # noqa: E402
from peftjax.models.build import Built  # noqa: E402
from peftjax.models.build import sample_inputs  # noqa: E402
from peftjax.moe import MoeConfig  # noqa: E402
from peftjax.tasks.classification import Classification  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'moe.json'
TARGETS = {'moe_vs_dense_step_ratio': ('<=', 1.6), 'experts_scaling_ratio': ('<=', 1.3)}
KEYS = ('moe_vs_dense_step_ratio', 'experts_scaling_ratio', 'onehot_vs_sorted_ratio',
        'dropped_fraction')
INPUT_KEYS = ('input_ids', 'attention_mask', 'token_type_ids')


# ----------------------------------------------------------------------------- set-up


def _config(args):
  """The trainer config every candidate shares: full fine-tuning, AdamW, dropout 0.1."""
  c = common.get_config()
  c.peft.method = 'full'
  c.train.batch_size, c.data.max_length = args.batch, args.length
  c.moe.top_k, c.moe.capacity_factor = args.top_k, args.capacity_factor
  return c


def _batches(config, n: int) -> list[dict]:
  """The first ``n`` training batches of Rotten Tomatoes (real reviews, padded to length)."""
  data = data_lib.build(config.data, tokenizer_path=str(data_lib.minilm_dir() / 'tokenizer.json'))
  ds = data.train_batches(config.train.batch_size, config.seed)
  return [{k: jnp.asarray(v) for k, v in ds[i].items()} for i in range(n)]


def _moe(args, num_experts: int, dispatch: str) -> MoeConfig:
  return MoeConfig(num_experts=num_experts, top_k=args.top_k,
                   capacity_factor=args.capacity_factor, dispatch=dispatch)


def _compile(jitted, args, *xs):
  """``jitted.lower(*xs).compile()``; ``--quick`` lowers XLA's backend optimization level (the
  smoke test's compiles take half the time; its timings mean nothing anyway)."""
  return jitted.lower(*xs).compile(compiler_options=args.compiler_options)


def _built(args, layers: int, moe: MoeConfig | None, intermediate: int, seed: int) -> Built:
  """A random-init classifier with MiniLM-L6's dimensions; every FFN MoE when ``moe`` is set."""
  cfg = BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=layers,
                   num_heads=args.heads, intermediate_size=intermediate,
                   dropout_rate=0.1, attention_dropout_rate=0.1, moe=moe,
                   moe_layers=tuple(range(layers)) if moe is not None else ())
  module = BertClassifier(cfg, num_classes=2)
  inputs = sample_inputs(INPUT_KEYS, length=args.length)
  init = jax.jit(lambda k: nn.meta.unbox(module.init(k, **inputs)['params']))
  key = jax.random.key(seed)
  return Built(module, _compile(init, args, key)(key), INPUT_KEYS, None, 'random')


def _cost(compiled) -> dict:
  """FLOPs and bytes accessed of one call, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return {'gflops': float(cost.get('flops', 0.0)) / 1e9,
          'gbytes_accessed': float(cost.get('bytes accessed', 0.0)) / 1e9}


def _fwd_bwd(forward, frozen, stepper, batch, config, args):
  """The train step's loss and gradients only (no optimizer update), on the stepper's params.

  The same loss as ``step.make_train_step`` (cross-entropy + the MoE auxiliary terms, dropout
  on); nothing is donated, the gradients are returned (so they are materialized, as in a step).
  """
  coefs = dict(balance_coef=config.moe.balance_coef, z_coef=config.moe.z_coef)

  def loss_fn(trainable, frozen, batch, rng):
    inputs = {k: batch[k] for k in INPUT_KEYS}
    logits, aux = forward(trainable, frozen, inputs, rng, deterministic=False, with_aux=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    aux_loss, _ = moe_lib.aux_losses(aux, **coefs)
    return loss + aux_loss

  rng = jax.random.key(config.seed + 3)
  compiled = _compile(jax.jit(jax.value_and_grad(loss_fn)), args, stepper.state.params,
                      frozen, batch, rng)
  # The stepper donates its state every call: read the current parameters at call time.
  run = lambda: compiled(stepper.state.params, frozen, batch, rng)
  return run, compiled


def _candidate(name: str, args, config, batch, layers: int, moe, intermediate: int,
               fwd_bwd: bool = False) -> dict:
  """The trainer's step for one model: ``{'run', 'cost', 'memory', ...}`` (compiled, not run).

  As ``train.train_and_evaluate`` builds it: full fine-tuning (every parameter trainable),
  ``optim.make_optimizer`` (clipping + AdamW), ``step.make_train_step`` with the config's MoE
  loss weights (the ``moe_aux`` component), jitted with the state donated.
  """
  t0 = time.perf_counter()
  built = _built(args, layers, moe, intermediate, seed=config.seed)
  method = peft.build(config.peft)
  trainable, frozen = tree_lib.partition(built.params, method.trainable_base)
  built.params = None  # the state holds the parameters from here on
  tx = optim.make_optimizer(config.optim, config.train.steps)
  state = run_lib.TrainState.create(tx, {'base': trainable, 'peft': {}}, seed=config.seed)
  forward = run_lib.make_forward(built, method)
  aux = moe_aux.component(config.moe.balance_coef, config.moe.z_coef)
  step = jax.jit(step_lib.make_train_step(forward, tx, Classification(config), [aux]),
                 donate_argnums=(0,))
  compiled = _compile(step, args, state, frozen, batch)
  out = {'cost': _cost(compiled), 'memory': timing.memory_bytes(compiled),
         'params': tree_lib.size_report(state.params, frozen)['trainable_params'],
         'opt_state_bytes': tree_lib.nbytes(state.opt_state)}
  out['run'] = stepper = timing.DonatingStepper(compiled, state, frozen, batch)
  del state
  if fwd_bwd:
    out['fwd_bwd_run'], compiled = _fwd_bwd(forward, frozen, stepper, batch, config, args)
    out['fwd_bwd_cost'] = _cost(compiled)
  out['compile_s'] = time.perf_counter() - t0
  print(f'  compiled {name} ({out["params"] / 1e6:.1f}M params) in {out["compile_s"]:.0f}s',
        flush=True)
  return out


def _expert_mlp(name: str, args, num_experts: int) -> dict:
  """One layer's experts alone (``dispatch.expert_mlp``, forward + backward w.r.t. the kernels
  and the buffers) on capacity buffers ``(E, batch x C, hidden)``: the batched expert matmuls
  of one MoE layer of the step, without routing, gather/scatter or the rest of the model."""
  cap = moe_lib.capacity(args.length, num_experts, args.top_k, args.capacity_factor)
  ks = jax.random.split(jax.random.key(0), 4)
  e, d, f = num_experts, args.hidden, args.ffn
  x = jax.random.normal(ks[0], (e, args.batch * cap, d), jnp.float32)
  ct = jax.random.normal(ks[1], x.shape, jnp.float32)
  params = {'intermediate': (0.02 * jax.random.normal(ks[2], (e, d, f)), jnp.zeros((e, f))),
            'output': (0.02 * jax.random.normal(ks[3], (e, f, d)), jnp.zeros((e, d)))}
  loss = lambda p, x: jnp.sum(moe_lib.expert_mlp(x, p, _gelu) * ct)
  compiled = _compile(jax.jit(jax.grad(loss, argnums=(0, 1))), args, params, x)
  print(f'  compiled {name} (buffers {tuple(x.shape)})', flush=True)
  return {'run': lambda: compiled(params, x), 'cost': _cost(compiled)}


def _time(group: dict, args) -> dict:
  """Interleaved timing of a group of candidates (and their fwd/bwd runners, if any)."""
  runners = {}
  for name, c in group.items():
    runners[name] = c['run']
    if 'fwd_bwd_run' in c:
      runners[name + '_fwd_bwd'] = c['fwd_bwd_run']
  t0 = time.perf_counter()
  times = timing.interleaved(runners, steps=args.steps, warmup=args.warmup)
  print(f'  timed {", ".join(runners)} in {time.perf_counter() - t0:.0f}s', flush=True)
  return times


# ----------------------------------------------------------------------------- dropped fraction


def dropped_fraction(args, batches: list[dict]) -> dict:
  """Mean dropped fraction over the MoE layers, upcycled pretrained MiniLM vs random init.

  ``configs/common.py`` with ``moe.num_experts = 8``, ``moe.every = 1`` (every FFN an MoE layer),
  the benchmark's top-k and capacity factor; a deterministic forward (``peft.apply(...,
  with_aux=True)``) on real training batches, reduced by ``moe.aux_losses``.
  """
  out = {}
  for source in ('pretrained', 'random'):
    c = _config(args)
    c.moe.num_experts, c.moe.every = args.drop_experts, 1
    c.model.pretrained = '' if source == 'pretrained' else 'random'
    if args.drop_layers:
      c.model.num_layers = args.drop_layers
    built = models.build(c.model, num_classes=2, moe_cfg=c.moe, seed=c.seed,
                         pretrained_dir=str(data_lib.minilm_dir()) if source == 'pretrained'
                         else None)
    method = peft.build(c.peft)
    peft_params = method.init(jax.random.key(c.seed + 1), built.module, built.params,
                              sample_inputs(INPUT_KEYS, length=args.length))
    base = method.prepare_base(built.params, peft_params)

    def stats_fn(batch):
      inputs = {k: batch[k] for k in INPUT_KEYS}
      _, aux = peft.apply(built.module, method, base, peft_params, inputs, with_aux=True)
      _, metrics = moe_lib.aux_losses(aux, c.moe.balance_coef, c.moe.z_coef)
      per_layer = {k: v['dropped_fraction'] for k, v in moe_lib.layer_stats(aux).items()}
      return metrics['dropped_fraction'], per_layer

    stats = _compile(jax.jit(stats_fn), args, batches[0])
    per_batch, layers = [], None
    for b in batches:
      mean, per_layer = jax.device_get(stats(b))
      per_batch.append(float(mean))
      layers = layers if layers is not None else {k: float(v) for k, v in per_layer.items()}
    out[source] = {'first_batch': per_batch[0], 'mean_over_batches': float(np.mean(per_batch)),
                   'per_batch': per_batch, 'first_batch_per_layer': layers,
                   'num_layers': built.module.cfg.num_layers,
                   'moe_layers': list(built.module.cfg.moe_layers)}
    del built, base, stats, stats_fn
    gc.collect()
  return out


# ----------------------------------------------------------------------------- the benchmark


def run(args) -> dict:
  config = _config(args)
  batches = _batches(config, max(args.drop_batches, 1))
  batch = dict(batches[0])
  batch['input_ids'] = batch['input_ids'] % args.vocab  # a no-op at MiniLM's vocabulary
  real_tokens = float(jnp.mean(batch['attention_mask']))
  dense_width = args.top_k * args.ffn
  ms, spreads, paired, costs, extra = {}, {}, {}, {}, {}

  def record(group, times):
    for name, t in times.items():
      ms[name] = timing.median_ms(t)
      spreads[name] = timing.spread(t)
    for name, c in group.items():
      if 'memory' not in c:  # an expert-MLP micro-benchmark
        costs[name] = c['cost']
        continue
      costs[name] = {'step': c['cost'], 'memory_peak_bytes': c['memory']['peak'],
                     'trainable_params': c['params'], 'opt_state_bytes': c['opt_state_bytes'],
                     'compile_s': c['compile_s']}
      if 'fwd_bwd_cost' in c:
        costs[name]['fwd_bwd'] = c['fwd_bwd_cost']

  # ------------------------------------------------------------------ 1. model level (E=8)
  print(f'model level: dense FFN {dense_width} vs MoE top-{args.top_k} of {args.experts} '
        f'(sorted, one-hot), {args.layers} layers', flush=True)
  group = {
      'dense': _candidate('dense', args, config, batch, args.layers, None, dense_width),
      'moe_sorted': _candidate('moe_sorted', args, config, batch, args.layers,
                               _moe(args, args.experts, 'sorted'), args.ffn),
      'moe_onehot': _candidate('moe_onehot', args, config, batch, args.layers,
                               _moe(args, args.experts, 'onehot'), args.ffn),
  }
  times = _time(group, args)
  record(group, times)
  paired['moe_vs_dense'] = timing.paired_ratio(times['moe_sorted'], times['dense'])
  paired['onehot_vs_sorted'] = timing.paired_ratio(times['moe_onehot'], times['moe_sorted'])
  # The training step's own routing report (random init, dropout on), from one more step.
  _, metrics = group['moe_sorted']['run']()
  extra['train_step_dropped_fraction_random_init'] = float(metrics['dropped_fraction'])
  del group, times
  gc.collect()

  # ------------------------------------------------------------------ 2. expert scaling, sorted
  lo, hi = args.scaling_experts
  print(f'expert scaling (sorted): E={lo} vs E={hi}, {args.scaling_layers} layers', flush=True)
  group = {f'sorted_e{e}': _candidate(f'sorted_e{e}', args, config, batch, args.scaling_layers,
                                      _moe(args, e, 'sorted'), args.ffn, fwd_bwd=True)
           for e in (lo, hi)}
  # One layer's expert matmuls alone (fwd + bwd), timed in the same rounds: how much of the
  # step's growth the batched expert matmuls explain.
  group.update({f'expert_mlp_e{e}': _expert_mlp(f'expert_mlp_e{e}', args, e) for e in (lo, hi)})
  times = _time(group, args)
  record(group, times)
  paired['experts_scaling'] = timing.paired_ratio(times[f'sorted_e{hi}'], times[f'sorted_e{lo}'])
  paired['experts_scaling_fwd_bwd'] = timing.paired_ratio(times[f'sorted_e{hi}_fwd_bwd'],
                                                          times[f'sorted_e{lo}_fwd_bwd'])
  del group, times
  gc.collect()

  # ------------------------------------------------------------------ 3. expert scaling, one-hot
  if args.onehot_scaling:
    print(f'expert scaling (one-hot): E={lo} vs E={hi}', flush=True)
    group = {f'onehot_e{e}': _candidate(f'onehot_e{e}', args, config, batch,
                                        args.scaling_layers, _moe(args, e, 'onehot'), args.ffn)
             for e in (lo, hi)}
    times = _time(group, args)
    record(group, times)
    paired['onehot_experts_scaling'] = timing.paired_ratio(times[f'onehot_e{hi}'],
                                                           times[f'onehot_e{lo}'])
    del group, times
    gc.collect()

  # ------------------------------------------------------------------ 4. dropped fraction
  print('dropped fraction: upcycled pretrained MiniLM and random init, real batches', flush=True)
  drops = dropped_fraction(args, batches[:args.drop_batches])

  # ------------------------------------------------------------------ results
  update = {e: ms[f'sorted_e{e}'] - ms[f'sorted_e{e}_fwd_bwd'] for e in (lo, hi)}
  result = {
      'moe_vs_dense_step_ratio': ms['moe_sorted'] / ms['dense'],
      'experts_scaling_ratio': ms[f'sorted_e{hi}'] / ms[f'sorted_e{lo}'],
      'experts_scaling_fwd_bwd_ratio': ms[f'sorted_e{hi}_fwd_bwd'] / ms[f'sorted_e{lo}_fwd_bwd'],
      'onehot_vs_sorted_ratio': ms['moe_onehot'] / ms['moe_sorted'],
      'dropped_fraction': drops['pretrained']['first_batch'],
      'dropped_fraction_random_init': drops['random']['first_batch'],
  }
  if args.onehot_scaling:
    result['onehot_experts_scaling_ratio'] = ms[f'onehot_e{hi}'] / ms[f'onehot_e{lo}']
  result['meets_targets'] = {k: timing.meets(result[k], t) for k, t in TARGETS.items()}
  cap = lambda e: moe_lib.capacity(args.length, e, args.top_k, args.capacity_factor)
  result['details'] = {
      'median_ms': ms,
      'spread': spreads,
      'paired_ratios': paired,
      'cost_analysis': costs,
      'flops_ratio_moe_vs_dense': (costs['moe_sorted']['step']['gflops'] /
                                   costs['dense']['step']['gflops']),
      'bytes_ratio_experts_scaling_step': (costs[f'sorted_e{hi}']['step']['gbytes_accessed'] /
                                           costs[f'sorted_e{lo}']['step']['gbytes_accessed']),
      'bytes_ratio_experts_scaling_fwd_bwd': (
          costs[f'sorted_e{hi}']['fwd_bwd']['gbytes_accessed'] /
          costs[f'sorted_e{lo}']['fwd_bwd']['gbytes_accessed']),
      # step - forward/backward: the clipping + AdamW update (and the in-place state writes).
      'update_ms_estimate': {f'e{e}': v for e, v in update.items()},
      'update_share_of_step': {f'e{e}': update[e] / ms[f'sorted_e{e}'] for e in (lo, hi)},
      'experts_scaling_breakdown_ms': {
          'step_growth': ms[f'sorted_e{hi}'] - ms[f'sorted_e{lo}'],
          'fwd_bwd_growth': ms[f'sorted_e{hi}_fwd_bwd'] - ms[f'sorted_e{lo}_fwd_bwd'],
          'update_growth': update[hi] - update[lo],
          # the expert matmuls alone, one layer's worth times the MoE layers
          'expert_mlp_growth_all_layers': args.scaling_layers * (
              ms[f'expert_mlp_e{hi}'] - ms[f'expert_mlp_e{lo}']),
      },
      'expert_mlp_fwd_bwd_ratio': ms[f'expert_mlp_e{hi}'] / ms[f'expert_mlp_e{lo}'],
      'expert_mlp_flops_ratio': (costs[f'expert_mlp_e{hi}']['gflops'] /
                                 costs[f'expert_mlp_e{lo}']['gflops']),
      'flops_ratio_experts_scaling_step': (costs[f'sorted_e{hi}']['step']['gflops'] /
                                           costs[f'sorted_e{lo}']['step']['gflops']),
      'flops_ratio_experts_scaling_fwd_bwd': (costs[f'sorted_e{hi}']['fwd_bwd']['gflops'] /
                                              costs[f'sorted_e{lo}']['fwd_bwd']['gflops']),
      'capacity_per_group': {f'e{e}': cap(e) for e in sorted({args.experts, lo, hi})},
      'expert_slots_per_group': {f'e{e}': e * cap(e) for e in sorted({args.experts, lo, hi})},
      'dropped_fraction': drops,
      'real_token_fraction_timing_batch': real_tokens,
      **extra,
  }
  result['settings'] = {
      'model': (f'BERT encoder with MiniLM-L6 dimensions (random init) + 2-class head; '
                f'vocabulary {args.vocab}'),
      'hidden_size': args.hidden, 'num_heads': args.heads, 'num_layers': args.layers,
      'expert_ffn': args.ffn, 'dense_ffn': dense_width, 'num_experts': args.experts,
      'top_k': args.top_k, 'capacity_factor': args.capacity_factor,
      'moe_layers': 'every layer', 'dispatch': 'sorted (one-hot for onehot_*)',
      'scaling_experts': [lo, hi], 'scaling_layers': args.scaling_layers,
      'onehot_scaling': args.onehot_scaling,
      'batch_size': args.batch, 'max_length': args.length, 'vocab_size': args.vocab,
      'tokens': 'the first Rotten Tomatoes training batch (seed 0), the same for every candidate',
      'train_step': ('step.make_train_step + components.moe_aux: CE + balance_coef*balance + '
                     'z_coef*z, value_and_grad, clip 1.0 + AdamW, dropout 0.1, jitted, '
                     'state donated'),
      'aux_coefs': {'balance': config.moe.balance_coef, 'z': config.moe.z_coef},
      'optimizer': {**{k: config.optim[k] for k in ('learning_rate', 'schedule', 'warmup_steps',
                                                    'weight_decay', 'clip_norm')},
                    'name': 'adamw'},
      'dropped_fraction_model': ('configs/common.py, moe.num_experts='
                                 f'{args.drop_experts}, moe.every=1, upcycled all-MiniLM-L6-v2'
                                 + (f' (first {args.drop_layers} layers)' if args.drop_layers
                                    else '')),
      'dropped_fraction_batches': args.drop_batches,
      'timed_steps': args.steps, 'timing_warmup_steps': args.warmup,
      'order': ('interleaved within groups: [dense, moe_sorted, moe_onehot], '
                '[sorted E lo, E hi, + their fwd/bwd], [onehot E lo, E hi]'),
      'quick': args.quick, 'compiler_options': args.compiler_options, 'jax': jax.__version__, 'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(), 'machine': platform.machine(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  return result


def report(r: dict) -> str:
  d, s = r['details'], r['settings']
  ms, lo, hi = d['median_ms'], *s['scaling_experts']

  def target(key):
    if key not in TARGETS:
      return ''
    op, bound = TARGETS[key]
    return f"{op} {bound} {'ok' if r['meets_targets'][key] else 'MISSED'}"

  rows = [
      ['moe_vs_dense_step_ratio', ms['moe_sorted'], ms['dense'], r['moe_vs_dense_step_ratio'],
       target('moe_vs_dense_step_ratio')],
      ['experts_scaling_ratio', ms[f'sorted_e{hi}'], ms[f'sorted_e{lo}'],
       r['experts_scaling_ratio'], target('experts_scaling_ratio')],
      ['experts_scaling_fwd_bwd_ratio', ms[f'sorted_e{hi}_fwd_bwd'], ms[f'sorted_e{lo}_fwd_bwd'],
       r['experts_scaling_fwd_bwd_ratio'], ''],
      ['onehot_vs_sorted_ratio', ms['moe_onehot'], ms['moe_sorted'],
       r['onehot_vs_sorted_ratio'], ''],
  ]
  if 'onehot_experts_scaling_ratio' in r:
    rows.append(['onehot_experts_scaling_ratio', ms[f'onehot_e{hi}'], ms[f'onehot_e{lo}'],
                 r['onehot_experts_scaling_ratio'], ''])
  table = timing.format_table(rows, ['figure', 'A (ms)', 'B (ms)', 'A/B', 'target'])
  c = d['cost_analysis']
  lines = [
      f"MoE top-{s['top_k']} of {s['num_experts']} (cf {s['capacity_factor']}) vs dense FFN "
      f"{s['dense_ffn']}, hidden {s['hidden_size']}, {s['num_layers']} layers (scaling: "
      f"{s['scaling_layers']}), batch {s['batch_size']} x {s['max_length']}, "
      f"{s['timed_steps']} interleaved steps each ({s['backend']}, jax {s['jax']})",
      table,
      'paired ratios (median of per-round ratios): ' + ', '.join(
          f'{k} {v:.3f}' for k, v in d['paired_ratios'].items()),
      f"GFLOPs per step: dense {c['dense']['step']['gflops']:.1f}, MoE "
      f"{c['moe_sorted']['step']['gflops']:.1f} (ratio {d['flops_ratio_moe_vs_dense']:.3f})",
      f"GB accessed per step: E={lo} {c[f'sorted_e{lo}']['step']['gbytes_accessed']:.2f}, "
      f"E={hi} {c[f'sorted_e{hi}']['step']['gbytes_accessed']:.2f} (ratio "
      f"{d['bytes_ratio_experts_scaling_step']:.2f}); fwd/bwd only ratio "
      f"{d['bytes_ratio_experts_scaling_fwd_bwd']:.2f}",
      f"E={lo} -> E={hi}: step +{d['experts_scaling_breakdown_ms']['step_growth']:.0f} ms = "
      f"fwd/bwd +{d['experts_scaling_breakdown_ms']['fwd_bwd_growth']:.0f} + update "
      f"+{d['experts_scaling_breakdown_ms']['update_growth']:.0f}; expert matmuls alone "
      f"+{d['experts_scaling_breakdown_ms']['expert_mlp_growth_all_layers']:.0f} "
      f"({s['scaling_layers']} layers; one layer {d['expert_mlp_fwd_bwd_ratio']:.2f}x time for "
      f"{d['expert_mlp_flops_ratio']:.2f}x FLOPs); step FLOPs ratio "
      f"{d['flops_ratio_experts_scaling_step']:.2f}",
      'update (step - fwd/bwd) ms: ' + ', '.join(
          f"{k} {v:.0f} ({d['update_share_of_step'][k]:.0%} of the step)"
          for k, v in d['update_ms_estimate'].items()),
      f"dropped fraction (cf {s['capacity_factor']}): upcycled pretrained "
      f"{r['dropped_fraction']:.4f}, random init {r['dropped_fraction_random_init']:.4f} "
      f"(mean over {s['dropped_fraction_batches']} batches: "
      f"{d['dropped_fraction']['pretrained']['mean_over_batches']:.4f} / "
      f"{d['dropped_fraction']['random']['mean_over_batches']:.4f})",
  ]
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=15, help='timed steps per candidate')
  p.add_argument('--warmup', type=int, default=1, help='untimed steps per candidate')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--length', type=int, default=64)
  p.add_argument('--hidden', type=int, default=384)
  p.add_argument('--heads', type=int, default=12)
  p.add_argument('--ffn', type=int, default=1536, help='FFN width of one expert')
  p.add_argument('--layers', type=int, default=6, help='encoder layers (model level)')
  p.add_argument('--scaling-layers', type=int, default=6,
                 help='encoder layers for the expert-scaling comparison')
  p.add_argument('--vocab', type=int, default=30522, help="vocabulary (MiniLM's: 30522)")
  p.add_argument('--experts', type=int, default=8, help='experts (model level)')
  p.add_argument('--scaling-experts', type=int, nargs=2, default=(4, 64), metavar=('LO', 'HI'))
  p.add_argument('--top-k', type=int, default=2)
  p.add_argument('--capacity-factor', type=float, default=1.25)
  p.add_argument('--onehot-scaling', action=argparse.BooleanOptionalAction, default=True,
                 help='also time one-hot dispatch at both expert counts')
  p.add_argument('--drop-experts', type=int, default=8,
                 help='experts of the upcycled model whose dropped fraction is measured')
  p.add_argument('--drop-layers', type=int, default=0,
                 help='layers of the upcycled model; 0 = all (6)')
  p.add_argument('--drop-batches', type=int, default=8,
                 help='real batches for dropped_fraction (the key is the first one)')
  p.add_argument('--quick', action='store_true',
                 help='smoke test: a tiny model, 3 steps; prints, writes only --out')
  p.add_argument('--out', default=None,
                 help=f'JSON output path (default {RESULTS.relative_to(ROOT)}; none with --quick)')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup = min(args.steps, 3), 1
    args.batch, args.length, args.hidden, args.heads, args.ffn = 4, 16, 32, 2, 64
    args.layers = args.scaling_layers = 1
    args.vocab, args.drop_layers, args.drop_batches = 512, 1, 2
    args.scaling_experts = (2, 8)
  args.compiler_options = {'xla_backend_optimization_level': 0} if args.quick else None
  return timing.run_and_publish(run, report, args, RESULTS)


if __name__ == '__main__':
  main()
