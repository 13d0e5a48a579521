"""configs/lm_compress.py's variants end to end on lm_tiny (a random 2-layer LM, one or two
steps each): QLoRA's int8 base frozen with gradients on LoRA only, the 2:4 pattern exact after
training, and what each variant reports it serves (int8 exact match generated in int8, bytes);
the static PTQ variant through ``python -m peftjax.main``. The unit-level properties (fake-quant
== dequantized, int8 decode == its float reference, the student, the KD loss) are in
tests/test_lm_compress.py."""
import functools
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import tree as tree_lib
from test_lm_compress import _tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def _finished(variant):
  """(config, workdir, summary, setup, trained params) of a tiny run of ``variant``."""
  from peftjax import run as run_lib
  from peftjax import train
  c = _tiny(variant)
  wd = tempfile.mkdtemp(prefix=f'lm_compress_{variant}_')
  summary = train.train_and_evaluate(c, wd)
  setup, trained = run_lib.restore_trained(c, wd)
  return c, wd, summary, setup, trained


def test_qlora_base_stays_int8_and_frozen_and_only_lora_has_gradients():
  from peftjax import run as run_lib
  _, _, summary, setup, trained = _finished('qlora')
  frozen = tree_lib.flatten(setup.frozen)
  stored = sorted(p[:-len('/int8')] for p in frozen if p.endswith('/int8'))
  assert stored == ['embed/embedding'] + sorted(
      f'layers/{m}/kernel' for m in ('attn/k_proj', 'attn/o_proj', 'attn/q_proj', 'attn/v_proj',
                                     'mlp/down_proj', 'mlp/gate_proj', 'mlp/up_proj'))
  assert all(frozen[f'{p}/int8'].dtype == jnp.int8 for p in stored)
  # No base leaf is in the trainable partition (the optimizer never sees the int8 base) ...
  assert tree_lib.flatten(setup.trainable['base']) == {}
  # ... and training moved the LoRA factors.
  moved = [p for p, v in tree_lib.flatten(trained['peft']).items()
           if not np.array_equal(v, tree_lib.flatten(setup.trainable['peft'])[p])]
  assert moved and all(p.endswith(('lora_a', 'lora_b')) for p in moved)
  # The gradient of the task loss: LoRA leaves only, B's nonzero at step 0 (A's is 0: B = 0).
  forward = run_lib.setup_forward(setup)
  batch = {k: jnp.asarray(v) for k, v in setup.data.train_batches(4, 0)[0].items()}
  grads = jax.grad(lambda t: setup.task.loss(forward(t, setup.frozen, batch), batch)[0])(
      setup.trainable)
  g = tree_lib.flatten(grads)
  assert g and all(p.startswith('peft/') and p.endswith(('lora_a', 'lora_b')) for p in g)
  assert all(np.abs(np.asarray(v)).sum() > 0 for p, v in g.items() if p.endswith('lora_b'))
  q = summary['quant']
  # Served: the trained LoRA merged into the (dequantized) base, re-quantized, scored in int8.
  assert summary['served_bytes'] == q['served_bytes'] < q['float_bytes'] / 3
  assert q['int8_layers'] == 8 and 0.0 <= q['int8_exact_match'] <= 1.0
  assert q['method_bytes'] == 4 * sum(np.size(v) for v in jax.tree.leaves(trained['peft']))


def _check_24(base: dict, targets) -> None:
  for p in targets:
    w = np.asarray(base[p])
    layers_, d_in, d_out = w.shape
    groups = (w.reshape(layers_, d_in // 4, 4, d_out) != 0).sum(axis=2)
    assert (groups == 2).all(), p  # exactly 2 of every 4 consecutive inputs, every layer


def test_24_pattern_holds_in_every_group_of_four_after_training():
  from peftjax import run as run_lib
  from peftjax import step as step_lib
  _, _, summary, setup, trained = _finished('prune24_lora')
  base = tree_lib.flatten(trained['base'])
  targets = [p for p in base if p.startswith('layers/') and p.endswith('/kernel')]
  assert len(targets) == 7
  _check_24(base, targets)  # the frozen base LoRA trained on, pruned once before training
  init = tree_lib.flatten(setup.trainable['peft'])
  assert not np.array_equal(tree_lib.flatten(trained['peft'])['layers/attn/q_proj/lora_b'],
                            init['layers/attn/q_proj/lora_b'])
  comp = summary['compression']
  assert comp['target_sparsity'] == 0.5  # measured on the run's final base
  n_target = sum(np.size(base[p]) for p in targets)
  assert comp['nm_bytes'] == (4 * (comp['params'] - n_target) + 4 * n_target // 2
                              + n_target // 2 * 2 // 8)
  assert summary['served_bytes'] == comp['nm_bytes'] + comp['method_bytes']
  # A trained base (full fine-tuning) is masked again after every update: still 2:4.
  c = _tiny('prune24_lora', peft__method='full', optim__learning_rate=1e-2,
            compress__prune__score='magnitude')
  setup = run_lib.build_setup(c)
  tx, state = run_lib.initial_state(c, setup, setup.trainable)
  step = jax.jit(step_lib.make_train_step(run_lib.setup_forward(setup), tx, setup.task,
                                          setup.components))
  batch = {k: jnp.asarray(v) for k, v in setup.data.train_batches(4, 0)[0].items()}
  before = tree_lib.flatten(setup.trainable['base'])
  state, _ = step(state, setup.frozen, batch, run_lib.consts(setup)[0])
  after = tree_lib.flatten(state.params['base'])
  _check_24(after, targets)
  for p in targets:
    kept = np.asarray(before[p]) != 0
    np.testing.assert_array_equal(np.asarray(after[p]) != 0, kept)  # the same 2 of 4 kept
    assert not np.array_equal(after[p], before[p])  # ... and trained


@pytest.mark.parametrize('variant', ['qat', 'qat_lora', 'ptq', 'distill15'])
def test_variant_runs_and_reports_what_it_serves(variant):
  _, _, s, setup, trained = _finished(variant)
  assert s['exact_match_after'] is not None and s['served_bytes'] > 0 and s['served']
  base = trained['base']
  if variant in ('qat', 'qat_lora', 'ptq'):  # qat_lora: its LoRA merged, then converted
    q = s['quant']
    assert 0.0 <= q['int8_exact_match'] <= 1.0 and q['int8_layers'] == 8
    # What is served: every layer kernel and the embedding in int8, their scales, the norms.
    n_int8 = sum(np.size(v) for p, v in tree_lib.flatten(base).items()
                 if p.endswith(('/kernel', 'embedding')))
    assert s['served_bytes'] < q['float_bytes'] / 3
    assert s['served_bytes'] > n_int8
  if variant == 'distill15':
    d = s['compression']['distill']
    assert d['teacher'] == 'pretrained' and list(d['layer_map']) == [1, 3]
    assert d['student_params'] < d['teacher_params'] and 'teacher_exact_match' in d
    assert setup.built.module.cfg.num_layers == 2
    assert s['served_bytes'] == 4 * s['total_params']


def test_static_ptq_variant_through_main(tmp_path):
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  args = [sys.executable, '-m', 'peftjax.main', '--config=configs/lm_compress.py:ptq_static,tiny',
          f'--workdir={tmp_path}', '--config.train.steps=1', '--config.optim.warmup_steps=0',
          '--config.train.eval_every=0', '--config.train.eval_before=False',
          '--config.data.eval_split=', '--config.generate.max_eval_examples=2',
          '--config.generate.teacher_forced=False',
          *([f'--compilation_cache={cache}'] if cache else [])]
  p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert p.returncode == 0, p.stderr[-3000:]
  s = json.loads((tmp_path / 'summary.json').read_text())
  assert s['quant']['activations'] == 'static (minmax, 8 batches)'
  assert 0.0 <= s['quant']['int8_exact_match'] <= 1.0
  assert s['served_bytes'] == s['quant']['served_bytes']




def test_ptq_tool_converts_a_finished_lora_run_to_a_saved_int8_model(tmp_path):
  from peftjax.quant import int8
  from peftjax.quant import lm
  from peftjax.quant.convert import ptq
  c, wd, _, setup, trained = _finished('qlora')
  s = ptq(c, wd, str(tmp_path / 'int8'), timing_steps=1, log=lambda m: None)
  assert s['activations'] == 'per_token' and s['int8_layers'] == 8
  assert set(s['float']) == set(s['int8']) == {'exact_match'}
  assert s['int8_bytes'] < s['float_bytes'] / 3 and s['generate_time_ratio'] > 0
  # The saved model: LoRA merged into the dequantized base and re-quantized, in int8, equal to
  # the merged model converted here (its weights, scales and forward).
  merged = setup.method.merge(trained['base'], trained['peft'])
  loaded = int8.load(tmp_path / 'int8', setup.built.module, merged)
  fresh, _ = lm.int8_model(c, setup, merged)
  flat, want = tree_lib.flatten(loaded.merged_params()), tree_lib.flatten(fresh.merged_params())
  assert sorted(flat) == sorted(want)
  for p, v in want.items():
    np.testing.assert_array_equal(flat[p], v)
    assert flat[p].dtype == v.dtype
  assert all(flat[st.weight_path].dtype == jnp.int8 for st in loaded.sites)
  inputs = lm.sample_inputs(setup)
  np.testing.assert_array_equal(loaded.jit()(inputs), fresh.jit()(inputs))
  # The end-of-run report given the trained LoRA (when the loop passes it) converts the same
  # merged model and scores it the same.
  from peftjax.components import quant_report
  r = quant_report.report_fn(c, setup)(trained['base'], peft=trained['peft'])
  assert r['quant']['int8_exact_match'] == s['int8']['exact_match']
  assert r['served_bytes'] == fresh.weight_bytes == s['int8_bytes']
