"""Step time and decode speed of every method of the LM study, measured together in one process.

The study's runs log their own step times, but they run one after another on a shared machine;
here every method's training step (the trainer's jitted, donated step, at the study's batch
shape) is timed in turn A, B, C, ... after compilation, and the figures are medians, so a slow
phase of the machine falls on every method alike. Decode speed is greedy generation of 16
prompts through each method's own step function (unmerged, the prefix of prompt/prefix tuning
in the KV cache): 33 tokens minus 1 token, over the 32 decode steps between.

  python -m experiments.lm_methods.speed            # writes experiments/lm_methods/speed.json
  python -m experiments.lm_methods.speed --quick    # 2-layer random LM, prints JSON only
"""
from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks import lm as lm_bench  # noqa: E402
from experiments import sweep  # noqa: E402
from experiments.lm_methods import config as study  # noqa: E402
from peftjax import generation  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax import timing  # noqa: E402
from peftjax import tree as tree_lib  # noqa: E402
from peftjax.models.llama import init_cache  # noqa: E402

OUT = ROOT / 'experiments' / 'lm_methods' / 'speed.json'


def method_config(overrides: dict, quick: bool):
  c = sweep.apply_overrides(study.get_config(), dict(overrides))
  if quick:
    c.model.pretrained = 'random'
  return c


def decode_runners(cand, built, method, ids, new_tokens: int) -> dict:
  """``{'n': generate N tokens, '1': generate 1}`` through the method's step function."""
  params = cand['state'].params
  base = tree_lib.combine(cand['frozen'], params['base'])
  cfg = built.module.cfg
  slots = generation.length_bucket(ids.shape[1]) + new_tokens

  def make(b, n, prefix_kv=None):
    return init_cache(cfg, b, max(slots, n), prefix_kv=prefix_kv)

  step = generation.method_step(built.module, method, base, params['peft'])
  cache = generation.method_cache(make, built.module, method, base, params['peft'])
  return {'n': lm_bench.generate_runner(step, cache, ids, new_tokens),
          '1': lm_bench.generate_runner(step, cache, ids, 1)}


def run(args) -> dict:
  labels = list(study.METHODS) if not args.methods else args.methods.split(',')
  configs = {k: method_config(study.METHODS[k], args.quick) for k in labels}
  first = next(iter(configs.values()))
  built, _ = models.build_lm(first.model, seed=first.seed)
  cfg = built.module.cfg
  batch = lm_bench.make_batch(first.train.batch_size, first.data.max_length, cfg.vocab_size)
  rng = np.random.default_rng(1)
  ids = rng.integers(1, cfg.vocab_size, (16, args.prompt)).astype(np.int32)
  cands, steppers, decoders, sizes = {}, {}, {}, {}
  for label, c in configs.items():
    cand = lm_bench.build_candidate(c, built, batch)
    cands[label] = cand
    steppers[label] = timing.DonatingStepper(cand['compiled'], cand['state'], cand['frozen'],
                                             batch)
    sizes[label] = cand['size']
  times = timing.interleaved(steppers, steps=args.steps, warmup=args.warmup)
  for label, c in configs.items():
    from peftjax import peft  # pylint: disable=g-import-not-at-top
    from peftjax import quant  # pylint: disable=g-import-not-at-top
    method = quant.wrap(peft.build(c.peft), c.quant)
    cand = dict(cands[label], state=steppers[label].state)
    for k, fn in decode_runners(cand, built, method, ids, args.new_tokens).items():
      decoders[f'{label}|{k}'] = fn
  gen = timing.interleaved(decoders, steps=args.decode_rounds, warmup=1)
  full = timing.median_ms(times['full FT']) if 'full FT' in times else None
  methods = {}
  for label in labels:
    step_ms = timing.median_ms(times[label])
    per_token = (np.median(gen[f'{label}|n']) - np.median(gen[f'{label}|1'])) / (
        args.new_tokens - 1)
    methods[label] = {'step_ms': step_ms,
                      'step_time_vs_full': step_ms / full if full else None,
                      'decode_tokens_per_s_b16': float(16 / per_token),
                      'trainable_params': int(sizes[label]['trainable_params'])}
  return {'methods': methods,
          'settings': {'steps': args.steps, 'batch': first.train.batch_size,
                       'length': first.data.max_length, 'prompt': args.prompt,
                       'new_tokens': args.new_tokens, 'quick': args.quick}}


def report(r: dict) -> str:
  rows = [[k, f"{m['step_ms']:.0f}",
           '—' if m['step_time_vs_full'] is None else f"{m['step_time_vs_full']:.2f}",
           f"{m['decode_tokens_per_s_b16']:.1f}"] for k, m in r['methods'].items()]
  return timing.format_table(rows, ['method', 'step ms', 'vs full FT', 'decode tok/s (b16)'])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quick', action='store_true', help='2-layer random LM, few steps, no file')
  p.add_argument('--methods', default='', help="comma-separated labels (default: all)")
  p.add_argument('--steps', type=int, default=None, help='timed steps per method')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--decode_rounds', type=int, default=None)
  p.add_argument('--prompt', type=int, default=64, help='prompt tokens')
  p.add_argument('--new_tokens', type=int, default=33)
  p.add_argument('--out', default='', help=f'result file (default {OUT})')
  args = p.parse_args(argv)
  args.steps = args.steps or (2 if args.quick else 6)
  args.decode_rounds = args.decode_rounds or (2 if args.quick else 5)
  if args.quick:
    args.new_tokens, args.prompt = 5, 16
  return timing.run_and_publish(run, report, args, OUT)


if __name__ == '__main__':
  main()
