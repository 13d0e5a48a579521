"""Many LM adapters generating at once (peftjax/serving/lm_library.py) on configs/lm_tiny.py's
random 2-layer Llama: a mixed batch over LoRA of two ranks (one on the tied embedding, one
rsLoRA on the MLP), IA3, prompt and prefix tuning and the base gives every row exactly the
tokens (greedy) of its adapter alone through generation.method_step / method_cache, and its
full-forward logits; a hot swap (another rank, another prefix length) and another mix of slots
compile nothing, new layers do; refusals (rank over max_rank, another base, an unknown name, an
unservable method, another model shape) change nothing; adapter files of a trained run through
the library and through `python -m peftjax.generate --adapter ... --input`."""
import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm_tiny
from peftjax import delta
from peftjax import generation
from peftjax import peft
from peftjax import train
from peftjax import tree as tree_lib
from peftjax.generate import GenerateError
from peftjax.generate import run as generate_run
from peftjax.models.lm_build import build_lm
from peftjax.models.llama import init_cache
from peftjax.serving import lm_files
from peftjax.serving.adapter import AdapterError
from peftjax.serving.lm_library import LMAdapterLibrary

ROOT = pathlib.Path(__file__).resolve().parent.parent
NEW = 5  # new tokens per request
# name -> peft overrides on configs/lm_tiny.py ('section.field': value)
ADAPTERS = {
    'lora4': {'lora.rank': 4, 'lora.alpha': 8.0,
              'lora.targets': r'attn/(q|k|v|o)_proj/kernel$|embed/embedding$'},
    'rslora8': {'lora.rank': 8, 'lora.alpha': 4.0, 'lora.rslora': True,
                'lora.targets': r'(attn/(q|v)_proj|mlp/(gate|up|down)_proj)/kernel$'},
    'ia3': {'method': 'ia3'},
    'prompt': {'method': 'prompt', 'prompt.length': 5},
    'prefix': {'method': 'prefix', 'prefix.length': 3, 'prefix.hidden': 16},
}
# Replacements of the same kinds (hot swaps): another rank, another prefix length.
SWAPS = {
    'lora4': {**ADAPTERS['lora4'], 'lora.rank': 2},
    'prompt': {'method': 'prompt', 'prompt.length': 7},
}
ROWS = ['lora4', 'rslora8', 'ia3', 'prompt', 'prefix', 'base'] * 2


def _config(overrides: dict, seed: int = 0):
  c = lm_tiny.get_config()
  c.seed = seed
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    section = c.peft
    for p in parents:
      section = section[p]
    section[leaf] = value
  return c


@pytest.fixture(scope='module')
def plain():
  """configs/lm_tiny.py's base (seed 0): what its runs train on."""
  built, tokenizer = build_lm(lm_tiny.get_config().model, seed=0)
  return built.module, built.params, tokenizer


@pytest.fixture(scope='module')
def base(plain):
  """The tiny base with its layer kernels x6: at the random init's scale the residual stream
  keeps the input token's embedding, the tied output layer reads it back, and every adapter
  would continue a prompt with the same token; here the layers (and so the adapters) decide."""
  module, params, tokenizer = plain
  flat = tree_lib.flatten(params)
  flat = {k: v * 6.0 if k.startswith('layers/') and k.endswith('/kernel') else v
          for k, v in flat.items()}
  return module, tree_lib.unflatten(flat), tokenizer


def _adapter(base, overrides: dict, seed: int):
  """A method and its parameters moved well off their initialisation (every leaf; IA3's
  scales by 0.3), as a few training steps would."""
  module, params, _ = base
  method = peft.build(_config(overrides).peft)
  p = method.init(jax.random.key(seed), module, params, {'input_ids': jnp.ones((1, 8),
                                                                                 jnp.int32)})
  rng = np.random.default_rng(100 + seed)
  noise = 0.3 if method.name == 'ia3' else 0.1
  return method, jax.tree.map(
      lambda x: np.asarray(x) + noise * rng.standard_normal(x.shape, np.float32), p)


@pytest.fixture(scope='module')
def adapters(base):
  made = {n: _adapter(base, o, i) for i, (n, o) in enumerate(ADAPTERS.items())}
  made.update({f'{n}_swap': _adapter(base, o, 10 + i) for i, (n, o) in enumerate(SWAPS.items())})
  return made


def _library(base, adapters, **kwargs) -> LMAdapterLibrary:
  module, params, _ = base
  lib = LMAdapterLibrary(module, params, max_rank=8, **kwargs)
  for name in ADAPTERS:
    lib.add_method(name, *adapters[name])
  return lib


@pytest.fixture(scope='module')
def lib(base, adapters):
  return _library(base, adapters)


@pytest.fixture(scope='module')
def prompts():
  """Right-padded random prompts of 2..8 tokens (one length bucket), one per row of ROWS."""
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 9, len(ROWS)).astype(np.int32)
  ids = np.zeros((len(ROWS), 8), np.int32)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(1, 49152, n)
  return ids, lengths


def _alone_fns(base, method_and_params):
  """``(step, make_cache)`` of one adapter alone, as a run generates with it:
  generation.method_step / method_cache (the plain model for the base)."""
  module, params, _ = base
  make = functools.partial(init_cache, module.cfg)
  if method_and_params is None:
    return generation.model_step(module, params), make
  method, p = method_and_params
  return (generation.method_step(module, method, params, p),
          generation.method_cache(make, module, method, params, p))


@pytest.fixture(scope='module')
def alone():
  """``alone(base, key, method_and_params, ids, length)``: the greedy tokens of one prompt
  through one adapter alone (batch 1); ``key`` names the (base, adapter) pair, memoized."""
  fns, outs = {}, {}

  def run(base, key, method_and_params, ids, length):
    if key not in fns:
      fns[key] = _alone_fns(base, method_and_params)
    at = (key, tuple(np.asarray(ids[:length]).tolist()))
    if at not in outs:
      step, make = fns[key]
      outs[at] = generation.generate(step, make, ids[None, :length], np.array([length]),
                                     max_new_tokens=NEW).ids[0].tolist()
    return outs[at]
  return run


def _stacks(lib):
  return jax.tree.map(np.asarray, lib.stacks)


def _same_state(lib, before):
  names, slots, layout, stacks = before
  assert lib.names == names and lib.slots == slots and lib.layout == layout
  jax.tree.map(np.testing.assert_array_equal, _stacks(lib), stacks)


def _state(lib):
  return list(lib.names), lib.slots, lib.layout, _stacks(lib)


# ------------------------------------------------------------------------------ equality


def test_mixed_batch_is_each_adapter_alone(base, adapters, lib, prompts, alone):
  ids, lengths = prompts
  out = lib.generate(ids, lengths, ROWS, max_new_tokens=NEW)
  assert out.ids.shape == (len(ROWS), NEW) and list(out.lengths) == [NEW] * len(ROWS)
  for i, name in enumerate(ROWS):
    want = alone(base, name, adapters.get(name), ids[i], lengths[i])
    assert out.ids[i].tolist() == want, (i, name)
  # One prompt through every adapter: six different continuations (each adapter changes the
  # model), so the equality above tells the adapters apart.
  same = np.repeat(ids[:1], 6, axis=0)
  one = lib.generate(same, np.repeat(lengths[:1], 6), ROWS[:6], max_new_tokens=NEW)
  assert len({tuple(r) for r in one.ids.tolist()}) == 6
  assert lib.layout.rank == 8 and lib.layout.prefix == 8 and lib.slots == 8
  assert lib.stacks['prefix']['length'].tolist()[:6] == [0, 0, 0, 0, 5, 3]


def test_mixed_logits_equal_each_method_forward(base, adapters, lib, prompts):
  module, params, _ = base
  ids, lengths = prompts
  mask = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int32)
  got = np.asarray(lib.logits(ids, ROWS, attention_mask=mask))
  for i, name in enumerate(ROWS[:6]):
    row = jnp.asarray(ids[i:i + 1, :lengths[i]])
    if name == 'base':
      want = jax.jit(module.apply)({'params': params}, row)
    else:
      method, p = adapters[name]
      want = jax.jit(lambda p, x, m=method: peft.apply(module, m, params, p,
                                                       {'input_ids': x}))(p, row)
    np.testing.assert_allclose(got[i, :lengths[i]], np.asarray(want[0]), atol=5e-5, rtol=0)
  assert not np.allclose(got[0, :lengths[0]], got[5, :lengths[0]], atol=1e-3)  # lora4 != base


# ------------------------------------------------------------------------------ refusals


def test_refusals_change_nothing(base, adapters, lib, prompts, tmp_path):
  module, params, _ = base
  before = _state(lib)
  with pytest.raises(AdapterError, match=r'LoRA rank 16 .* exceeds the library max_rank=8'):
    lib.add_method('big', *_adapter(base, {'lora.rank': 16}, 30))
  with pytest.raises(AdapterError, match=r"method 'dora' cannot be served .*magnitude"):
    lib.add_method('dora', *_adapter(base, {'method': 'dora'}, 31))
  with pytest.raises(AdapterError, match=r"adapter name 'base' is invalid"):
    lib.add_method('base', *adapters['ia3'])
  ids, lengths = prompts
  with pytest.raises(AdapterError, match=r"adapter 'nope' is not in the library; valid: "
                                         r"'base', 'lora4', 'rslora8'"):
    lib.generate(ids[:2], lengths[:2], ['lora4', 'nope'], max_new_tokens=NEW)
  with pytest.raises(AdapterError, match=r'share_prefix=True is invalid for a library batch'):
    lib.generate(ids[:2], lengths[:2], ['lora4', 'base'], max_new_tokens=NEW, share_prefix=True)
  # Another model shape: the tiny model at width 32.
  small = _config({})
  small.model.llama.hidden_size, small.model.llama.head_dim = 32, 8
  other, _ = build_lm(small.model, seed=0)
  method = peft.build(_config({'lora.rank': 4}).peft)
  wrong = method.init(jax.random.key(0), other.module, other.params,
                      {'input_ids': jnp.ones((1, 8), jnp.int32)})
  with pytest.raises(AdapterError, match=r'another model shape'):
    lib.add_method('small', method, wrong)
  with pytest.raises(AdapterError, match=r'another model shape'):
    lib.add_method('small_prompt', *_adapter((other.module, other.params, None),
                                             {'method': 'prompt', 'prompt.length': 2}, 32))
  # An adapter file of another base (the same architecture, seed 1): both hashes named.
  c = _config(ADAPTERS['lora4'], seed=1)
  other1, _ = build_lm(c.model, seed=1)
  path = tmp_path / 'other.safetensors'
  delta.save_delta(path, {'base': {}, 'peft': adapters['lora4'][1]}, base_params=other1.params,
                   method='lora', peft_config=c.peft, model_config=c.model)
  want = delta.read_manifest(path)['base']['sha256'][:16]
  with pytest.raises(delta.DeltaError, match=rf"trained on base {want}.*this library's base is "
                                             rf'{lib.base_hash()[:16]}'):
    lib.load('other', path)
  _same_state(lib, before)
  assert lib.base_hash() == delta.base_hash(jax.device_get(params))
  # A fixed prefix length and slot count are limits, not grown.
  small = LMAdapterLibrary(module, params, max_rank=8, max_prefix=4, slots=2)
  with pytest.raises(AdapterError, match=r'its prefix has 5 positions, over the library '
                                         r'max_prefix=4'):
    small.add_method('prompt', *adapters['prompt'])
  small.add_method('ia3', *adapters['ia3'])
  before = _state(small)
  with pytest.raises(AdapterError, match=r"slots=2 \(one is the base\), all in use by \['ia3'\]"):
    small.add_method('lora4', *adapters['lora4'])
  _same_state(small, before)


# ------------------------------------------------------------------------------ compiles
# (after the tests that need the library as built: this one swaps and removes adapters)


def test_hot_swap_and_another_mix_compile_nothing(base, adapters, lib, prompts, alone):
  ids, lengths = prompts
  first = lib.generate(ids, lengths, ROWS, max_new_tokens=NEW)  # compiled (or cached) here
  before = generation.compile_count()
  for name in SWAPS:  # LoRA rank 4 -> 2 (padded to 8 either way), prompt of 5 -> 7 tokens
    lib.add_method(name, *adapters[f'{name}_swap'])
  swapped = lib.generate(ids, lengths, ROWS, max_new_tokens=NEW)
  mix = ROWS[::-1]
  mixed = lib.generate(ids, lengths, mix, max_new_tokens=NEW)
  lib.remove('ia3')  # its slot serves the base again; the shapes stay
  no_ia3 = [r if r != 'ia3' else 'base' for r in ROWS]
  removed = lib.generate(ids, lengths, no_ia3, max_new_tokens=NEW)
  assert generation.compile_count() == before
  for i, name in enumerate(ROWS):
    if name in SWAPS:
      want = alone(base, f'{name}_swap', adapters[f'{name}_swap'], ids[i], lengths[i])
      assert swapped.ids[i].tolist() == want != first.ids[i].tolist(), (i, name)
    else:
      assert swapped.ids[i].tolist() == first.ids[i].tolist(), (i, name)
  for i, name in enumerate(mix):
    key = f'{name}_swap' if name in SWAPS else name
    assert mixed.ids[i].tolist() == alone(base, key, adapters.get(key), ids[i], lengths[i]), (
        i, name)
  for i, name in enumerate(no_ia3):
    assert removed.ids[i].tolist() == (swapped.ids[i].tolist() if ROWS[i] != 'ia3' else
                                       alone(base, 'base', None, ids[i], lengths[i])), (i, name)
  # An adapter on layers no slot had is a new layout: one new program (the counter counts).
  lib.add_method('ia3_q', *_adapter(base, {'method': 'ia3', 'ia3.targets': r'attn/q_proj$',
                                           'ia3.ffn_targets': ''}, 20))
  before = generation.compile_count()
  lib.generate(ids, lengths, no_ia3[:-1] + ['ia3_q'], max_new_tokens=NEW)
  assert generation.compile_count() == before + 1


def test_hf_peft_adapter_serves_as_its_lora(base, adapters, prompts, alone, tmp_path):
  """An HF PEFT LoRA adapter of a LlamaForCausalLM (the tied embedding too) joins a library
  through serving.hf.load_peft and generates as the adapter it was written from."""
  from peftjax.hf import save_peft_llama
  from peftjax.serving import hf
  module, params, _ = base
  method, p = adapters['lora4']
  save_peft_llama(tmp_path / 'peft', p, module.cfg, rank=4, alpha=8.0)
  lib = LMAdapterLibrary(module, params, max_rank=4)
  hf.load_peft(lib, 'peft', tmp_path / 'peft')
  assert lib['peft'].manifest['format'] == 'hf-peft'
  assert sorted(lib['peft'].lora) == ['embed', 'layers/attn/k_proj', 'layers/attn/o_proj',
                                      'layers/attn/q_proj', 'layers/attn/v_proj']
  ids, lengths = prompts
  out = lib.generate(ids[:2], lengths[:2], ['peft', 'base'], max_new_tokens=NEW)
  assert out.ids[0].tolist() == alone(base, 'lora4', adapters['lora4'], ids[0], lengths[0])
  assert out.ids[1].tolist() == alone(base, 'base', None, ids[1], lengths[1])


# ------------------------------------------------------------------------------ files and CLI


@pytest.fixture(scope='module')
def files(plain, adapters, tmp_path_factory):
  """A trained lm_tiny LoRA run's adapter file (train.save_adapter=True; one step) and a
  prefix-tuning adapter written as training writes it (delta.save_delta with the config's
  peft and model sections), both on the lm_tiny base of seed 0."""
  root = tmp_path_factory.mktemp('lm_serving')
  c = _config({'lora.rank': 4})
  c.data.name, c.data.max_length, c.data.max_eval_examples = 'hamlet_text', 32, 2
  c.train.steps, c.train.batch_size, c.train.eval_batch_size = 1, 2, 2
  c.train.eval_before, c.train.eval_every, c.train.checkpoint_every = False, 0, 1
  c.train.save_adapter, c.optim.warmup_steps, c.optim.learning_rate = True, 0, 3e-2
  train.train_and_evaluate(c, str(root / 'lora'))
  _, params, _ = plain
  p = _config(ADAPTERS['prefix'])
  prefix_path = root / 'prefix.safetensors'
  delta.save_delta(prefix_path, {'base': {}, 'peft': adapters['prefix'][1]}, base_params=params,
                   method='prefix', peft_config=p.peft, model_config=p.model,
                   base_source='random')
  return {'a': str(root / 'lora' / 'adapter.safetensors'), 'b': str(prefix_path)}, root


@pytest.fixture(scope='module')
def file_lib(files):
  return lm_files.library_from_files(files[0])


def test_library_from_trained_files(plain, files, file_lib, prompts, alone):
  paths, _ = files
  lib, tokenizer = file_lib
  assert lib.names == ['a', 'b'] and lib.max_rank == 4 and lib.layout.prefix == 4
  ids, lengths = prompts
  rows = ['a', 'b', 'base', 'a']
  out = lib.generate(ids[:4], lengths[:4], rows, max_new_tokens=NEW)
  for i, name in enumerate(rows):
    ad = None if name == 'base' else (lib[name].method_obj, lib[name].peft_params)
    assert out.ids[i].tolist() == alone(plain, ('plain', name), ad, ids[i], lengths[i]), (i,
                                                                                       name)
  trainable, _ = delta.load_delta(paths['a'])
  jax.tree.map(np.testing.assert_array_equal, lib['a'].peft_params, trainable['peft'])
  assert tokenizer.vocab_size == 49152


def test_generate_cli_with_two_adapter_files(plain, files, file_lib, alone):
  paths, root = files
  _, _, tokenizer = plain
  texts = ['To be or not', 'The king is dead', 'Good night, sweet prince', 'O Romeo']
  names = ['a', 'b', 'base', 'b']
  records = [{'prompt': t, 'adapter': n, 'id': i} for i, (t, n) in enumerate(zip(texts, names))]
  req = root / 'requests.jsonl'
  req.write_text(''.join(json.dumps(r) + '\n' for r in records))
  out = root / 'out.jsonl'
  done = subprocess.run([sys.executable, '-m', 'peftjax.generate', f'--adapter=a={paths["a"]}',
                         f'--adapter=b={paths["b"]}', f'--input={req}', f'--output={out}',
                         '--nochat', f'--max_new_tokens={NEW}'], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  lines = [json.loads(x) for x in out.read_text().splitlines()]
  assert [(r['line'], r['id'], r['adapter']) for r in lines] == [
      (i + 1, i, n) for i, n in enumerate(names)]
  lib, _ = file_lib
  for r, text in zip(lines, texts):
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=True), np.int32)
    ad = None if r['adapter'] == 'base' else (lib[r['adapter']].method_obj,
                                              lib[r['adapter']].peft_params)
    want = alone(plain, ('plain', r['adapter']), ad, ids, len(ids))
    assert r['completion'] == tokenizer.decode(want) and r['completion_tokens'] == NEW, r
    assert r['prompt_tokens'] == len(ids) and r['finish_reason'] == 'length'


def test_generate_cli_streams_a_prompt_through_one_adapter(plain, files, file_lib, alone):
  import io
  paths, _ = files
  _, _, tokenizer = plain
  shown = io.StringIO()
  rec = generate_run(prompt='To be or not', adapters=[f'b={paths["b"]}'], chat=False,
                     max_new_tokens=NEW, out=shown)
  ids = np.asarray(tokenizer.encode('To be or not', add_special_tokens=True), np.int32)
  lib, _ = file_lib
  want = alone(plain, ('plain', 'b'), (lib['b'].method_obj, lib['b'].peft_params), ids,
               len(ids))
  assert rec['completion'] == tokenizer.decode(want) == shown.getvalue()[:-1]
  assert rec['completion_tokens'] == NEW


def test_generate_cli_refusals_write_nothing(files, tmp_path):
  paths, _ = files
  req = tmp_path / 'requests.jsonl'
  out = tmp_path / 'out.jsonl'
  run = functools.partial(generate_run, input_path=str(req), output_path=str(out),
                          chat=False, max_new_tokens=2)
  req.write_text('{"prompt": "hi", "adapter": "a"}\n{"prompt": "ho", "adapter": "c"}\n')
  with pytest.raises(GenerateError, match=r"requests.jsonl:2: unknown \"adapter\" 'c'; valid: "
                                          r"'base', 'a', 'b'"):
    run(adapters=[f'a={paths["a"]}', f'b={paths["b"]}'])
  with pytest.raises(GenerateError, match=r'no --adapter is given'):
    run()
  req.write_text('{"prompt": "hi"}\n')
  with pytest.raises(GenerateError, match=r'has no "adapter"; with several --adapter flags'):
    run(adapters=[f'a={paths["a"]}', f'b={paths["b"]}'])
  with pytest.raises(GenerateError, match=r"'base' names the base model"):
    run(adapters=[f'base={paths["a"]}'])
  with pytest.raises(GenerateError, match=r'--workdir=.* and --adapter are both given'):
    run(adapters=[f'a={paths["a"]}'], workdir=str(tmp_path))
  assert not out.exists()
