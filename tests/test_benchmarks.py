"""The committed results files (benchmarks/results/*.json, the figures the README quotes) hold
every key the README quotes, measured in full mode, with the CPU that measured them.

Each benchmark's quick mode runs as `make bench` runs it (a script, in a subprocess) in
tests/test_commands.py.
"""
import json
import pathlib

import pytest

from benchmarks import lora_vs_full

RESULTS = pathlib.Path(lora_vs_full.RESULTS).parent

KEYS = ('lora_step_ms', 'full_step_ms', 'infer_ms', 'step_time_ratio', 'flops_ratio',
        'opt_state_bytes_ratio', 'peak_memory_ratio', 'trainable_fraction', 'lora_mfu')


def test_committed_results_have_the_keys():
  path = pathlib.Path(lora_vs_full.RESULTS)
  r = json.loads(path.read_text())
  for k in KEYS:
    assert k in r, k
  assert r['settings']['batch_size'] == 32 and r['settings']['max_length'] == 64
  assert r['settings']['timed_steps'] >= 20
  assert r['settings']['order'] == 'interleaved lora/full/infer/matmul'  # MFU's probe too


QUANT_KEYS = ('int8_infer_time_ratio', 'int8_weight_bytes_ratio', 'qat_step_time_ratio',
              'qlora_base_bytes_ratio')


def test_committed_quant_results_have_the_keys():
  from benchmarks import quant
  r = json.loads(pathlib.Path(quant.RESULTS).read_text())
  for k in QUANT_KEYS:
    assert k in r, k
  assert r['settings']['batch_size'] == 32 and r['settings']['max_length'] == 64
  assert r['settings']['timed_steps'] >= 20


MOE_KEYS = ('moe_vs_dense_step_ratio', 'experts_scaling_ratio', 'onehot_vs_sorted_ratio',
            'dropped_fraction')


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


def test_committed_compression_results_have_the_keys():
  from benchmarks import compression_bench as compression
  r = json.loads(pathlib.Path(compression.RESULTS).read_text())
  for k in COMPRESSION_KEYS:
    assert k in r, k
  assert r['settings']['batch_size'] == 32 and r['settings']['max_length'] == 64
  assert r['settings']['timed_calls'] >= 20 and not r['settings']['quick']
  assert r['huffman_roundtrip_exact'] is True


def test_committed_any_model_results_have_the_keys():
  from benchmarks import any_model
  r = json.loads(pathlib.Path(any_model.RESULTS).read_text())
  for k in ('scan_vs_unrolled_step_ratio', 'nnx_vs_linen_step_ratio', 'scan_step_ms',
            'unrolled_step_ms', 'nnx_step_ms'):
    assert r[k] > 0, k
  assert r['settings']['model']['layers'] == 12 and r['settings']['timed_steps'] >= 20


LM_KEYS = ('lora_vs_full_step_ratio', 'train_mfu', 'decode_tokens_per_s_b1',
           'decode_tokens_per_s_b16', 'decode_roofline_b1', 'batch16_vs_batch1_throughput',
           'prefill_ms')


def test_committed_lm_results_have_the_keys():
  from benchmarks import lm
  r = json.loads(pathlib.Path(lm.RESULTS).read_text())
  for k in LM_KEYS:
    assert r[k] > 0, k
  s = r['settings']
  assert (s['num_layers'], s['hidden_size'], s['dtype']) == (30, 576, 'float32')  # SmolLM2-135M
  assert (s['batch_size'], s['max_length'], s['prompt_length']) == (8, 128, 128)
  assert s['timed_steps'] >= 20 and s['decode_rounds'] >= 20 and s['new_tokens'] >= 16
  assert set(r['target_notes']) == set(r['meets_targets']) == set(lm.TARGETS)
  # Greedy without stop tokens: every row generated every token asked for.
  n = s['new_tokens']
  assert r['details']['tokens_generated'] == {'b1_n': n, 'b1_1': 1, 'b16_n': 16 * n, 'b16_1': 16}


LM_SERVING_KEYS = ('mixed_adapters_decode_ratio', 'mixed_adapters_prefill_ratio',
                   'prefix_decode_ratio', 'swap_recompiles', 'int8_decode_speedup')


def test_committed_lm_serving_results_have_the_keys():
  from benchmarks import lm_serving
  r = json.loads(pathlib.Path(lm_serving.RESULTS).read_text())
  for k in LM_SERVING_KEYS:
    assert k in r, k
  assert r['swap_recompiles'] == 0 and r['int8_decode_speedup'] > 0
  s = r['settings']
  assert (s['num_layers'], s['hidden_size'], s['dtype']) == (30, 576, 'float32')  # SmolLM2-135M
  assert (s['requests'], s['adapters'], s['prompt_length']) == (16, 8, 128)
  assert s['lora']['rank'] == 8 and s['timed_decode_steps'] >= 20
  assert s['timed_prefill_rounds'] >= 20
  assert set(r['target_notes']) == set(r['meets_targets']) == set(lm_serving.TARGETS)


@pytest.mark.parametrize('name', ['lora_vs_full', 'quant', 'moe', 'multi_adapter', 'precision',
                                  'compression_bench', 'any_model', 'lm', 'lm_serving'])
def test_committed_results_name_the_cpu(name):
  # Ratios from a CPU without AVX512-BF16 or AMX say nothing of bf16 on one that has them.
  s = json.loads((RESULTS / f'{name}.json').read_text())['settings']
  assert s['quick'] is False
  cpu = s['cpu']
  assert cpu['model'] and cpu['logical_cpus'] >= 1
  assert {'avx2', 'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_int8'} <= set(cpu['isa'])
  assert set(s['load_average_1m']) == {'start', 'end'}
