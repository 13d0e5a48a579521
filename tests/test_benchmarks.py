"""The benchmark runs end to end (quick mode) and reports every key the README quotes."""
import json
import pathlib

import pytest

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


# Slow (~1 min each: the quick mode still compiles a dozen programs); `make test-all` runs it.
# In the default run the committed-results test checks the file this script writes, and the
# measured pieces have their own unit tests (tests/test_int8.py, test_qat.py, test_moe*.py).
@pytest.mark.slow
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


# Slow (~1 min each: the quick mode still compiles a dozen programs); `make test-all` runs it.
# In the default run the committed-results test checks the file this script writes, and the
# measured pieces have their own unit tests (tests/test_int8.py, test_qat.py, test_moe*.py).
@pytest.mark.slow
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


MULTI_ADAPTER_KEYS = ('mixed_batch_8_vs_merged', 'mixed_batch_64_vs_merged', 'active_fixed_scaling',
                      'swap_recompiles', 'adapter_bytes_ratio', 'single_adapter_vs_merged')


def test_quick_multi_adapter_benchmark_reports_all_keys(tmp_path):
  from benchmarks import multi_adapter
  out = tmp_path / 'multi_adapter.json'
  # 1 layer, 16 adapters (4 in the small library), batch 16 x 16, 3 steps.
  r = multi_adapter.main(['--quick', f'--out={out}'])
  saved = json.loads(out.read_text())
  assert saved['settings']['quick'] is True
  for k in MULTI_ADAPTER_KEYS:
    assert k in saved, k
  for k in MULTI_ADAPTER_KEYS[:3] + ('single_adapter_vs_merged',):
    assert r[k] > 0, k
  d = r['details']
  # Not timed: switching, re-mixing and hot-swapping compile nothing and retrace nothing ...
  assert r['swap_recompiles'] == 0 and d['swap']['compiled'] == []
  assert d['swap']['forward_traces'] == 0 and d['swap']['slots_unchanged']
  # ... and the swapped-in adapter computes exactly what it computed in its own slot.
  assert d['swap']['hot_swap_max_abs_diff'] == 0.0
  # The library's forward equals the merged model's (float rounding).
  for v in d['max_abs_error_vs_merged'].values():
    assert v < 1e-4
  # The delta file holds 1 layer x (query, value) x (384*8 + 8*384) LoRA floats + the 770-float
  # head, plus its JSON header.
  tensors = 4 * (2 * 2 * 384 * 8 + 770)
  assert tensors < d['adapter_file_bytes'] < tensors + 16384
  assert r['adapter_bytes_ratio'] == d['adapter_file_bytes'] / d['base_file_bytes']


def test_committed_multi_adapter_results_have_the_keys():
  from benchmarks import multi_adapter
  r = json.loads(pathlib.Path(multi_adapter.RESULTS).read_text())
  for k in MULTI_ADAPTER_KEYS:
    assert k in r, k
  s = r['settings']
  assert s['batch_size'] == 64 and s['max_length'] == 64 and s['quick'] is False
  assert (s['adapters'], s['few_adapters'], s['rank'], s['num_layers']) == (64, 8, 8, 6)
  assert s['timed_steps'] >= 30 and r['swap_recompiles'] == 0


PRECISION_KEYS = ('bf16_step_time_ratio', 'remat_peak_memory_ratio', 'f32_step_ms',
                  'bf16_step_ms', 'f32_peak_bytes', 'remat_peak_bytes')


def test_quick_precision_benchmark_reports_all_keys(tmp_path):
  from benchmarks import precision
  out = tmp_path / 'precision.json'
  # 1 layer, batch 8, 3 steps; one remat policy keeps the compiles to three.
  r = precision.main(['--quick', '--layers=1', '--remat=full', f'--out={out}'])
  saved = json.loads(out.read_text())
  assert saved['settings']['quick'] is True and saved['remat_policy'] == 'full'
  for k in PRECISION_KEYS:
    assert r[k] > 0, k
  # Not timed: the bf16 run's trainable partition and optimizer state stay float32.
  assert r['details']['bf16_master_dtypes'] == ['float32']
  assert r['remat_peak_memory_ratio'] == r['remat_peak_bytes'] / r['f32_peak_bytes']


def test_committed_precision_results_have_the_keys():
  from benchmarks import precision
  r = json.loads(pathlib.Path(precision.RESULTS).read_text())
  for k in PRECISION_KEYS:
    assert k in r, k
  assert r['settings']['batch_size'] == 32 and r['settings']['max_length'] == 64
  assert r['settings']['timed_steps'] >= 20


COMPRESSION_KEYS = ('student_infer_time_ratio', 'head_pruned_50_infer_time_ratio',
                    'svd_half_rank_infer_time_ratio', 'deep_compression_size_ratio',
                    'huffman_roundtrip_exact')


@pytest.mark.slow  # ~1 min: it trains the MNIST model twice; test_compress_train covers the parts
def test_quick_compression_benchmark_reports_all_keys(tmp_path):
  from benchmarks import compression_bench as compression
  out = tmp_path / 'compression.json'
  r = compression.main(['--quick', f'--out={out}'])
  assert json.loads(out.read_text())['settings']['quick'] is True
  for k in COMPRESSION_KEYS:
    assert k in r, k
  p = r['details']['params']
  # Not timed: every smaller model really has fewer parameters than the teacher.
  assert p['student'] < p['heads_pruned_50'] < p['teacher'] and p['svd_half_rank'] < p['teacher']
  stages = r['details']['deep_compression_mnist']['stages']
  assert r['deep_compression_size_ratio'] == stages[-1]['bytes'] / stages[0]['bytes']
  assert r['huffman_roundtrip_exact'] is True


def test_committed_compression_results_have_the_keys():
  from benchmarks import compression_bench as compression
  r = json.loads(pathlib.Path(compression.RESULTS).read_text())
  for k in COMPRESSION_KEYS:
    assert k in r, k
  assert r['settings']['batch_size'] == 32 and r['settings']['max_length'] == 64
  assert r['settings']['timed_calls'] >= 20 and not r['settings']['quick']
  assert r['huffman_roundtrip_exact'] is True
