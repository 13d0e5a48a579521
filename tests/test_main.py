"""End to end through `python -m peftjax.main`: a tiny run, SIGKILL + resume, and bad input."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config=configs/tiny.py']


def _main(args, env=None, **kw):
  return subprocess.Popen([sys.executable, '-m', 'peftjax.main', *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}, **kw)


def _run(args, timeout=600, env=None):
  p = _main(args, env)
  out, err = p.communicate(timeout=timeout)
  return p.returncode, out, err


def _steps(workdir: pathlib.Path):
  d = workdir / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  wd = tmp_path_factory.mktemp('full')
  code, out, err = _run([*TINY, f'--workdir={wd}'])
  assert code == 0, err[-3000:]
  return wd, out


def test_tiny_run_writes_summary_and_metrics(uninterrupted):
  wd, out = uninterrupted
  s = json.loads((wd / 'summary.json').read_text())
  for key in ('accuracy_before', 'accuracy_after', 'trainable_params', 'total_params',
              'trainable_fraction', 'train_seconds'):
    assert key in s, key
  # 1 layer: LoRA r=8 on query and value + the 2-class head.
  assert s['trainable_params'] == 2 * (384 * 8 + 8 * 384) + 384 * 2 + 2
  assert s['trainable_fraction'] == pytest.approx(s['trainable_params'] / s['total_params'])
  assert 0.0 <= s['accuracy_after'] <= 1.0 and s['test']['examples'] == 64
  lines = [json.loads(l) for l in (wd / 'metrics.jsonl').read_text().splitlines()]
  assert [l['step'] for l in lines if l['split'] == 'train'] == [2, 4, 6, 8]
  assert [l['step'] for l in lines if l['split'] == 'eval'] == [4, 8]
  assert list((wd / 'tensorboard').iterdir())
  assert _steps(wd) == [6, 8]  # checkpoint every 2 steps, keep the newest 2
  assert 'test accuracy before' in out and 'trainable 13,058 of' in out


def _kill_then_resume(args, wd):
  """Starts a run, SIGKILLs it once its first checkpoint exists, then reruns it to the end."""
  p = _main([*args, f'--workdir={wd}'])
  deadline = time.time() + 300
  while not _steps(wd) and p.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.communicate()
  killed_at = _steps(wd)
  assert killed_at and killed_at[-1] < 8, f'not killed mid-run (checkpoints {killed_at})'
  code, out, err = _run([*args, f'--workdir={wd}'])
  assert code == 0, err[-3000:]
  assert 'resumed from checkpoint at step' in out
  return json.loads((wd / 'summary.json').read_text())


def test_sigkill_and_resume_is_bit_identical(uninterrupted, tmp_path):
  wd_full, _ = uninterrupted
  a = json.loads((wd_full / 'summary.json').read_text())
  b = _kill_then_resume(TINY, tmp_path / 'killed')
  assert a['trainable_sha256'] == b['trainable_sha256']
  assert a['accuracy_after'] == b['accuracy_after']


def test_gradual_unfreezing_resumes_across_the_boundary(tmp_path):
  args = [*TINY, "--config.train.unfreeze=((5, 'layer_0/output/'),)"]
  code, out, err = _run([*args, f'--workdir={tmp_path / "full"}'])
  assert code == 0, err[-3000:]
  assert 'step 5: unfreezing; 603,266 parameters train now' in out
  a = json.loads((tmp_path / 'full' / 'summary.json').read_text())
  b = _kill_then_resume(args, tmp_path / 'killed')  # killed at step 2 or 4, before step 5
  assert a['trainable_sha256'] == b['trainable_sha256']


def test_misspelled_override_names_the_key(tmp_path):
  code, out, err = _run([*TINY, '--config.peft.lora.rnak=4', f'--workdir={tmp_path / "w"}'])
  assert code != 0 and 'rnak' in err
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('override,expect', [
    ('--config.peft.lora.rank=0', 'config.peft.lora.rank=0 is invalid; valid: a positive integer'),
    ('--config.peft.method=lorra', "config.peft.method='lorra' is invalid; valid: adapter, bitfit"),
    ('--config.optim.schedule=step', "config.optim.schedule='step' is invalid"),
    ('--config.data.max_length=1', 'config.data.max_length=1 is invalid; valid: 2..512'),
    ("--config.optim.lr_multipliers=(('lora_b$', -1.0),)",
     "optim.lr_multipliers entry ('lora_b$', -1.0) is invalid"),
])
def test_invalid_values_fail_before_compute(tmp_path, override, expect):
  code, out, err = _run([*TINY, override, f'--workdir={tmp_path / "w"}'])
  assert code != 0 and expect in err, err[-2000:]
  assert not (tmp_path / 'w').exists()


def test_target_matching_nothing_lists_paths(tmp_path):
  code, out, err = _run([*TINY, '--config.peft.lora.targets=attention/quer/kernel$',
                         f'--workdir={tmp_path / "w"}'])
  assert code != 0
  assert 'matches no parameter; closest weight paths' in err and 'query/kernel' in err


def test_unfreeze_group_matching_nothing(tmp_path):
  code, out, err = _run([*TINY, "--config.train.unfreeze=((2, 'layer_9/'),)",
                         f'--workdir={tmp_path / "w"}'])
  assert code != 0 and "train.unfreeze group (2, 'layer_9/') matches no base parameter" in err
  assert not (tmp_path / 'w').exists()


def test_nan_loss_stops_without_checkpointing_bad_state(tmp_path):
  wd = tmp_path / 'nan'
  code, out, err = _run([*TINY, '--config.optim.learning_rate=1e30', '--config.optim.clip_norm=0',
                         '--config.optim.warmup_steps=0', '--config.train.checkpoint_every=1',
                         f'--workdir={wd}'])
  assert code != 0 and 'non-finite training loss at step' in err, err[-2000:]
  bad_step = int(err.split('non-finite training loss at step ')[1].split()[0])
  assert all(s < bad_step for s in _steps(wd))
  assert not (wd / 'summary.json').exists()


def test_fresh_refuses_foreign_directory(tmp_path):
  (tmp_path / 'precious.txt').write_text('keep me')
  code, out, err = _run([*TINY, '--fresh', f'--workdir={tmp_path}'])
  assert code != 0 and 'refusing to clear' in err
  assert (tmp_path / 'precious.txt').read_text() == 'keep me'


MOE = [*TINY, '--config.model.num_layers=2', '--config.moe.num_experts=4']


def test_moe_lora_on_experts_end_to_end(tmp_path):
  """Upcycled 2-layer MiniLM-MoE (layer 1: 8 experts), LoRA on experts + router, from flags."""
  wd = tmp_path / 'moe'
  code, out, err = _run([*TINY, '--config.model.num_layers=2', '--config.moe.num_experts=8',
                         '--config.peft.lora.targets=moe/(intermediate|output|router)/kernel$',
                         f'--workdir={wd}'])
  assert code == 0, err[-3000:]
  s = json.loads((wd / 'summary.json').read_text())
  d, f, e, r = 384, 1536, 8, 8
  lora = (d * r + r * e) + e * (d * r + r * f) + e * (f * r + r * d)  # router, W1, W2 per expert
  assert s['trainable_params'] == lora + d * 2 + 2
  train = [json.loads(l) for l in (wd / 'metrics.jsonl').read_text().splitlines()
           if '"train"' in l]
  for m in train:
    assert 0.5 < m['balance_loss'] < 4.0  # E * sum_e f_e P_e: 1.0 when uniform, E at worst
    assert 0.0 <= m['dropped_fraction'] <= 1.0 and m['z_loss'] > 0


@pytest.mark.parametrize('overrides,expect', [
    (['--config.moe.top_k=5'], 'config.moe.top_k=5 is invalid; valid: 1 <= top_k <= num_experts (4)'),
    (['--config.moe.top_k=0'], 'config.moe.top_k=0 is invalid'),
    (['--config.moe.capacity_factor=0.0'], 'config.moe.capacity_factor=0.0 is invalid; valid: a number > 0'),
    (['--config.moe.router=switch'], "config.moe.router='switch' is invalid; valid: topk, expert_choice"),
])
def test_invalid_moe_values_fail_before_compute(tmp_path, overrides, expect):
  code, out, err = _run([*MOE, *overrides, f'--workdir={tmp_path / "w"}'])
  assert code != 0 and expect in err, err[-2000:]
  assert not (tmp_path / 'w').exists()


def test_experts_not_divisible_by_expert_axis(tmp_path):
  code, out, err = _run([*MOE, '--config.moe.num_experts=6', '--config.mesh.expert=4',
                         f'--workdir={tmp_path / "w"}'],
                        env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  assert code != 0 and ('config.moe.num_experts=6 is invalid; valid: a multiple of the mesh '
                        'expert axis size 4') in err, err[-2000:]
  assert not (tmp_path / 'w').exists()


def test_save_adapter_writes_the_trainable_partition_with_provenance(tmp_path):
  from peftjax import delta
  wd = tmp_path / 'a'
  code, out, err = _run([*TINY, '--config.train.save_adapter=True', f'--workdir={wd}'])
  assert code == 0, err[-3000:]
  s = json.loads((wd / 'summary.json').read_text())
  params, m = delta.load_delta(wd / 'adapter.safetensors')
  # The file holds exactly the run's final trainable partition, nothing of the frozen base.
  assert m['params']['sha256'] == s['trainable_sha256']
  assert m['params']['count'] == s['trainable_params'] == 13_058
  assert set(params) == {'base', 'peft'} and m['method'] == 'lora'
  assert m['metrics']['test']['accuracy'] == s['accuracy_after']
  assert m['dataset']['name'] == 'rotten_tomatoes' and len(m['dataset']['fingerprint']) == 64
  assert s['adapter']['file_bytes'] == (wd / 'adapter.safetensors').stat().st_size
  assert 'adapter: ' in out


def test_init_adapter_continues_from_a_saved_adapter_and_its_optimizer_state(tmp_path):
  """Run 1 saves its adapter with the optimizer state; run 2 starts from it. Run 2's schedule
  continues at run 1's step count (past its own 2-step cosine: learning rate exactly 0), so its
  parameters stay bit-identical to run 1's final ones only if both the parameters and the
  optimizer state were restored (a fresh state would start the schedule at step 0 and move them).
  """
  import numpy as np
  import safetensors.numpy
  from peftjax import delta
  fast = [*TINY, '--config.train.save_adapter=True', '--config.train.save_adapter_opt_state=True',
          '--config.train.eval_every=0', '--config.train.checkpoint_every=0']
  first = tmp_path / 'a' / 'adapter.safetensors'
  code, out, err = _run([*fast, '--config.train.steps=4', '--config.train.eval_before=False',
                         f'--workdir={tmp_path / "a"}'])
  assert code == 0, err[-3000:]
  code, out, err = _run([*fast, '--config.train.steps=2', '--config.optim.warmup_steps=1',
                         f'--config.train.init_adapter={first}', f'--workdir={tmp_path / "b"}'])
  assert code == 0, err[-3000:]
  assert f'starting from adapter {first} with its optimizer state' in out
  m1, m2 = delta.read_manifest(first), delta.read_manifest(tmp_path / 'b' / 'adapter.safetensors')
  assert m2['parent'] == {'path': str(first), 'params_sha256': m1['params']['sha256']}
  assert m2['params']['sha256'] == m1['params']['sha256']  # bit-identical parameters
  s1 = json.loads((tmp_path / 'a' / 'summary.json').read_text())
  s2 = json.loads((tmp_path / 'b' / 'summary.json').read_text())
  assert s2['accuracy_before'] == s1['accuracy_after']  # evaluated at the restored start
  # The optimizer's step counts (AdamW's and the schedule's) went on from 4 to 6.
  counts = [{k: int(v) for k, v in safetensors.numpy.load_file(str(p)).items()
             if k.startswith('opt_state/') and v.dtype == np.int32}
            for p in (first, tmp_path / 'b' / 'adapter.safetensors')]
  assert counts[0] and set(counts[0].values()) == {4} and set(counts[1].values()) == {6}
  assert m1['opt_state']['leaves'] == m2['opt_state']['leaves'] == 2 * 6 + 2
  # A missing adapter fails before any work, naming the file, and leaves no workdir behind.
  code, out, err = _run([*TINY, f'--config.train.init_adapter={tmp_path / "nope.safetensors"}',
                         f'--workdir={tmp_path / "c"}'])
  assert code != 0 and f"adapter file '{tmp_path / 'nope.safetensors'}' does not exist" in err
  assert 'Traceback' not in err and not (tmp_path / 'c').exists()
