"""Generation: sampling rules, jitted prefill + KV-cache decode, streaming, the CLI.

The decoder is checked on a tiny stand-in LM defined here (one attention layer with a fixed-shape
cache that follows the model's cache contract) against references computed with full forwards
(no cache), one token at a time.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from peftjax import generation
from peftjax.generation import SamplingConfig
from peftjax.generation import SamplingError

VOCAB = 13


class TinyLM(nn.Module):
  """One-layer causal LM. With ``cache`` ({'k', 'v'}: (B, S, D)) the new keys/values are
  written at ``positions`` and a query at position p attends slots 0..p of its row."""
  vocab: int = VOCAB
  dim: int = 16

  @nn.compact
  def __call__(self, input_ids, positions=None, cache=None):
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    init = nn.initializers.normal(1.0)
    x = nn.Embed(self.vocab, self.dim, embedding_init=init)(input_ids)
    x = x + nn.Embed(64, self.dim, embedding_init=init, name='pos')(positions)
    q, k, v = (nn.Dense(self.dim, name=n)(x) for n in 'qkv')
    if cache is None:
      keys, values, k_pos = k, v, positions
    else:
      rows = jnp.arange(b)[:, None]
      keys = cache['k'].at[rows, positions].set(k)
      values = cache['v'].at[rows, positions].set(v)
      k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), (b, keys.shape[1]))
    mask = k_pos[:, None, :] <= positions[:, :, None]
    scores = jnp.einsum('btd,bsd->bts', q, keys) / np.sqrt(self.dim)
    att = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1)
    h = x + jnp.einsum('bts,bsd->btd', att, values)
    h = h + nn.Dense(self.dim)(nn.gelu(nn.Dense(2 * self.dim)(h)))
    logits = nn.Dense(self.vocab, name='head')(h) * 3.0
    if cache is None:
      return logits
    return logits, {'k': keys, 'v': values}


def make_cache(batch, max_len, dim=16):
  return {'k': jnp.zeros((batch, max_len, dim)), 'v': jnp.zeros((batch, max_len, dim))}


@pytest.fixture(scope='module')
def lm():
  model = TinyLM()
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  return model, params


def greedy_reference(model, params, prompt, n):
  """Argmax decoding by full forwards over the whole sequence at every step (no cache)."""
  seq = list(prompt)
  out = []
  for _ in range(n):
    logits = model.apply({'params': params}, jnp.asarray([seq], jnp.int32))
    tok = int(jnp.argmax(logits[0, -1]))
    out.append(tok)
    seq.append(tok)
  return out


PROMPTS = [[3, 5, 7, 1, 2], [4], [9, 9, 2, 6, 11, 12, 0, 8, 5, 3], [1, 2, 3]]


def padded(prompts, pad=0):
  width = max(map(len, prompts))
  ids = np.full((len(prompts), width), pad, np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
  return ids, np.asarray([len(p) for p in prompts], np.int32)


def run(lm, prompts, n=12, **kw):
  model, params = lm
  ids, lengths = padded(prompts, kw.pop('fill', 0))
  return generation.generate(generation.model_step(model, params), make_cache, ids, lengths,
                             max_new_tokens=n, **kw)


# ---------------------------------------------------------------------------- decoding


def test_greedy_equals_full_forward_reference(lm):
  model, params = lm
  out = run(lm, PROMPTS[:1], n=12)
  assert out.ids.shape == (1, 12) and out.ids.dtype == np.int32
  assert out.ids[0].tolist() == greedy_reference(model, params, PROMPTS[0], 12)
  assert out.lengths.tolist() == [12]


def test_batch_rows_equal_each_prompt_alone(lm):
  model, params = lm
  batch = run(lm, PROMPTS, n=10, fill=7)  # the fill value must not matter either
  for i, prompt in enumerate(PROMPTS):
    alone = run(lm, [prompt], n=10)
    assert batch.ids[i].tolist() == alone.ids[0].tolist(), i
    assert batch.ids[i].tolist() == greedy_reference(model, params, prompt, 10), i
  assert batch.lengths.tolist() == [10] * len(PROMPTS)


def test_stop_tokens_end_rows_and_pad_after(lm):
  free = run(lm, PROMPTS, n=12)
  stop = int(free.ids[0, 3])  # a token row 0 produces mid-way
  pad = 12
  out = run(lm, PROMPTS, n=12, stop_ids=(stop,), pad_id=pad)
  stopped = 0
  for row, full in zip(out.ids.tolist(), free.ids.tolist()):
    k = full.index(stop) + 1 if stop in full else len(full)
    stopped += stop in full
    assert row == full[:k] + [pad] * (12 - k)
  assert out.lengths.tolist() == [
      r.index(stop) + 1 if stop in r else 12 for r in free.ids.tolist()]
  assert out.lengths[0] <= 4 and stopped >= 1


def test_all_rows_stopping_exits_early_with_same_result(lm):
  free = run(lm, PROMPTS[:1], n=12)
  first = int(free.ids[0, 0])
  out = run(lm, PROMPTS[:1], n=12, stop_ids=[first, VOCAB + 5])
  assert out.ids[0].tolist() == [first] + [0] * 11
  assert out.lengths.tolist() == [1]


def test_top_k_1_and_tiny_top_p_equal_greedy(lm):
  greedy = run(lm, PROMPTS, n=10)
  for cfg in (SamplingConfig(temperature=1.0, top_k=1),
              SamplingConfig(temperature=2.0, top_p=1e-6)):
    out = run(lm, PROMPTS, n=10, sampling=cfg, rng=jax.random.key(3))
    np.testing.assert_array_equal(out.ids, greedy.ids)


def test_temperature_sampling_reproducible_and_batch_independent(lm):
  cfg = SamplingConfig(temperature=1.0)
  a = run(lm, PROMPTS, n=10, sampling=cfg, rng=jax.random.key(7))
  b = run(lm, PROMPTS, n=10, sampling=cfg, rng=jax.random.key(7))
  c = run(lm, PROMPTS, n=10, sampling=cfg, rng=jax.random.key(8))
  np.testing.assert_array_equal(a.ids, b.ids)
  assert (a.ids != c.ids).any()
  # Row 0 alone (batch bucket 1 instead of 4) draws the same tokens.
  alone = run(lm, PROMPTS[:1], n=10, sampling=cfg, rng=jax.random.key(7))
  np.testing.assert_array_equal(alone.ids[0], a.ids[0])


def _constant_step(logits):
  """A step whose logits are ``logits`` at every position, whatever the input."""
  table = jnp.asarray(logits, jnp.float32)

  def step(input_ids, positions, cache):
    del positions
    return jnp.broadcast_to(table, input_ids.shape + table.shape), cache
  return step


def _draws(logits, cfg, rows=64, n=64, seed=0):
  out = generation.generate(_constant_step(logits), lambda b, s: {'c': jnp.zeros((b, s))},
                            np.ones((rows, 1), np.int32), np.ones(rows, np.int32),
                            max_new_tokens=n, sampling=cfg, rng=jax.random.key(seed))
  return out.ids.ravel()


LOGITS = np.array([1.2, -0.3, 0.4, 2.0, 0.0], np.float32)


def test_temperature_distribution_matches_softmax():
  for temperature in (0.7, 1.5):
    draws = _draws(LOGITS, SamplingConfig(temperature=temperature))
    freq = np.bincount(draws, minlength=len(LOGITS)) / draws.size
    want = np.asarray(jax.nn.softmax(LOGITS / temperature))
    n = draws.size  # 4096: the standard error of each frequency is <= 0.008
    tv = 0.5 * np.abs(freq - want).sum()
    chi2 = n * ((freq - want) ** 2 / want).sum()
    assert tv < 0.04, (temperature, freq, want)
    assert chi2 < 30, chi2  # 4 degrees of freedom: P(chi2 > 30) < 1e-5


def test_top_k_never_samples_outside_top_k():
  draws = _draws(LOGITS, SamplingConfig(temperature=3.0, top_k=2))
  assert set(draws.tolist()) == {0, 3}  # the two largest logits, both drawn
  freq = np.bincount(draws, minlength=5)[[0, 3]] / draws.size
  want = np.asarray(jax.nn.softmax(LOGITS[[0, 3]] / 3.0))
  assert np.abs(freq - want).max() < 0.04


def test_top_p_keeps_the_nucleus():
  probs = np.asarray(jax.nn.softmax(LOGITS))  # sorted: 3 (.43), 0 (.24), 2 (.11), 4, 1
  p = float(probs[3] + probs[0]) - 0.01  # the nucleus is {3, 0}: 0 crosses p
  draws = _draws(LOGITS, SamplingConfig(temperature=1.0, top_p=p))
  assert set(draws.tolist()) == {0, 3}
  freq = np.bincount(draws, minlength=5)[[0, 3]] / draws.size
  want = probs[[0, 3]] / probs[[0, 3]].sum()
  assert np.abs(freq - want).max() < 0.04


def test_masks_exact():
  x = jnp.array([[1.0, 3.0, 3.0, 2.0], [0.0, -1.0, 5.0, 4.0]])
  k2 = generation.top_k_mask(x, 2)
  assert np.isfinite(np.asarray(k2)).tolist() == [[False, True, True, False],
                                                 [False, False, True, True]]
  assert np.isfinite(np.asarray(generation.top_k_mask(x, 0))).all()
  ties = generation.top_k_mask(jnp.array([[1.0, 1.0, 1.0]]), 2)  # exactly k, lower ids first
  assert np.isfinite(np.asarray(ties)).tolist() == [[True, True, False]]
  logp = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  for p, keep in ((0.4, [True, False, False]), (0.5, [True, False, False]),
                  (0.6, [True, True, False]), (0.81, [True, True, True]),
                  (1.0, [True, True, True])):
    assert np.isfinite(np.asarray(generation.top_p_mask(logp, p)))[0].tolist() == keep, p
  assert generation.greedy(x).tolist() == [1, 2]


def test_sampling_config_errors_name_the_field():
  for kwargs, field in (({'temperature': -0.1}, 'temperature='),
                        ({'temperature': float('nan')}, 'temperature='),
                        ({'top_k': -1}, 'top_k='), ({'top_k': 1.5}, 'top_k='),
                        ({'top_p': 0.0}, 'top_p='), ({'top_p': 1.5}, 'top_p=')):
    with pytest.raises(SamplingError, match=field):
      SamplingConfig(**kwargs)
  assert SamplingConfig(top_p=1) == SamplingConfig(top_p=1.0)
  assert hash(SamplingConfig(temperature=1)) == hash(SamplingConfig(temperature=1.0))


def test_generate_argument_errors(lm):
  model, params = lm
  step = generation.model_step(model, params)
  ids, lengths = padded(PROMPTS)
  cases = [
      (dict(prompt_lengths=[1, 2, 0, 3]), 'prompt_lengths\\[2\\]=0'),
      (dict(prompt_lengths=[1, 2, 11, 3]), 'prompt_lengths\\[2\\]=11'),
      (dict(prompt_lengths=[1, 2]), 'prompt_lengths has shape'),
      (dict(prompt_ids=ids[0]), 'prompt_ids has shape'),
      (dict(max_new_tokens=0), 'max_new_tokens=0'),
      (dict(stop_ids=(-1,)), 'stop_ids entry=-1'),
      (dict(max_positions=12), 'is 15 tokens; the model has 12 positions'),
  ]
  for change, message in cases:
    kw = {'prompt_ids': ids, 'prompt_lengths': lengths, 'max_new_tokens': 5, **change}
    with pytest.raises(generation.GenerationError, match=message):
      generation.generate(step, make_cache, kw.pop('prompt_ids'), kw.pop('prompt_lengths'),
                          **kw)


def test_one_compile_per_bucket(lm):
  model, params = lm
  cfg = SamplingConfig(temperature=0.9, top_k=5)
  start = generation.compile_count()
  # Lengths 5 and 7 share the 8 bucket, batches 3 and 4 the 4 bucket; a new step wrapper of
  # the same model and weights is the same program.
  run(lm, [[1, 2, 3, 4, 5], [2], [3, 3]], n=6, sampling=cfg, rng=1)
  assert generation.compile_count() == start + 1
  ids, lengths = padded([[1] * 7, [2, 2], [3], [4, 4, 4]])
  generation.generate(generation.model_step(model, params), make_cache, ids, lengths,
                      max_new_tokens=6, sampling=cfg, rng=2)
  assert generation.compile_count() == start + 1
  run(lm, [[1] * 9], n=6, sampling=cfg, rng=1)  # the 16 bucket
  assert generation.compile_count() == start + 2


def test_buckets():
  assert [generation.length_bucket(n) for n in (1, 8, 9, 100, 256, 257, 600)] == [
      8, 8, 16, 128, 256, 512, 768]
  assert [generation.batch_bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


def test_stream_equals_batch_path(lm):
  model, params = lm
  step = generation.model_step(model, params)
  for cfg, stops in ((generation.GREEDY, ()), (SamplingConfig(temperature=1.3, top_p=0.9), ()),
                     (generation.GREEDY, None)):
    prompt = PROMPTS[2]
    whole = run(lm, [prompt], n=12, sampling=cfg, rng=jax.random.key(5))
    if stops is None:
      stops = (int(whole.ids[0, 4]),)
      whole = run(lm, [prompt], n=12, sampling=cfg, rng=jax.random.key(5), stop_ids=stops)
    got = list(generation.stream(step, make_cache, prompt, max_new_tokens=12, sampling=cfg,
                                 rng=jax.random.key(5), stop_ids=stops))
    assert got == whole.ids[0, :whole.lengths[0]].tolist(), cfg
  before = (generation.compile_count('prefill'), generation.compile_count('step'))
  # The prompt above has 10 tokens; 13 share its 16 bucket (and greedy was compiled).
  list(generation.stream(step, make_cache, [1] * 13, max_new_tokens=12))
  assert (generation.compile_count('prefill'), generation.compile_count('step')) == before


# ---------------------------------------------------------------------------- the Llama LM


def _tiny_llama():
  from peftjax.models.llama import LlamaConfig
  from peftjax.models.llama import LlamaForCausalLM
  cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=500.0, max_position=64)
  module = LlamaForCausalLM(cfg)
  params = nn.meta.unbox(module.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))['params'])
  # Larger weights than the init's 0.02, so the logits are far from ties.
  params = jax.tree.map(lambda x: x * 20.0 if x.ndim == 2 else x, params)
  return cfg, module, params


def test_llama_model_step_and_method_step_equal_full_forwards():
  from configs import common
  from peftjax import peft
  from peftjax.models.llama import init_cache
  cfg, module, params = _tiny_llama()
  prompts = [[5, 9, 13, 2, 40, 7], [33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
  ids, lengths = padded(prompts)
  make = functools.partial(init_cache, cfg)
  out = generation.generate(generation.model_step(module, params), make, ids, lengths,
                            max_new_tokens=8)
  for i, prompt in enumerate(prompts):
    assert out.ids[i].tolist() == greedy_reference(module, params, prompt, 8), i

  c = common.get_config()
  c.peft.lora.targets = r'attn/(q|v)_proj/kernel$'
  c.peft.head = ''
  method = peft.build(c.peft)
  lora = method.init(jax.random.key(1), module, params, {'input_ids': jnp.asarray(ids)})
  lora = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), lora)
  with_lora = generation.generate(generation.method_step(module, method, params, lora), make,
                                  ids, lengths, max_new_tokens=8)
  assert (with_lora.ids != out.ids).any()  # the adapter changes what is generated
  for i, prompt in enumerate(prompts):
    seq, want = list(prompt), []
    for _ in range(8):
      logits = peft.apply(module, method, params, lora,
                          {'input_ids': jnp.asarray([seq], jnp.int32)})
      want.append(int(jnp.argmax(logits[0, -1])))
      seq.append(want[-1])
    assert with_lora.ids[i].tolist() == want, i


# ---------------------------------------------------------------------------- the CLI

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ['<unk>', '<s>', '<|im_end|>', '<|im_start|>', 'user', 'assistant', 'system'] + [
    f'w{i}' for i in range(54)]  # 61 = the tiny model's vocabulary


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  """A tiny random Llama as a Hugging Face directory (config, safetensors, a word-level
  tokenizer with a ChatML template); returns (directory, cfg, params)."""
  import json

  import tokenizers
  from safetensors.numpy import save_file
  from peftjax.models import llama_convert
  cfg, module, params = _tiny_llama()
  del module
  d = tmp_path_factory.mktemp('tiny_llama')
  (d / 'config.json').write_text(json.dumps(cfg.to_hf()))
  save_file({k: np.ascontiguousarray(v) for k, v in
             llama_convert.hf_from_params(cfg, jax.device_get(params)).items()},
            str(d / 'model.safetensors'))
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(WORDS)}, unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(['<unk>', '<s>', '<|im_end|>', '<|im_start|>'])
  tok.save(str(d / 'tokenizer.json'))
  (d / 'tokenizer_config.json').write_text(json.dumps(
      {'chat_template': CHATML, 'eos_token': '<|im_end|>', 'pad_token': '<|im_end|>'}))
  return d, cfg, params


def _expected(cfg, params, text, n, *, chat):
  """(completion text, completion tokens, finish reason) by full forwards, independently of
  the CLI: ids straight from the word list, greedy until <|im_end|> (id 2)."""
  from peftjax.models.llama import LlamaForCausalLM
  words = (['<|im_start|>', 'user', *text.split(), '<|im_end|>', '<|im_start|>', 'assistant']
           if chat else text.split())
  ids = [WORDS.index(w) if w in WORDS else 0 for w in words]
  toks = []
  for t in greedy_reference(LlamaForCausalLM(cfg), params, ids, n):
    toks.append(t)
    if t == 2:
      break
  stopped = toks[-1] == 2
  body = toks[:-1] if stopped else toks
  return (' '.join(WORDS[t] for t in body if t > 3), len(toks),
          'stop' if stopped else 'length', len(ids))


def _cli(*args, timeout=600):
  import subprocess
  import sys
  return subprocess.run([sys.executable, '-m', 'peftjax.generate', *args], capture_output=True,
                        text=True, timeout=timeout, cwd=str(__import__('pathlib').Path(
                            __file__).resolve().parents[1]))


def test_cli_jsonl_round_trip_and_stream(hf_dir, tmp_path):
  import json
  d, cfg, params = hf_dir
  records = [{'prompt': 'w1 w2 w3', 'id': 'a'},
             {'messages': [{'role': 'user', 'content': 'w7 w7 w30 w4 w9'}]},
             {'prompt': 'w12'}]
  inp = tmp_path / 'in.jsonl'
  inp.write_text(''.join(json.dumps(r) + '\n' for r in records[:2]) + '\n' +
                 json.dumps(records[2]) + '\n')
  out = tmp_path / 'out.jsonl'
  proc = _cli(f'--model={d}', f'--input={inp}', f'--output={out}', '--max_new_tokens=9',
              '--batch_size=2')
  assert proc.returncode == 0, proc.stderr
  got = [json.loads(line) for line in out.read_text().splitlines()]
  texts = ['w1 w2 w3', 'w7 w7 w30 w4 w9', 'w12']
  assert [g['line'] for g in got] == [1, 2, 4]
  assert got[0]['id'] == 'a' and 'id' not in got[1]
  for g, text in zip(got, texts):
    completion, n, reason, prompt_tokens = _expected(cfg, params, text, 9, chat=True)
    assert (g['completion'], g['completion_tokens'], g['finish_reason'],
            g['prompt_tokens']) == (completion, n, reason, prompt_tokens), g

  # One prompt, plain text, streamed to stdout: the same tokens as the batch path.
  proc = _cli(f'--model={d}', '--prompt=w5 w6 w7', '--nochat', '--max_new_tokens=7')
  assert proc.returncode == 0, proc.stderr
  completion, *_ = _expected(cfg, params, 'w5 w6 w7', 7, chat=False)
  assert proc.stdout.strip() == completion


def test_cli_bad_input_one_line_nothing_written(hf_dir, tmp_path):
  d, _, _ = hf_dir
  out = tmp_path / 'out.jsonl'
  bad_json = tmp_path / 'bad.jsonl'
  bad_json.write_text('{"prompt": "w1"}\n{"prompt": "w2",}\n')
  no_role = tmp_path / 'norole.jsonl'
  no_role.write_text('{"messages": [{"content": "w1"}]}\n')
  long = tmp_path / 'long.jsonl'
  long.write_text('{"prompt": "w1"}\n{"prompt": "%s"}\n' % ' '.join(['w3'] * 60))
  cases = [
      ([f'--input={tmp_path / "missing.jsonl"}'], 'does not exist'),
      ([f'--input={bad_json}'], f'{bad_json}:2: not valid JSON'),
      ([f'--input={no_role}'], f'{no_role}:1: "messages"[0] has role=None'),
      ([f'--input={long}'], f"{long}:2: the prompt is 65 tokens; with --max_new_tokens=4 that "
                            "is 69, over the model's 64 positions"),
      ([f'--input={long}', '--temperature=-1'], '--temperature=-1.0 is invalid'),
      ([f'--input={long}', '--top_p=0'], '--top_p=0.0 is invalid'),
      ([f'--input={long}', '--top_k=x'], 'top_k'),
      ([f'--input={long}', '--tempreature=1'], 'tempreature'),
  ]
  for extra, message in cases:
    proc = _cli(f'--model={d}', f'--output={out}', '--max_new_tokens=4', *extra)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (extra, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], (
        extra, lines)
    assert not out.exists()
  # In-process (the same checks, no subprocess): the flag combinations and the model path.
  from peftjax import generate as cli_lib
  for kwargs, message in (
      ({'prompt': 'w1', 'input_path': str(long)}, 'exactly one of --prompt'),
      ({'input_path': str(long)}, '--input needs --output'),
      ({'prompt': 'w1', 'model': str(tmp_path / 'nope')}, 'does not exist'),
      ({'prompt': 'w1', 'model': str(long)}, 'is a file but not .gguf'),
      ({'prompt': 'w1', 'model': str(d), 'max_new_tokens': 0}, '--max_new_tokens=0'),
      ({'prompt': 'w1', 'model': str(d), 'chat': True, 'batch_size': 0}, '--batch_size=0'),
  ):
    with pytest.raises(cli_lib.GenerateError, match=message):
      cli_lib.run(**kwargs)


def test_shared_prefix_prefill_equals_whole_prompts():
  """Rows sharing a 21-token prefix: the prefix runs once (20 tokens, a multiple of 4 leaving
  each row a token of its own) and the result equals prefilling every whole prompt, greedy and
  sampled, for the Llama LM (logits_at) and a model without logits_at, and through a method."""
  from configs import common
  from peftjax import peft
  from peftjax.models.llama import init_cache
  cfg, module, params = _tiny_llama()
  head = [7, 3, 11, 5, 2, 9, 13, 4, 8, 1, 6, 12, 10, 14, 15, 16, 17, 18, 19, 20, 21]
  prompts = [head + [30, 31, 32], head + [40], head + [50, 51, 52, 53, 54, 55, 56, 57, 58]]
  ids, lengths = padded(prompts)
  assert generation.shared_prefix(ids, lengths) == 20
  assert generation.shared_prefix(ids[:1], lengths[:1]) == 0
  assert generation.shared_prefix(ids[:, :4], np.minimum(lengths, 4)) == 0  # under 16
  make = functools.partial(init_cache, cfg)
  assert generation.cache_batch_axes(make, 32) == (1, 1)
  c = common.get_config()
  c.peft.lora.targets = r'attn/(q|v)_proj/kernel$'
  c.peft.head = ''
  method = peft.build(c.peft)
  lora = method.init(jax.random.key(1), module, params, {'input_ids': jnp.asarray(ids)})
  lora = jax.tree.map(lambda x: jax.random.normal(jax.random.key(x.size), x.shape), lora)
  steps = [generation.model_step(module, params),
           generation.method_step(module, method, params, lora)]
  # Greedy through the model, sampled through the method (whole-prompt decoding is checked
  # against full forwards in the test above).
  for step, sampling in zip(steps, (generation.GREEDY, SamplingConfig(temperature=0.8, top_k=20))):
    kw = dict(max_new_tokens=6, sampling=sampling, rng=3)
    shared = generation.generate(step, make, ids, lengths, **kw)
    whole = generation.generate(step, make, ids, lengths, share_prefix=False, **kw)
    np.testing.assert_array_equal(shared.ids, whole.ids)
    np.testing.assert_array_equal(shared.lengths, whole.lengths)
  # A model without logits_at (TinyLM, batch axis 0 of its cache) shares the prefix too.
  tiny = TinyLM()
  tiny_params = tiny.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params']
  small = [[p % VOCAB for p in q] for q in prompts]
  got = run((tiny, tiny_params), small, n=6)
  for i, prompt in enumerate(small):
    assert got.ids[i].tolist() == greedy_reference(tiny, tiny_params, prompt, 6), i


def test_logits_at_equals_the_full_logits_gathered():
  from peftjax.models.llama import init_cache
  cfg, module, params = _tiny_llama()
  ids = jnp.asarray([[5, 9, 13, 2, 40, 7], [33, 1, 2, 3, 4, 5]], jnp.int32)
  full = module.apply({'params': params}, ids)
  at = jnp.asarray([[5, 0], [2, 2]], jnp.int32)
  some = module.apply({'params': params}, ids, logits_at=at)
  assert some.shape == (2, 2, cfg.vocab_size)
  np.testing.assert_allclose(some, jnp.take_along_axis(full, at[..., None], axis=1), atol=1e-5)
  logits, _ = module.apply({'params': params}, ids, cache=init_cache(cfg, 2, 8),
                           logits_at=at[:, :1])
  np.testing.assert_allclose(logits[:, 0], full[jnp.arange(2), at[:, 0]], atol=1e-5)


def test_cli_gguf_loader_greedy_matches_transformers_fixture():
  """The CLI's GGUF loader (open_model): greedy decoding of the bundled SmolLM2 (a batch of two
  prompts of 17 and 42 tokens) is
  token-identical to transformers' argmax continuation (32 new tokens, EOS not stopping)."""
  import pathlib
  from peftjax import generate as cli_lib
  from peftjax.models import gguf_file
  from peftjax.models.llama import LlamaForCausalLM
  from peftjax.models.llama import init_cache
  ref = np.load(pathlib.Path(__file__).parent / 'fixtures' / 'lm' / 'smollm2_reference.npz')
  cfg, _, load_params = cli_lib.open_model(gguf_file.smollm2_gguf())
  rows = ref['greedy_prompts']
  ids, lengths = ref['input_ids'][rows], ref['lengths'][rows]
  out = generation.generate(generation.model_step(LlamaForCausalLM(cfg), load_params()),
                            functools.partial(init_cache, cfg), ids, lengths, max_new_tokens=32)
  np.testing.assert_array_equal(out.ids, ref['greedy_ids'])


def test_cli_workdir_generates_with_the_trained_adapter(tmp_path):
  """--workdir: a finished LoRA run of configs/lm_tiny.py; the completions equal greedy full
  forwards of its restored model through its method, decoded by its tokenizer."""
  import json
  from configs import lm_tiny
  from peftjax import generate as cli_lib
  from peftjax import peft
  from peftjax import run as run_lib
  from peftjax import train
  config = lm_tiny.get_config()
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  inp, out = tmp_path / 'in.jsonl', tmp_path / 'out.jsonl'
  texts = ['A tedious, overlong mess.', 'Warm and funny.']
  inp.write_text(''.join(json.dumps({'prompt': t}) + '\n' for t in texts))
  summary = cli_lib.run(workdir=workdir, input_path=str(inp), output_path=str(out),
                        max_new_tokens=5)
  assert summary['records'] == 2 and summary['chat']
  got = [json.loads(line) for line in out.read_text().splitlines()]

  setup, params = run_lib.restore_trained(config, workdir)
  tok = setup.task.tokenizer
  stops = set(cli_lib.special_ids(tok)[0])
  for g, text in zip(got, texts):
    seq = tok.encode(tok.apply_chat_template([{'role': 'user', 'content': text}],
                                             add_generation_prompt=True))
    assert g['prompt_tokens'] == len(seq)
    new = []
    for _ in range(5):
      logits = peft.apply(setup.built.module, setup.method, params['base'], params['peft'],
                          {'input_ids': jnp.asarray([seq + new], jnp.int32)})
      new.append(int(jnp.argmax(logits[0, -1])))
      if new[-1] in stops:
        break
    stopped = new[-1] in stops
    assert g['completion'] == tok.decode(new[:-1] if stopped else new), g
    assert g['completion_tokens'] == len(new)
    assert g['finish_reason'] == ('stop' if stopped else 'length')
