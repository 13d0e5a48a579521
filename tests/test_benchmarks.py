"""The benchmark runs end to end (quick mode) and reports every key the README quotes."""
import json
import pathlib

from benchmarks import lora_vs_full

KEYS = ('lora_step_ms', 'full_step_ms', 'infer_ms', 'step_time_ratio', 'flops_ratio',
        'opt_state_bytes_ratio', 'peak_memory_ratio', 'trainable_fraction', 'lora_mfu')


def test_quick_benchmark_reports_all_keys(tmp_path):
  out = tmp_path / 'r.json'
  r = lora_vs_full.main(['--quick', f'--out={out}'])
  assert json.loads(out.read_text())['settings']['quick'] is True
  for k in KEYS:
    assert r[k] > 0, k
  # Exact, not timed: with 2 layers LoRA trains 2 x 2 x (384*8 + 8*384) + the 770-param head.
  assert r['details']['lora_trainable_params'] == 2 * 2 * 6144 + 770
  # Adam keeps 2 moments per trainable scalar (+ a step count), so the ratio is exact too.
  assert abs(r['opt_state_bytes_ratio'] - (2 * 2 * 2 * 6144 + 2 * 770 + 2) /
             (2 * r['details']['full_trainable_params'] + 2)) < 1e-3
  assert r['flops_ratio'] < 1.0 and r['peak_memory_ratio'] < 1.0


def test_committed_results_have_the_keys():
  path = pathlib.Path(lora_vs_full.RESULTS)
  r = json.loads(path.read_text())
  for k in KEYS:
    assert k in r, k
  assert r['settings']['batch_size'] == 32 and r['settings']['max_length'] == 64
  assert r['settings']['timed_steps'] >= 20


QUANT_KEYS = ('int8_infer_time_ratio', 'int8_weight_bytes_ratio', 'qat_step_time_ratio',
              'qlora_base_bytes_ratio')


def test_quick_quant_benchmark_reports_all_keys():
  from benchmarks import quant
  r = quant.main(['--quick'])
  for k in QUANT_KEYS:
    assert r[k] > 0, k
  # Bytes are exact, not timed: int8 weights + float32 scales, biases and norms.
  d = r['details']
  assert r['int8_weight_bytes_ratio'] == d['int8_bytes'] / d['float_bytes'] < 0.27
  assert r['qlora_base_bytes_ratio'] == d['qlora_base_bytes'] / d['float_bytes'] < 0.27
  assert d['int8_layers'] == 2 * 6 + 3  # 6 matmuls per layer + 3 embedding tables


def test_committed_quant_results_have_the_keys():
  from benchmarks import quant
  r = json.loads(pathlib.Path(quant.RESULTS).read_text())
  for k in QUANT_KEYS:
    assert k in r, k
  assert r['settings']['batch_size'] == 32 and r['settings']['max_length'] == 64
  assert r['settings']['timed_steps'] >= 20


MOE_KEYS = ('moe_vs_dense_step_ratio', 'experts_scaling_ratio', 'onehot_vs_sorted_ratio',
            'dropped_fraction')


def test_quick_moe_benchmark_reports_all_keys(tmp_path):
  import math
  from benchmarks import moe
  out = tmp_path / 'moe.json'
  # Tiny model, 1 layer, 3 steps; the one-hot scaling pair is left out to keep compiles few.
  r = moe.main(['--quick', '--no-onehot-scaling', f'--out={out}'])
  saved = json.loads(out.read_text())
  assert saved['settings']['quick'] is True
  for k in MOE_KEYS + ('experts_scaling_fwd_bwd_ratio', 'dropped_fraction_random_init'):
    assert k in saved, k
    assert math.isfinite(r[k]), k
  for k in MOE_KEYS[:3] + ('experts_scaling_fwd_bwd_ratio',):
    assert r[k] > 0, k
  for k in ('dropped_fraction', 'dropped_fraction_random_init'):
    assert 0.0 <= r[k] <= 1.0, k
  s = saved['settings']
  for k in ('num_experts', 'top_k', 'capacity_factor', 'scaling_experts', 'device_count',
            'batch_size', 'max_length', 'timed_steps'):
    assert k in s, k
  # Not timed: the MoE layer's capacity is exact (top-2 of 8, 16 tokens, cf 1.25 -> 5 slots).
  assert r['details']['capacity_per_group']['e8'] == 5


def test_committed_moe_results_have_the_keys():
  from benchmarks import moe
  r = json.loads(pathlib.Path(moe.RESULTS).read_text())
  for k in MOE_KEYS + ('experts_scaling_fwd_bwd_ratio',):
    assert k in r, k
  s = r['settings']
  assert s['batch_size'] == 32 and s['max_length'] == 64 and s['quick'] is False
  assert (s['num_experts'], s['top_k'], s['capacity_factor']) == (8, 2, 1.25)
  assert s['scaling_experts'] == [4, 64] and s['timed_steps'] >= 15
