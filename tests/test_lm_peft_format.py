"""The Hugging Face PEFT format for the decoder LM's LoRA adapters (peftjax.hf.peft_llama,
peftjax.hf.peft_llama_import, python -m peftjax.export --format=peft).

A trained lm_tiny LoRA run (rsLoRA, every attention and MLP projection and the tied embedding)
exports through the command line (--workdir) and export.run (--adapter) to the same files, whose
keys, shapes and config are PEFT's; the import gives back the run's tree exactly, and its
logits are the merged model's and the run's own. Adapter directories written here by hand from
the format spec (torch layout, rank/alpha patterns, a layer left out, an embedding table)
import to the logits of W + scaling * B @ A computed in numpy. Each bad adapter or export is one
clear error naming the field, and a refused export writes nothing. With a Python holding torch,
transformers and peft ($PEFTJAX_HF_PYTHON) PEFT's own PeftModel loads the exports and the
hand-built adapters with equal logits.
"""
import dataclasses
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from configs import lm_tiny
from peftjax import export
from peftjax import generation
from peftjax import peft
from peftjax import run as run_lib
from peftjax import train
from peftjax import tree as tree_lib
from peftjax.errors import UserInputError
from peftjax.hf import peft_llama
from peftjax.hf import peft_llama_import
from peftjax.hf.peft_lora import PeftFormatError
from peftjax.models import hf_llama
from peftjax.models.llama import LlamaConfig
from peftjax.models.llama import LlamaForCausalLM
from peftjax.models.llama import init_cache
from peftjax.models.llama_convert import hf_from_params
from peftjax.models.llama_convert import params_from_hf
from peftjax.serving import hf as serving_hf

ROOT = pathlib.Path(__file__).resolve().parent.parent
P = 'base_model.model.'
TOL = 1e-5  # float32 logits of two computations of the same model
HF_TOL = 1e-4  # PEFT in torch vs our forward
HF_PYTHON_ENV = 'PEFTJAX_HF_PYTHON'
RANK, ALPHA = 8, 16.0
LAYER_MODULES = ('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj',
                 'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj')
TARGETS = r'attn/(q|k|v|o)_proj/kernel$|mlp/(gate|up|down)_proj/kernel$|embed/embedding$'


def _config():
  c = lm_tiny.get_config()
  c.seed = 3
  c.peft.lora.targets = TARGETS
  c.peft.lora.rank, c.peft.lora.alpha, c.peft.lora.rslora = RANK, ALPHA, True
  c.data.name = 'hamlet_text'  # perplexity only: the export is the point
  c.data.max_length = 32
  c.data.max_eval_examples = 4
  c.train.batch_size = 2
  c.train.eval_batch_size = 4
  c.train.steps = 3
  c.train.eval_before = False
  c.train.eval_every = 0
  c.train.checkpoint_every = 3
  c.train.save_adapter = True
  c.optim.warmup_steps = 1
  c.optim.learning_rate = 3e-2  # B moves well away from 0 in 3 steps
  return c


def _files(*roots) -> dict:
  out = {}
  for root in roots:
    for p in pathlib.Path(root).rglob('*'):
      st = p.stat()
      out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else 'dir'
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The finished run, its restored params, a batch, its implicit logits and two exports."""
  root = tmp_path_factory.mktemp('lm_peft')
  config = _config()
  workdir = root / 'run'
  train.train_and_evaluate(config, str(workdir))
  setup, params = run_lib.restore_trained(config, str(workdir))
  ids = np.array([[1, 520, 33, 9051, 77, 12, 4000, 5], [1, 640, 81, 2, 0, 0, 0, 0]], np.int32)
  mask = (np.arange(8)[None] < np.array([[8], [4]])).astype(np.int32)
  inputs = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask)}
  module = setup.built.module
  implicit = np.asarray(peft.apply(module, setup.method, params['base'], params['peft'], inputs))
  base = np.asarray(module.apply({'params': params['base']}, **inputs))
  done = subprocess.run([sys.executable, '-m', 'peftjax.export', f'--workdir={workdir}',
                         '--format=peft', f'--out={root / "from_workdir"}'], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == (
      f'exported {workdir} (peft) -> {root / "from_workdir"}')
  from_adapter = export.run(str(workdir / 'adapter.safetensors'), str(root / 'from_adapter'),
                            fmt='peft')
  yield dict(root=root, workdir=workdir, setup=setup, params=params, ids=ids, mask=mask,
             inputs=inputs, implicit=implicit, base=base, dirs={
                 'workdir': root / 'from_workdir', 'adapter': from_adapter})
  shutil.rmtree(root, ignore_errors=True)


def _expected_keys(num_layers: int, tied: bool) -> set:
  keys = {f'{P}model.layers.{i}.{m}.lora_{w}.weight' for i in range(num_layers)
          for m in LAYER_MODULES for w in 'AB'}
  keys |= {f'{P}model.embed_tokens.lora_embedding_{w}' for w in 'AB'}
  if tied:
    keys |= {f'{P}lm_head.lora_{w}.weight' for w in 'AB'}
  return keys


@pytest.mark.parametrize('source', ['workdir', 'adapter'])
def test_export_is_peft_format_and_round_trips_exactly(trained, source):
  d = trained['dirs'][source]
  cfg = trained['setup'].built.module.cfg
  assert sorted(p.name for p in d.iterdir()) == ['adapter_config.json',
                                                 'adapter_model.safetensors']
  config = json.loads((d / 'adapter_config.json').read_text())
  assert (config['peft_type'], config['task_type'], config['r'], config['lora_alpha'],
          config['use_rslora'], config['use_dora'], config['ensure_weight_tying'],
          config['base_model_name_or_path'], config['rank_pattern']) == (
              'LORA', 'CAUSAL_LM', RANK, ALPHA, True, False, True, 'random', {})
  assert config['target_modules'] == ['down_proj', 'embed_tokens', 'gate_proj', 'k_proj',
                                      'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']
  tensors = load_file(str(d / 'adapter_model.safetensors'))
  assert set(tensors) == _expected_keys(cfg.num_layers, tied=True) and len(tensors) == 32
  d_, v, m = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  assert tensors[f'{P}model.layers.1.self_attn.k_proj.lora_A.weight'].shape == (RANK, d_)
  assert tensors[f'{P}model.layers.1.self_attn.k_proj.lora_B.weight'].shape == (kv, RANK)
  assert tensors[f'{P}model.layers.0.self_attn.o_proj.lora_A.weight'].shape == (RANK, q)
  assert tensors[f'{P}model.layers.0.mlp.down_proj.lora_A.weight'].shape == (RANK, m)
  assert tensors[f'{P}model.embed_tokens.lora_embedding_A'].shape == (RANK, v)
  assert tensors[f'{P}model.embed_tokens.lora_embedding_B'].shape == (d_, RANK)
  lora = tree_lib.flatten(trained['params']['peft'])
  # Layer i of the scanned stack, transposed to torch layout; the tied lm_head is the same
  # update seen from the output side.
  np.testing.assert_array_equal(tensors[f'{P}model.layers.1.mlp.up_proj.lora_B.weight'],
                                np.asarray(lora['layers/mlp/up_proj/lora_b'])[1].T)
  np.testing.assert_array_equal(tensors[f'{P}lm_head.lora_A.weight'],
                                np.asarray(lora['embed/lora_b']))
  np.testing.assert_array_equal(tensors[f'{P}lm_head.lora_B.weight'],
                                np.asarray(lora['embed/lora_a']))
  back, info = peft_llama_import.load_peft_llama(d, cfg)
  assert tree_lib.flatten(back['base']) == {}
  got = tree_lib.flatten(back['peft'])
  assert sorted(got) == sorted(lora) and len(got) == 16
  for path, value in lora.items():
    np.testing.assert_array_equal(got[path], np.asarray(value), err_msg=path)
  assert (info['rank'], info['alpha'], info['rslora'], info['tied']) == (RANK, ALPHA, True, True)


def test_workdir_and_adapter_exports_are_the_same_files(trained):
  a, b = trained['dirs']['workdir'], trained['dirs']['adapter']
  for name in ('adapter_config.json', 'adapter_model.safetensors'):
    assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_imported_logits_equal_the_merged_model_and_the_run(trained):
  module = trained['setup'].built.module
  trainable, info = peft_llama_import.load_peft_llama(trained['dirs']['workdir'], module.cfg)
  method = peft_llama_import.lora_method(info)
  base = trained['params']['base']
  implicit = np.asarray(peft.apply(module, method, base, trainable['peft'], trained['inputs']))
  merged = np.asarray(module.apply({'params': method.merge(base, trainable['peft'])},
                                   **trained['inputs']))
  assert np.abs(trained['implicit'] - trained['base']).max() > 1e-2  # the adapter matters
  np.testing.assert_allclose(implicit, merged, rtol=0, atol=TOL)
  np.testing.assert_allclose(implicit, trained['implicit'], rtol=0, atol=TOL)


def test_generation_with_the_imported_adapter_equals_the_merged_model(trained):
  module = trained['setup'].built.module
  base = trained['params']['base']
  step, _ = serving_hf.lm_step_from_peft(module, base, trained['dirs']['adapter'])
  merged = trained['setup'].method.merge(base, trained['params']['peft'])
  make_cache = lambda b, n: init_cache(module.cfg, b, n)
  lengths = trained['mask'].sum(1)
  ours = generation.generate(step, make_cache, trained['ids'], lengths, max_new_tokens=4)
  ref = generation.generate(generation.model_step(module, merged), make_cache, trained['ids'],
                            lengths, max_new_tokens=4)
  np.testing.assert_array_equal(ours.ids, ref.ids)
  np.testing.assert_array_equal(ours.lengths, [4, 4])


def test_peft_directory_merges_into_its_base_through_export(trained, tmp_path):
  """--adapter=<PEFT dir> --format=merged: PEFT's merge_and_unload into --base."""
  setup = trained['setup']
  cfg = setup.built.module.cfg
  base_dir = hf_llama.export_hf_dir(tmp_path / 'base', cfg.to_hf(),
                                    hf_from_params(cfg, jax.device_get(trained['params']['base'])),
                                    setup.task.tokenizer)
  out = export.run(str(trained['dirs']['adapter']), str(tmp_path / 'merged'),
                   base=str(base_dir))
  config, state = hf_llama.load_hf_dir(out)
  again = LlamaConfig.from_hf(config)
  logits = LlamaForCausalLM(again).apply({'params': params_from_hf(again, state)},
                                         **trained['inputs'])
  np.testing.assert_allclose(np.asarray(logits), trained['implicit'], rtol=0, atol=TOL)


# ----------------------------------------------------------------------------- hand-built


def _small_cfg(tied: bool, scan: bool = True) -> LlamaConfig:
  return LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=8, max_position=64,
                     tie_embeddings=tied, rope_theta=10000.0, scan_layers=scan)


def _small_base(cfg: LlamaConfig, seed: int = 0) -> dict:
  init = LlamaForCausalLM(cfg).init(jax.random.key(seed), jnp.ones((1, 4), jnp.int32))
  return jax.device_get(nn.meta.unbox(init['params']))


def _write_adapter(d: pathlib.Path, config: dict, tensors: dict) -> pathlib.Path:
  d.mkdir(parents=True, exist_ok=True)
  (d / 'adapter_config.json').write_text(json.dumps(config))
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            str(d / 'adapter_model.safetensors'), metadata={'format': 'pt'})
  return d


def _hand_config(**over) -> dict:
  config = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': 4, 'lora_alpha': 8,
            'use_rslora': False, 'target_modules': ['q_proj', 'v_proj'], 'bias': 'none',
            'use_dora': False, 'base_model_name_or_path': 'some-org/some-llama',
            'rank_pattern': {}, 'alpha_pattern': {}, 'init_lora_weights': True}
  config.update(over)
  return config


def _hand_built(cfg, base, *, rslora: bool, seed: int = 0):
  """(config, tensors, reference HF state): LoRA on every projection of layers 1 and 2 (layer
  0's up_proj left out, v_proj of layer 1 at rank 2, down_proj at alpha 3), the input
  embedding and, untied, lm_head (tied: the same update, with ensure_weight_tying); untied, the
  file also replaces the embedding table. The reference is W + scaling * B @ A in numpy."""
  rng = np.random.default_rng(seed)
  state = hf_from_params(cfg, base)
  ref = {k: np.asarray(v, np.float64) for k, v in state.items()}
  r, alpha = 4, 8.0
  scale = lambda r_m, a_m: a_m / (math.sqrt(r_m) if rslora else r_m)
  tensors = {}
  for i in range(cfg.num_layers):
    for m in LAYER_MODULES:
      name = f'model.layers.{i}.{m}'
      if name == 'model.layers.0.mlp.up_proj':
        continue
      r_m = 2 if name == 'model.layers.1.self_attn.v_proj' else r
      a_m = 3.0 if m == 'mlp.down_proj' else alpha
      out, inp = state[f'{name}.weight'].shape
      a = rng.normal(size=(r_m, inp)) / math.sqrt(inp)
      b = rng.normal(size=(out, r_m)) * 0.2
      tensors[f'{P}{name}.lora_A.weight'] = a
      tensors[f'{P}{name}.lora_B.weight'] = b
      ref[f'{name}.weight'] += scale(r_m, a_m) * b @ a
  v, d = cfg.vocab_size, cfg.hidden_size
  ea, eb = rng.normal(size=(r, v)), rng.normal(size=(d, r)) * 0.05
  tensors[f'{P}model.embed_tokens.lora_embedding_A'] = ea
  tensors[f'{P}model.embed_tokens.lora_embedding_B'] = eb
  over = {'rank_pattern': {'model.layers.1.self_attn.v_proj': 2},
          'alpha_pattern': {'down_proj': 3.0}, 'use_rslora': rslora,
          'target_modules': sorted({m.split('.')[1] for m in LAYER_MODULES} | {'embed_tokens'})}
  if cfg.tie_embeddings:
    tensors[f'{P}lm_head.lora_A.weight'] = eb.T
    tensors[f'{P}lm_head.lora_B.weight'] = ea.T
    over['ensure_weight_tying'] = True
  else:
    table = ref['model.embed_tokens.weight'] + rng.normal(size=(v, d)) * 0.02
    tensors[f'{P}model.embed_tokens.base_layer.weight'] = table.copy()  # ref's changes below
    ref['model.embed_tokens.weight'] = table
    ha, hb = rng.normal(size=(r, d)) / math.sqrt(d), rng.normal(size=(v, r)) * 0.2
    tensors[f'{P}lm_head.lora_A.weight'] = ha
    tensors[f'{P}lm_head.lora_B.weight'] = hb
    ref['lm_head.weight'] += scale(r, alpha) * hb @ ha
    over['target_modules'] = over['target_modules'] + ['lm_head']
  embed = ref['model.embed_tokens.weight']
  ref['model.embed_tokens.weight'] = embed + scale(r, alpha) * (eb @ ea).T
  return _hand_config(**over), tensors, {k: v.astype(np.float32) for k, v in ref.items()}


def _small_inputs():
  ids = np.array([[3, 17, 90, 4, 55, 8, 21], [60, 2, 33, 1, 0, 0, 0]], np.int32)
  mask = (np.arange(7)[None] < np.array([[7], [4]])).astype(np.int32)
  return ids, mask


HAND_CASES = [('tied', True, True, False), ('untied', False, True, True),
              ('unrolled', False, False, False)]


@pytest.mark.parametrize('case,tied,scan,rslora', HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_hand_built_adapter_imports_to_the_numpy_reference(tmp_path, case, tied, scan, rslora):
  cfg = _small_cfg(tied, scan)
  base = _small_base(cfg)
  config, tensors, ref_state = _hand_built(cfg, base, rslora=rslora)
  d = _write_adapter(tmp_path / case, config, tensors)
  trainable, info = peft_llama_import.load_peft_llama(d, cfg)
  ids, mask = _small_inputs()
  inputs = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask)}
  module = LlamaForCausalLM(cfg)
  reference = module.apply({'params': params_from_hf(cfg, ref_state)}, **inputs)
  params = peft_llama_import.with_tables(base, trainable['base'])
  method = peft_llama_import.lora_method(info)
  got = peft.apply(module, method, params, trainable['peft'], inputs)
  plain = module.apply({'params': base}, **inputs)
  assert np.abs(np.asarray(reference) - np.asarray(plain)).max() > 1e-2
  np.testing.assert_allclose(np.asarray(got), np.asarray(reference), rtol=0, atol=TOL)
  merged = module.apply({'params': method.merge(params, trainable['peft'])}, **inputs)
  np.testing.assert_allclose(np.asarray(merged), np.asarray(reference), rtol=0, atol=TOL)
  flat = tree_lib.flatten(trainable['peft'])
  if scan:  # the stack: layer 0's up_proj zeros, v_proj padded to rank 4 with zeros
    assert flat['layers/mlp/up_proj/lora_a'].shape == (3, 32, 4)
    assert not flat['layers/mlp/up_proj/lora_a'][0].any()
    assert not flat['layers/attn/v_proj/lora_a'][1, :, 2:].any()
    assert info['ranks']['layers/attn/v_proj'] == 4
  else:
    assert 'layer_0/mlp/up_proj/lora_a' not in flat
    assert flat['layer_1/attn/v_proj/lora_a'].shape == (32, 2)
  assert sorted(tree_lib.flatten(trainable['base'])) == ([] if tied else ['embed/embedding'])
  assert info['tied'] is tied and ('lm_head/lora_a' in flat) is (not tied)


def _random_lora(cfg: LlamaConfig, seed: int = 0, ranks=None) -> dict:
  """A LoRA tree with random A and B on every site of ``cfg`` (stacked when scanned)."""
  rng = np.random.default_rng(seed)
  ranks = ranks or {}
  flat = {}
  for sub, hf_sub in peft_llama.TO_HF.items():
    d_in, d_out = peft_llama.torch_dims(cfg, f'model.layers.0.{hf_sub}')
    r = ranks.get(sub, 4)
    flat[f'layers/{sub}/lora_a'] = rng.normal(size=(cfg.num_layers, d_in, r))
    flat[f'layers/{sub}/lora_b'] = rng.normal(size=(cfg.num_layers, r, d_out))
  flat['embed/lora_a'] = rng.normal(size=(cfg.vocab_size, ranks.get('embed', 4)))
  flat['embed/lora_b'] = rng.normal(size=(ranks.get('embed', 4), cfg.hidden_size))
  if not cfg.tie_embeddings:
    flat['lm_head/lora_a'] = rng.normal(size=(cfg.hidden_size, 4))
    flat['lm_head/lora_b'] = rng.normal(size=(4, cfg.vocab_size))
  return tree_lib.unflatten({k: v.astype(np.float32) for k, v in flat.items()})


@pytest.mark.parametrize('tied', [True, False], ids=['tied', 'untied'])
def test_sites_of_other_ranks_round_trip_through_rank_patterns(tmp_path, tied):
  cfg = _small_cfg(tied)
  lora = _random_lora(cfg, ranks={'attn/v_proj': 2, 'embed': 3})
  out = peft_llama.save_peft_llama(tmp_path / 'p', lora, cfg, rank=4, alpha=6.0, rslora=True)
  config = json.loads((out / 'adapter_config.json').read_text())
  want = {'self_attn.v_proj': 2, 'embed_tokens': 3, **({'lm_head': 3} if tied else {})}
  assert config['rank_pattern'] == want
  assert config['alpha_pattern'] == pytest.approx(
      {k: 6.0 / 2.0 * math.sqrt(r) for k, r in want.items()})  # PEFT's scale = ours everywhere
  assert ('ensure_weight_tying' in config) is tied
  back, info = peft_llama_import.load_peft_llama(out, cfg)
  flat, got = tree_lib.flatten(lora), tree_lib.flatten(back['peft'])
  assert sorted(got) == sorted(flat)
  for path in flat:
    np.testing.assert_allclose(got[path], flat[path], rtol=1e-6, atol=0, err_msg=path)
  assert info['scales']['model.layers.0.self_attn.v_proj'] == pytest.approx(6.0 / 2.0)


def test_unrolled_layers_export_per_layer(tmp_path):
  cfg = _small_cfg(True, scan=False)
  rng = np.random.default_rng(1)
  lora = {'layer_2': {'attn': {'q_proj': {'lora_a': rng.normal(size=(32, 4)),
                                          'lora_b': rng.normal(size=(4, 32))}}}}
  config, tensors = peft_llama.to_peft_llama(lora, cfg, rank=4, alpha=8.0)
  assert sorted(tensors) == [f'{P}model.layers.2.self_attn.q_proj.lora_A.weight',
                             f'{P}model.layers.2.self_attn.q_proj.lora_B.weight']
  assert config['target_modules'] == ['q_proj'] and 'ensure_weight_tying' not in config


def test_base_name_is_never_a_path(tmp_path):
  from peftjax.models import gguf_file
  hf_dir = tmp_path / 'my-llama'
  hf_dir.mkdir()
  (hf_dir / 'config.json').write_text(json.dumps({'_name_or_path': 'org/llama-7b'}))
  other = tmp_path / 'plain-llama'
  other.mkdir()
  assert peft_llama.base_name('') == 'HuggingFaceTB/SmolLM2-135M-Instruct'
  assert peft_llama.base_name(str(gguf_file.smollm2_gguf())) == (
      'HuggingFaceTB/SmolLM2-135M-Instruct')
  assert peft_llama.base_name('random') == 'random'
  assert peft_llama.base_name(str(hf_dir)) == 'org/llama-7b'
  assert peft_llama.base_name(str(other)) == 'plain-llama'
  assert peft_llama.base_name('/gone/models/tiny.Q8_0.gguf') == 'tiny.Q8_0'
  with pytest.raises(PeftFormatError, match='is a path of this machine'):
    peft_llama.to_peft_llama(_random_lora(_small_cfg(True)), _small_cfg(True), rank=4,
                             alpha=8.0, base_model_name_or_path=str(hf_dir))


# ----------------------------------------------------------------------------- refusals


def _good(tied=True):
  cfg = _small_cfg(tied)
  config, tensors, _ = _hand_built(cfg, _small_base(cfg), rslora=False)
  return cfg, config, tensors


def _bad_import(case, tmp_path):
  """(adapter dir, cfg, message fragments) of a bad adapter."""
  tied = case not in ('resized_table',)
  cfg, config, tensors = _good(tied)
  q = f'{P}model.layers.0.self_attn.q_proj.lora_A.weight'
  if case == 'dora':
    config['use_dora'] = True
    frags = ['use_dora=True', 'DoRA']
  elif case == 'task_type':
    config['task_type'] = 'SEQ_CLS'
    frags = ["task_type='SEQ_CLS'", 'CAUSAL_LM']
  elif case == 'peft_type':
    config['peft_type'] = 'IA3'
    frags = ["peft_type='IA3'", "'LORA'"]
  elif case == 'pissa':
    config['init_lora_weights'] = 'pissa_niter_4'
    frags = ["init_lora_weights='pissa_niter_4'", 'modified base']
  elif case == 'lora_bias':
    config['lora_bias'] = True
    frags = ['lora_bias=True']
  elif case == 'bad_shape':
    tensors[q] = tensors[q][:, :16]
    frags = [repr(q), 'has shape (4, 16)', 'expected (4, 32)', 'hidden_size=32']
  elif case == 'bad_rank_pattern':
    config['rank_pattern'] = {'model.layers.1.self_attn.v_proj': 3}
    key = f'{P}model.layers.1.self_attn.v_proj.lora_A.weight'
    frags = [repr(key), 'has shape (2, 32)', 'expected (3, 32)', 'r=3']
  elif case == 'unknown_module':
    tensors[f'{P}model.layers.0.self_attn.rotary_emb.lora_A.weight'] = np.zeros((4, 32))
    frags = ["unknown key 'base_model.model.model.layers.0.self_attn.rotary_emb.lora_A.weight'",
             'valid keys', 'self_attn.{q,k,v,o}_proj']
  elif case == 'other_architecture':
    tensors[f'{P}transformer.h.0.attn.c_attn.lora_A.weight'] = np.zeros((4, 32))
    frags = ["under 'transformer'", 'another architecture', 'LlamaForCausalLM']
  elif case == 'layer_out_of_range':
    tensors[f'{P}model.layers.7.mlp.up_proj.lora_A.weight'] = np.zeros((4, 32))
    frags = ['is for layer 7', 'has 3 layers', '0..2']
  elif case == 'missing_partner':
    del tensors[f'{P}model.layers.2.mlp.gate_proj.lora_B.weight']
    frags = [repr(f'{P}model.layers.2.mlp.gate_proj.lora_A.weight'), 'no lora_B partner']
  elif case == 'embed_key_kind':
    tensors[f'{P}model.embed_tokens.lora_A.weight'] = tensors.pop(
        f'{P}model.embed_tokens.lora_embedding_A')
    frags = ['model.embed_tokens takes lora_embedding_{A,B}']
  elif case == 'tied_input_only':
    del config['ensure_weight_tying']
    for w in 'AB':
      del tensors[f'{P}lm_head.lora_{w}.weight']
    frags = ['a LoRA on model.embed_tokens but none on lm_head', 'ensure_weight_tying',
             'tied embeddings', 'one table']
  elif case == 'tied_different':
    tensors[f'{P}lm_head.lora_B.weight'] = tensors[f'{P}lm_head.lora_B.weight'] * 2
    frags = ['model.embed_tokens and lm_head carry different LoRA updates', 'tied embeddings']
  elif case == 'modules_to_save':
    config['modules_to_save'] = ['score']
    frags = ["modules_to_save=['score']", "'score'", 'embed_tokens, lm_head']
  elif case == 'resized_table':
    tensors[f'{P}model.embed_tokens.base_layer.weight'] = np.zeros((100, 32))
    frags = ["'base_model.model.model.embed_tokens.base_layer.weight' has shape (100, 32)",
             'expected (96, 32)', 'resized vocabulary']
  else:
    raise AssertionError(case)
  return _write_adapter(tmp_path / case, config, tensors), cfg, frags


BAD_IMPORTS = ('dora', 'task_type', 'peft_type', 'pissa', 'lora_bias', 'bad_shape',
               'bad_rank_pattern', 'unknown_module', 'other_architecture', 'layer_out_of_range',
               'missing_partner', 'embed_key_kind', 'tied_input_only', 'tied_different',
               'modules_to_save', 'resized_table')


@pytest.mark.parametrize('case', BAD_IMPORTS)
def test_bad_adapter_is_one_clear_error(tmp_path, case):
  d, cfg, frags = _bad_import(case, tmp_path)
  with pytest.raises(PeftFormatError) as e:
    peft_llama_import.load_peft_llama(d, cfg)
  message = str(e.value)
  for f in frags:
    assert f in message, (f, message)
  assert '\n' not in message


def _summary_run(path: pathlib.Path, config) -> str:
  path.mkdir()
  (path / 'summary.json').write_text(json.dumps({'config': config.to_dict()}))
  return str(path)


def _bad_export(case, tmp):
  """(export.run args, kwargs, message fragments) of an export the PEFT format refuses."""
  config = _config()
  if case in ('dora', 'pissa', 'ia3'):
    config.peft.method = case
    frags = ['--format=peft writes plain LoRA adapters', f"its method '{case}'",
             '--format=merged']
    frags += {'dora': ['magnitude vector'], 'pissa': ['residual base'], 'ia3': []}[case]
  elif case == 'qlora':
    config.quant.qlora = True
    frags = ['quant.qlora=True', 'int8-quantized base', '--format=merged']
  elif case == 'pruned':
    config.compress.prune.kind = 'nm'
    frags = ["compress.prune.kind='nm'", 'changed base', '--format=merged']
  else:
    raise AssertionError(case)
  wd = _summary_run(tmp / f'{case}_run', config)
  return (None, str(tmp / 'out')), {'workdir': wd, 'fmt': 'peft'}, frags


BAD_EXPORTS = ('dora', 'pissa', 'ia3', 'qlora', 'pruned')


@pytest.mark.parametrize('case', BAD_EXPORTS)
def test_refused_export_is_one_clear_error_and_writes_nothing(trained, tmp_path, case):
  args, kwargs, frags = _bad_export(case, tmp_path)
  before = _files(tmp_path, trained['workdir'])
  with pytest.raises(UserInputError) as e:
    export.run(*args, **kwargs)
  message = str(e.value)
  for f in frags:
    assert f in message, (f, message)
  assert '\n' not in message
  assert _files(tmp_path, trained['workdir']) == before and not (tmp_path / 'out').exists()


def test_cut_checkpoint_and_trained_base_leaves_are_refused():
  """A PEFT adapter names the whole published checkpoint and holds LoRA factors only."""
  from peftjax.models import lm_export
  model = _config().model
  model.pretrained, model.num_layers = '', 2  # the bundled 30-layer SmolLM2, cut to 2
  cut = dataclasses.replace(_small_cfg(True), num_layers=2)
  with pytest.raises(UserInputError) as e:
    lm_export._check_peft_model(model, cut, {}, '--workdir=run')
  assert str(e.value) == (
      "--workdir=run: model.num_layers=2 keeps 2 of the checkpoint's 30 layers; a PEFT adapter "
      'applies to the whole checkpoint and would give other logits there; valid: '
      '--format=merged (an exact LlamaForCausalLM of these 2 layers)')
  model.pretrained = 'random'  # a random base is the whole model at any depth
  lm_export._check_peft_model(model, _small_cfg(True), {}, '--workdir=run')
  with pytest.raises(UserInputError, match=r"trains base leaves \['norm/scale'\], which a PEFT"):
    lm_export._check_peft_model(model, _small_cfg(True), {'norm': {'scale': np.ones(3)}}, 'x')


def _bad_tree(case):
  cfg = _small_cfg(True)
  flat = tree_lib.flatten(_random_lora(cfg))
  if case == 'dora_leaf':
    flat['layers/attn/q_proj/magnitude'] = np.ones((3, 32), np.float32)
    frags = ["leaf 'layers/attn/q_proj/magnitude'", 'DoRA']
  elif case == 'unknown_site':
    flat['layers/attn_norm/lora_a'] = np.ones((3, 32, 4), np.float32)
    flat['layers/attn_norm/lora_b'] = np.ones((3, 4, 32), np.float32)
    frags = ["LoRA site 'layers/attn_norm' has no LlamaForCausalLM PEFT module",
             'layers/attn/{q,k,v,o}_proj']
  elif case == 'lm_head_on_tied':
    flat['lm_head/lora_a'] = np.ones((32, 4), np.float32)
    flat['lm_head/lora_b'] = np.ones((4, 96), np.float32)
    frags = ["'lm_head' on a model with tied embeddings", "output layer is 'embed'"]
  elif case == 'bad_shape':
    flat['layers/mlp/down_proj/lora_a'] = np.ones((3, 40, 4), np.float32)
    frags = ["LoRA site 'layers/mlp/down_proj'", 'model.layers.0.mlp.down_proj',
             'in 48, out 32']
  elif case == 'unstacked_axis':
    flat['layers/attn/k_proj/lora_a'] = np.ones((32, 4), np.float32)
    flat['layers/attn/k_proj/lora_b'] = np.ones((4, 16), np.float32)
    frags = ["LoRA site 'layers/attn/k_proj'", 'leading axis of the 3 layers']
  else:
    raise AssertionError(case)
  return tree_lib.unflatten(flat), cfg, frags


BAD_TREES = ('dora_leaf', 'unknown_site', 'lm_head_on_tied', 'bad_shape', 'unstacked_axis')


@pytest.mark.parametrize('case', BAD_TREES)
def test_tree_without_a_peft_form_is_refused_writing_nothing(tmp_path, case):
  lora, cfg, frags = _bad_tree(case)
  with pytest.raises(PeftFormatError) as e:
    peft_llama.save_peft_llama(tmp_path / 'out', lora, cfg, rank=4, alpha=8.0)
  message = str(e.value)
  for f in frags:
    assert f in message, (f, message)
  assert '\n' not in message and not (tmp_path / 'out').exists()
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- PEFT itself

# With torch, transformers and peft: loads base + adapter with PeftModel and saves the logits.
_PEFT_SCRIPT = r'''
import json, os, sys
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
torch.set_num_threads(1)
for job in json.loads(sys.argv[1]):
  data = np.load(job['inputs'])
  model = AutoModelForCausalLM.from_pretrained(job['base'], dtype=torch.float32).eval()
  model = PeftModel.from_pretrained(model, job['adapter']).eval()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(data['ids'], dtype=torch.long),
                attention_mask=torch.tensor(data['mask'], dtype=torch.long)).logits
  np.save(job['out'], out.float().numpy())
print('ok')
'''


def _hf_python():
  """$PEFTJAX_HF_PYTHON, or this interpreter, if it has torch, transformers and peft."""
  candidate = os.environ.get(HF_PYTHON_ENV)
  if not candidate:
    import importlib.util
    if not all(importlib.util.find_spec(m) for m in ('torch', 'transformers', 'peft')):
      return None
    candidate = sys.executable
  has = subprocess.run([candidate, '-c', 'import torch, transformers, peft'],
                       capture_output=True, check=False)
  return candidate if has.returncode == 0 else None


def test_peft_loads_the_exports_with_equal_logits(trained, tmp_path):
  python = _hf_python()
  if python is None:
    pytest.skip(f'no Python with torch, transformers and peft (set {HF_PYTHON_ENV})')
  jobs, expect = [], []
  setup = trained['setup']
  cfg = setup.built.module.cfg
  base = hf_llama.export_hf_dir(tmp_path / 'base', cfg.to_hf(),
                                hf_from_params(cfg, jax.device_get(trained['params']['base'])),
                                setup.task.tokenizer)
  np.savez(tmp_path / 'run.npz', ids=trained['ids'], mask=trained['mask'])
  jobs.append({'base': str(base), 'adapter': str(trained['dirs']['workdir']),
               'inputs': str(tmp_path / 'run.npz'), 'out': str(tmp_path / 'run.npy')})
  expect.append((trained['implicit'], trained['mask']))
  ids, mask = _small_inputs()
  np.savez(tmp_path / 'small.npz', ids=ids, mask=mask)
  for case, tied, _, rslora in HAND_CASES[:2]:  # PEFT runs unscanned torch models anyway
    cfg = _small_cfg(tied)
    params = _small_base(cfg)
    config, tensors, _ = _hand_built(cfg, params, rslora=rslora)
    d = _write_adapter(tmp_path / case, config, tensors)
    b = hf_llama.export_hf_dir(tmp_path / f'{case}_base', cfg.to_hf(), hf_from_params(cfg, params))
    trainable, info = peft_llama_import.load_peft_llama(d, cfg)
    ours = peft.apply(LlamaForCausalLM(cfg), peft_llama_import.lora_method(info),
                      peft_llama_import.with_tables(params, trainable['base']),
                      trainable['peft'],
                      {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask)})
    jobs.append({'base': str(b), 'adapter': str(d), 'inputs': str(tmp_path / 'small.npz'),
                 'out': str(tmp_path / f'{case}.npy')})
    expect.append((np.asarray(ours), mask))
  done = subprocess.run([python, '-c', _PEFT_SCRIPT, json.dumps(jobs)], capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  for job, (ours, m) in zip(jobs, expect):
    theirs = np.load(job['out'])
    valid = m.astype(bool)  # padded positions are masked differently; never read
    assert theirs.shape == ours.shape
    assert np.abs(theirs[valid] - ours[valid]).max() < HF_TOL, job['adapter']
