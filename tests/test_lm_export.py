"""A trained causal-LM run (configs/lm_tiny.py, a few LoRA or IA3 steps) exported as an HF
LlamaForCausalLM directory by ``python -m peftjax.export`` (``--workdir=<run>`` or
``--adapter=<run>/adapter.safetensors``): the directory re-imports with the logits of the run's
implicit (unmerged) forward, its config and tokenizer are the run's, and each bad input is one
clear error that writes nothing. With an interpreter holding torch and transformers
($PEFTJAX_HF_PYTHON) the trained export also loads in transformers with equal logits."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm_tiny
from peftjax import export
from peftjax import peft
from peftjax import run as run_lib
from peftjax import train
from peftjax.data.lm_tokenizer import LMTokenizer
from peftjax.errors import UserInputError
from peftjax.models import hf_llama
from peftjax.models.llama import LlamaConfig
from peftjax.models.llama import LlamaForCausalLM
from peftjax.models.llama_convert import params_from_hf

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOL = 1e-5  # merged vs implicit forward, float32
HF_TOL = 1e-4  # transformers vs our forward of the same export, float32
HF_PYTHON_ENV = 'PEFTJAX_HF_PYTHON'
METHODS = {'lora': 0, 'ia3': 1}  # method -> seed (two random bases, so they can be told apart)
TEXTS = ['A tedious, overlong mess with no redeeming qualities.',
         'Warm, funny and sharp: the best film of the year.']


def _config(method: str, seed: int):
  c = lm_tiny.get_config()
  c.peft.method = method
  c.seed = seed
  c.data.name = 'hamlet_text'  # perplexity only: no generation to compile, export is the point
  c.data.max_length = 32  # small batches: the 49,152-token vocabulary dominates every step
  c.data.max_eval_examples = 4
  c.train.batch_size = 2
  c.train.eval_batch_size = 4
  c.train.steps = 3
  c.train.eval_before = False
  c.train.eval_every = 0
  c.train.checkpoint_every = 3
  c.train.save_adapter = True
  c.optim.warmup_steps = 1
  c.optim.learning_rate = 3e-2  # a few steps that move the model well away from its base
  return c


def _cli(*flags) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'peftjax.export', *map(str, flags)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


def _files(*roots) -> dict:
  """Every file under ``roots``: path -> (size, mtime), to show nothing was written."""
  out = {}
  for root in roots:
    for p in pathlib.Path(root).rglob('*'):
      st = p.stat()
      out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else 'dir'
  return out


def _batch(tokenizer):
  """TEXTS as one right-padded batch (ids, 0/1 mask)."""
  ids = tokenizer.encode_batch(TEXTS)
  n = max(map(len, ids))
  mask = np.array([[1] * len(i) + [0] * (n - len(i)) for i in ids], np.int32)
  padded = np.array([i + [0] * (n - len(i)) for i in ids], np.int32)
  return padded, mask


def _reload_logits(out, ids, mask):
  """Logits of an exported directory read back by our importer."""
  config, state = hf_llama.load_hf_dir(out)
  cfg = LlamaConfig.from_hf(config)
  params = params_from_hf(cfg, state)
  return np.asarray(LlamaForCausalLM(cfg).apply({'params': params}, jnp.asarray(ids),
                                                attention_mask=jnp.asarray(mask)))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """method -> dict(workdir, setup, params, ids, mask, implicit logits, base logits) of a
  finished lm_tiny run."""
  root = tmp_path_factory.mktemp('lm_runs')
  out = {}
  for method, seed in METHODS.items():
    config = _config(method, seed)
    workdir = root / method
    train.train_and_evaluate(config, str(workdir))
    setup, params = run_lib.restore_trained(config, str(workdir))
    ids, mask = _batch(setup.task.tokenizer)
    inputs = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(mask)}
    implicit = peft.apply(setup.built.module, setup.method, params['base'], params['peft'],
                          inputs)
    base = setup.built.module.apply({'params': params['base']}, **inputs)
    out[method] = dict(workdir=workdir, setup=setup, ids=ids, mask=mask,
                       implicit=np.asarray(implicit), base=np.asarray(base))
  yield out
  shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope='module')
def exported(runs, tmp_path_factory):
  """(method, 'workdir' | 'adapter') -> exported directory. LoRA's --workdir export goes
  through the command line users run; the others through export.run."""
  root = tmp_path_factory.mktemp('lm_exports')
  dirs = {}
  done = _cli(f'--workdir={runs["lora"]["workdir"]}', '--format=merged',
              f'--out={root / "lora_workdir"}')
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == (
      f'exported {runs["lora"]["workdir"]} (merged) -> {root / "lora_workdir"}')
  dirs['lora', 'workdir'] = root / 'lora_workdir'
  for method, run in runs.items():
    dirs[method, 'adapter'] = export.run(str(run['workdir'] / 'adapter.safetensors'),
                                         str(root / f'{method}_adapter'))
    if method != 'lora':
      dirs[method, 'workdir'] = export.run(None, str(root / f'{method}_workdir'),
                                           workdir=str(run['workdir']))
  yield dirs
  shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize('method', sorted(METHODS))
@pytest.mark.parametrize('source', ['workdir', 'adapter'])
def test_export_reloads_with_the_logits_of_the_trained_run(runs, exported, method, source):
  run = runs[method]
  # The trained method changed the model, so an export that dropped it would fail below.
  assert np.abs(run['implicit'] - run['base']).max() > 1e-2
  got = _reload_logits(exported[method, source], run['ids'], run['mask'])
  assert got.shape == run['implicit'].shape == (2, run['ids'].shape[1], 49152)
  np.testing.assert_allclose(got, run['implicit'], rtol=0, atol=TOL)


@pytest.mark.parametrize('method', sorted(METHODS))
def test_workdir_and_adapter_exports_hold_the_same_weights(exported, method):
  _, a = hf_llama.load_hf_dir(exported[method, 'workdir'])
  _, b = hf_llama.load_hf_dir(exported[method, 'adapter'])
  assert sorted(a) == sorted(b) and len(a) == 2 + 2 * 9  # embedding, norm, 9 per layer
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize('method', sorted(METHODS))
def test_config_json_is_the_runs_architecture(runs, exported, method):
  cfg = runs[method]['setup'].built.module.cfg
  tok = runs[method]['setup'].task.tokenizer
  for source in ('workdir', 'adapter'):
    got = json.loads((exported[method, source] / 'config.json').read_text())
    assert got == {**cfg.to_hf(), 'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id,
                   'pad_token_id': tok.pad_id}
    assert (got['architectures'], got['model_type']) == (['LlamaForCausalLM'], 'llama')
    assert (got['vocab_size'], got['hidden_size'], got['intermediate_size'],
            got['num_hidden_layers'], got['num_attention_heads'], got['num_key_value_heads'],
            got['head_dim'], got['tie_word_embeddings'], got['rope_theta'],
            got['max_position_embeddings']) == (49152, 64, 128, 2, 4, 2, 16, True, 10000.0, 2048)
    generation = json.loads((exported[method, source] / 'generation_config.json').read_text())
    assert generation == {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id,
                          'pad_token_id': tok.pad_id, 'do_sample': False}


def test_tokenizer_round_trips(runs, exported):
  tok = runs['lora']['setup'].task.tokenizer
  messages = [{'role': 'user', 'content': TEXTS[0]}]
  for key in (('lora', 'workdir'), ('ia3', 'adapter')):
    d = exported[key]
    assert sorted(p.name for p in d.iterdir()) == [
        'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json',
        'tokenizer_config.json']
    again = LMTokenizer.from_hf_dir(d)
    assert again.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert again.encode_batch(TEXTS)[0][:3] and again.vocab_size == tok.vocab_size == 49152
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    for gen in (False, True):
      assert (again.apply_chat_template(messages, add_generation_prompt=gen) ==
              tok.apply_chat_template(messages, add_generation_prompt=gen))


def test_overwrite_replaces_a_non_empty_directory(runs, tmp_path):
  out = tmp_path / 'hf'
  out.mkdir()
  (out / 'old.txt').write_text('an earlier export')
  export.run(str(runs['ia3']['workdir'] / 'adapter.safetensors'), str(out), overwrite=True)
  assert not (out / 'old.txt').exists() and (out / 'model.safetensors').is_file()
  np.testing.assert_allclose(_reload_logits(out, runs['ia3']['ids'], runs['ia3']['mask']),
                             runs['ia3']['implicit'], rtol=0, atol=TOL)


def _summary_run(path: pathlib.Path, config) -> str:
  """A directory holding only a finished run's summary.json with ``config``."""
  path.mkdir()
  (path / 'summary.json').write_text(json.dumps({'config': config.to_dict()}))
  return str(path)


def _bad(case: str, runs, tmp: pathlib.Path):
  """(export.run args, kwargs, message fragments) of a bad input."""
  lora_wd, ia3_wd = runs['lora']['workdir'], runs['ia3']['workdir']
  lora_ad = str(lora_wd / 'adapter.safetensors')
  out = str(tmp / 'hf')
  if case == 'non_empty_out':
    (tmp / 'hf').mkdir()
    (tmp / 'hf' / 'notes.txt').write_text('keep me')
    return (lora_ad, out), {}, [f"--out='{out}'", 'exists and is not empty', '--overwrite']
  if case == 'missing_workdir':
    return (None, out), {'workdir': str(tmp / 'nope')}, [
        f"--workdir='{tmp / 'nope'}' does not exist", 'finished causal-LM run']
  if case == 'missing_adapter':
    return (str(tmp / 'nope.safetensors'), out), {}, [
        f"--adapter='{tmp / 'nope.safetensors'}' does not exist", '--workdir=']
  if case == 'unfinished_run':
    (tmp / 'run').mkdir()
    return (None, out), {'workdir': str(tmp / 'run')}, ['has no summary.json',
                                                        'not a finished run']
  if case == 'encoder_workdir':
    from configs import tiny
    wd = _summary_run(tmp / 'bert_run', tiny.get_config())
    return (None, out), {'workdir': wd}, [
        "task='classification', model.name='bert'", "--workdir exports causal-LM runs",
        '--adapter=<run>/adapter.safetensors']
  if case == 'adapter_and_workdir':
    return (lora_ad, out), {'workdir': str(lora_wd)}, ['are both given', 'one of them']
  if case == 'adapter_of_another_base':
    alone = tmp / 'ia3_adapter.safetensors'  # away from its run: the seed of its base is lost
    shutil.copy(ia3_wd / 'adapter.safetensors', alone)
    return (str(alone), out), {}, ['was trained on base', 'refusing to load it on another base',
                                   'seed 0', '--workdir=<run dir>']
  if case == 'peft_format_adapter':  # LoRA runs export as PEFT (tests/test_lm_peft_format.py)
    return (str(ia3_wd / 'adapter.safetensors'), out), {'fmt': 'peft'}, [
        '--format=peft writes plain LoRA adapters', "its method 'ia3'", '--format=merged']
  if case == 'peft_format_workdir':
    return (None, out), {'workdir': str(ia3_wd), 'fmt': 'peft'}, [
        '--format=peft writes plain LoRA adapters', "its method 'ia3'", '--format=merged']
  if case == 'base_with_workdir':
    return (None, out), {'workdir': str(lora_wd), 'base': str(ia3_wd)}, [
        '--base=', 'is for --adapter']
  if case == 'unmergeable_method':
    config = lm_tiny.get_config()
    config.peft.method = 'prefix'
    wd = _summary_run(tmp / 'prefix_run', config)
    return (None, out), {'workdir': wd}, ["method 'prefix' cannot be merged",
                                          'no LlamaForCausalLM form', "'lora'"]
  raise AssertionError(case)


BAD = ('non_empty_out', 'missing_workdir', 'missing_adapter', 'unfinished_run',
       'encoder_workdir', 'adapter_and_workdir', 'adapter_of_another_base',
       'peft_format_adapter', 'peft_format_workdir', 'base_with_workdir', 'unmergeable_method')


@pytest.mark.parametrize('case', BAD)
def test_bad_input_is_one_clear_error_and_writes_nothing(runs, tmp_path, case):
  args, kwargs, fragments = _bad(case, runs, tmp_path)
  before = _files(tmp_path, runs['lora']['workdir'], runs['ia3']['workdir'])
  with pytest.raises(UserInputError) as e:
    export.run(*args, **kwargs)
  message = str(e.value)
  for f in fragments:
    assert f in message, (f, message)
  assert '\n' not in message
  assert _files(tmp_path, runs['lora']['workdir'], runs['ia3']['workdir']) == before
  if case != 'non_empty_out':
    assert not (tmp_path / 'hf').exists()


def test_cli_refuses_a_non_empty_out_in_one_line(runs, tmp_path):
  out = tmp_path / 'hf'
  out.mkdir()
  (out / 'notes.txt').write_text('keep me')
  before = _files(tmp_path)
  done = _cli(f'--workdir={runs["lora"]["workdir"]}', f'--out={out}')
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
  lines = [l for l in done.stderr.splitlines() if l.strip()]
  assert lines == [f"error: --out='{out}': output directory exists and is not empty; pass "
                   '--overwrite to replace it, or choose a new directory']
  assert _files(tmp_path) == before


# A Python with torch + transformers: loads an export and prints its logits for the given ids
# and the ids its tokenizer gives the given texts.
_HF_SCRIPT = r'''
import json, os, sys
os.environ.setdefault('HF_HUB_OFFLINE', '1')
import numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
torch.set_num_threads(1)
export_dir, inputs, logits_out = sys.argv[1:4]
data = np.load(inputs)
model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(export_dir)
with torch.no_grad():
  out = model(input_ids=torch.tensor(data['ids'], dtype=torch.long),
              attention_mask=torch.tensor(data['mask'], dtype=torch.long)).logits
np.save(logits_out, out.float().numpy())
texts = json.loads(str(data['texts']))
print(json.dumps({'architecture': type(model).__name__,
                  'ids': [tok.encode(t, add_special_tokens=False) for t in texts]}))
'''


def _hf_python():
  """$PEFTJAX_HF_PYTHON, or this interpreter if it has torch and transformers."""
  candidate = os.environ.get(HF_PYTHON_ENV)
  if candidate:
    return candidate
  import importlib.util
  if importlib.util.find_spec('torch') and importlib.util.find_spec('transformers'):
    return sys.executable
  return None


@pytest.mark.parametrize('method', sorted(METHODS))
def test_trained_export_loads_in_transformers_with_equal_logits(runs, exported, method,
                                                                tmp_path):
  python = _hf_python()
  if python is None:
    pytest.skip(f'torch is absent (set {HF_PYTHON_ENV} to a Python with torch and transformers)')
  run = runs[method]
  inputs = tmp_path / 'inputs.npz'
  np.savez(inputs, ids=run['ids'], mask=run['mask'], texts=json.dumps(TEXTS))
  logits = tmp_path / 'logits.npy'
  done = subprocess.run([python, '-c', _HF_SCRIPT, str(exported[method, 'workdir']),
                         str(inputs), str(logits)], capture_output=True, text=True,
                        timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['architecture'] == 'LlamaForCausalLM'
  assert result['ids'] == run['setup'].task.tokenizer.encode_batch(TEXTS)
  theirs = np.load(logits)
  valid = run['mask'].astype(bool)  # padded positions are masked differently; never read
  assert theirs.shape == run['implicit'].shape
  assert np.abs(theirs[valid] - run['implicit'][valid]).max() < HF_TOL
