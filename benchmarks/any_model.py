"""LoRA on models written outside peftjax: a scanned vs an unrolled layer stack, NNX vs linen.

The model is a 12-layer pre-LayerNorm causal transformer LM with tied input/output embeddings
(``nn.Embed.attend``), written the two ways researchers write deep stacks: the layers under
``nn.scan`` (one compiled body, weights stacked ``(layers, ...)``), and unrolled (``layer_0`` ...
``layer_11``), with the same weights; and the unrolled model again in Flax NNX, through
``peftjax.models.nnx_bridge``. Every candidate trains LoRA (r=8 on the query and value
projections) with the trainer's own jitted, donated step (``step.make_train_step``, AdamW) on a
fixed batch of token ids, next-token cross-entropy.

Figures (ratios of medians of interleaved steps, after compiling and a warm-up):

* ``scan_vs_unrolled_step_ratio`` -- scanned / unrolled step time (target <= 1.1);
* ``nnx_vs_linen_step_ratio`` -- NNX / linen step time, both unrolled (target <= 1.05).

The three candidates start from the same weights and LoRA factors; the benchmark checks that
their first losses agree before it times anything.

  python benchmarks/any_model.py            # writes benchmarks/results/any_model.json
  python benchmarks/any_model.py --quick    # smoke test: 2 layers, 3 steps, prints JSON only
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import flax.linen as nn  # noqa: E402
from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import peftjax  # noqa: E402
from peftjax import peft  # noqa: E402
from peftjax import run as run_lib  # noqa: E402
from peftjax import step as step_lib  # noqa: E402
from peftjax import timing  # noqa: E402
from peftjax import tree as tree_lib  # noqa: E402
from peftjax.models.build import Built  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results' / 'any_model.json'
TARGETS = {'scan_vs_unrolled_step_ratio': ('<=', 1.1), 'nnx_vs_linen_step_ratio': ('<=', 1.05)}
TARGETS_LORA = r'.*/(query|value)/kernel$'


class Block(nn.Module):
  """Pre-LN attention + MLP block; ``(x, None) -> (x, None)`` so ``nn.scan`` can carry it."""
  dim: int
  heads: int
  mlp: int

  @nn.compact
  def __call__(self, x, _):
    b, t, d = x.shape
    dh = d // self.heads
    h = nn.LayerNorm(name='ln_attn')(x)
    q, k, v = (nn.DenseGeneral((self.heads, dh), name=n)(h) for n in ('query', 'key', 'value'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(dh)
    causal = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    o = jnp.einsum('bhqk,bkhd->bqhd', att, v)
    x = x + nn.DenseGeneral(d, axis=(-2, -1), name='out')(o)
    h = nn.LayerNorm(name='ln_mlp')(x)
    x = x + nn.Dense(d, name='down')(nn.gelu(nn.Dense(self.mlp, name='up')(h)))
    return x, None


class LM(nn.Module):
  """Token ids -> next-token logits; tied embeddings; the stack scanned or unrolled."""
  vocab: int
  dim: int
  heads: int
  mlp: int
  layers: int
  scan: bool

  @nn.compact
  def __call__(self, input_ids):
    embed = nn.Embed(self.vocab, self.dim, name='embed')
    x = embed(input_ids)
    if self.scan:
      stack = nn.scan(Block, variable_axes={'params': 0}, split_rngs={'params': True},
                      length=self.layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(self.dim, self.heads, self.mlp, name='layers')(x, None)
    else:
      for i in range(self.layers):
        x, _ = Block(self.dim, self.heads, self.mlp, name=f'layer_{i}')(x, None)
    return embed.attend(nn.LayerNorm(name='ln_final')(x))


class NnxBlock(nnx.Module):
  """:class:`Block` in Flax NNX, its weights named as linen names them."""

  def __init__(self, dim: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
    dh = dim // heads
    self.heads = heads
    self.ln_attn, self.ln_mlp = nnx.LayerNorm(dim, rngs=rngs), nnx.LayerNorm(dim, rngs=rngs)
    self.query, self.key, self.value = (nnx.LinearGeneral(dim, (heads, dh), rngs=rngs)
                                        for _ in range(3))
    self.out = nnx.LinearGeneral((heads, dh), dim, axis=(-2, -1), rngs=rngs)
    self.up, self.down = nnx.Linear(dim, mlp, rngs=rngs), nnx.Linear(mlp, dim, rngs=rngs)

  def __call__(self, x):
    t, dh = x.shape[1], x.shape[2] // self.heads
    h = self.ln_attn(x)
    q, k, v = self.query(h), self.key(h), self.value(h)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(dh)
    causal = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    x = x + self.out(jnp.einsum('bhqk,bkhd->bqhd', att, v))
    return x + self.down(nn.gelu(self.up(self.ln_mlp(x))))


class NnxLM(nnx.Module):
  """:class:`LM` (unrolled) in Flax NNX: ``layer_0`` ... as attributes, tied embeddings."""

  def __init__(self, vocab: int, dim: int, heads: int, mlp: int, layers: int, *, rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.num_layers = layers
    for i in range(layers):
      setattr(self, f'layer_{i}', NnxBlock(dim, heads, mlp, rngs=rngs))
    self.ln_final = nnx.LayerNorm(dim, rngs=rngs)

  def __call__(self, input_ids):
    x = self.embed(input_ids)
    for i in range(self.num_layers):
      x = getattr(self, f'layer_{i}')(x)
    return self.embed.attend(self.ln_final(x))


def unstack(params: dict, layers: int) -> dict:
  """The scanned model's weights as the unrolled model's (``layers/...`` -> ``layer_i/...``)."""
  out = {k: v for k, v in params.items() if k != 'layers'}
  for i in range(layers):
    out[f'layer_{i}'] = jax.tree.map(lambda x, i=i: x[i], params['layers'])
  return out


class NextToken:
  """The task: mean next-token cross-entropy over a batch of token ids."""

  def loss(self, logits, batch):
    ids = batch['input_ids']
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    return ce.mean(), {}


def candidate(module, params, batch, method, lora, tx) -> dict:
  """The trainer's jitted, donated LoRA step on ``module``; its state and first loss."""
  built = Built(module=module, params=params, input_keys=('input_ids',),
                logical_specs=jax.tree.map(lambda _: None, params), source='benchmark')
  base_trainable, frozen = tree_lib.partition(params, method.trainable_base)
  # Copies: the step donates its state, and candidates start from the same arrays.
  trainable = jax.tree.map(jnp.copy, {'base': base_trainable, 'peft': lora})
  forward = run_lib.make_forward(built, method)
  step = jax.jit(step_lib.make_train_step(forward, tx, NextToken()), donate_argnums=(0,))
  state = run_lib.TrainState.create(tx, trainable, seed=0)
  first = float(NextToken().loss(forward(trainable, frozen, batch), batch)[0])
  state, _ = step(state, frozen, batch)  # compile
  jax.block_until_ready(state)
  return {'runner': timing.DonatingStepper(step, state, frozen, batch), 'first_loss': first}


def _lora_for(config, module, params, batch):
  method = peft.build(config.peft)
  return method, method.init(jax.random.key(1), module, params, {'input_ids': batch['input_ids']})


def run(args) -> dict:
  config = peftjax.config('quickstart')
  config.peft.method, config.peft.head = 'lora', r'^$'
  config.peft.lora.targets, config.peft.lora.rank = TARGETS_LORA, 8
  dims = dict(vocab=args.vocab, dim=args.dim, heads=args.heads, mlp=4 * args.dim,
              layers=args.layers)
  ids = jax.random.randint(jax.random.key(0), (args.batch, args.length), 0, args.vocab)
  batch = {'input_ids': ids}
  scanned = LM(**dims, scan=True)
  scan_params = scanned.init(jax.random.key(2), ids)['params']
  unrolled = LM(**dims, scan=False)
  flat_params = unstack(scan_params, args.layers)
  tx = optax.adamw(1e-3)
  method, scan_lora = _lora_for(config, scanned, scan_params, batch)
  flat_lora = unstack(scan_lora, args.layers)  # the same factors, layer by layer
  cands = {'scan': candidate(scanned, scan_params, batch, method, scan_lora, tx),
           'unrolled': candidate(unrolled, flat_params, batch, method, flat_lora, tx)}
  nnx_built = peftjax.from_nnx(NnxLM(**dims, rngs=nnx.Rngs(2)), input_keys=('input_ids',))
  if jax.tree.structure(nnx_built.params) != jax.tree.structure(flat_params):
    raise SystemExit('the NNX model does not name its weights as the linen one does')
  # The linen weights and factors as they are: the two models name every leaf alike.
  cands['nnx'] = candidate(nnx_built.module, flat_params, batch, method, flat_lora, tx)
  first = {k: c['first_loss'] for k, c in cands.items()}
  spread_first = max(first.values()) - min(first.values())
  if spread_first > 1e-3:
    raise SystemExit(f'the candidates disagree before training: first losses {first}')
  times = timing.interleaved({k: c['runner'] for k, c in cands.items()}, steps=args.steps,
                             warmup=args.warmup)
  ms = {k: timing.median_ms(t) for k, t in times.items()}
  result = {
      'scan_vs_unrolled_step_ratio': ms['scan'] / ms['unrolled'],
      'scan_step_ms': ms['scan'], 'unrolled_step_ms': ms['unrolled'],
      'details': {'first_losses': first,
                  'paired_scan_vs_unrolled': timing.paired_ratio(times['scan'],
                                                                 times['unrolled']),
                  'spread': {k: timing.spread(t) for k, t in times.items()},
                  'lora_params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(scan_lora))),
                  'base_params': int(sum(np.prod(x.shape) for x in jax.tree.leaves(scan_params)))},
  }
  result['nnx_vs_linen_step_ratio'] = ms['nnx'] / ms['unrolled']
  result['nnx_step_ms'] = ms['nnx']
  result['details']['paired_nnx_vs_linen'] = timing.paired_ratio(times['nnx'], times['unrolled'])
  result['meets_targets'] = {k: timing.meets(result[k], t) for k, t in TARGETS.items()}
  result['settings'] = {
      'model': dims, 'batch_size': args.batch, 'length': args.length,
      'peft': {'method': 'lora', 'rank': 8, 'targets': TARGETS_LORA},
      'optimizer': 'adamw 1e-3', 'timed_steps': args.steps, 'timing_warmup_steps': args.warmup,
      'order': 'interleaved ' + '/'.join(cands), 'quick': args.quick, 'jax': jax.__version__,
      'flax': __import__('flax').__version__, 'backend': jax.default_backend(),
      'cpu_count': os.cpu_count(), 'machine': platform.machine(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  return result



def report(r: dict) -> str:
  s = r['settings']
  note = lambda k: timing.target_note(k, r, TARGETS)
  rows = [['scanned / unrolled', r['scan_step_ms'], r['unrolled_step_ms'],
           r['scan_vs_unrolled_step_ratio'], note('scan_vs_unrolled_step_ratio')],
          ['NNX / linen (unrolled)', r['nnx_step_ms'], r['unrolled_step_ms'],
           r['nnx_vs_linen_step_ratio'], note('nnx_vs_linen_step_ratio')]]
  m = s['model']
  return '\n'.join([
      f"LoRA r=8 (query, value) on a {m['layers']}-layer causal LM (d={m['dim']}, "
      f"{m['heads']} heads, tied embeddings, vocab {m['vocab']}), batch {s['batch_size']} x "
      f"{s['length']}, {s['timed_steps']} interleaved steps each ({s['backend']}, jax {s['jax']})",
      timing.format_table(rows, ['', 'A step (ms)', 'B step (ms)', 'A/B', 'target']),
  ])



def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--steps', type=int, default=30, help='timed steps per candidate (>= 20)')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps per candidate')
  p.add_argument('--layers', type=int, default=12)
  p.add_argument('--dim', type=int, default=128)
  p.add_argument('--heads', type=int, default=4)
  p.add_argument('--vocab', type=int, default=512)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--length', type=int, default=128)
  p.add_argument('--quick', action='store_true', help='smoke test: 2 layers, 3 steps; prints only')
  p.add_argument('--out', default=None,
                 help=f'JSON output path (default {RESULTS.relative_to(ROOT)}; none with --quick)')
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup, args.layers = min(args.steps, 3), 1, 2
  elif args.steps < 20:
    p.error(f'--steps={args.steps}; the figures are medians over at least 20 steps '
            '(use --quick for a smoke test)')
  return timing.run_and_publish(run, report, args, RESULTS)


if __name__ == '__main__':
  main()
