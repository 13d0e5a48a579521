"""The causal LM through the training loop on configs/lm_tiny.py (a random 2-layer Llama, Rotten
Tomatoes as instructions): LoRA, full fine-tuning and IA3 end to end with exact trainable counts
and a bit-identical frozen base; SIGKILL + resume bit-identical through `python -m peftjax.main`;
the exact match of the summary recomputed by greedy full forwards; too-long prompts refused
before any compute."""
import json
import math
import os
import pathlib
import signal
import string
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--config=configs/lm_tiny.py']


def _main(args):
  # The test session's compilation cache (tests/conftest.py), also for programs that compile
  # fast: the three runs below compile the same ones.
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  return subprocess.Popen([sys.executable, '-m', 'peftjax.main', *args,
                           *([f'--compilation_cache={cache}'] if cache else [])], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def _run(args, timeout=600):
  p = _main(args)
  out, err = p.communicate(timeout=timeout)
  return p.returncode, out, err


def _steps(workdir: pathlib.Path):
  d = workdir / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _config(**overrides):
  """configs/lm_tiny.py with ``overrides`` ('train.steps'-style keys as ``train__steps``)."""
  from configs import lm_tiny
  c = lm_tiny.get_config()
  for key, value in overrides.items():
    *parents, leaf = key.split('__')
    section = c
    for p in parents:
      section = section[p]
    section[leaf] = value
  return c


def _summary(workdir) -> dict:
  return json.loads((pathlib.Path(workdir) / 'summary.json').read_text())


class Run:
  """A finished run: its config, workdir, and ``run.restore_trained``'s (setup, params)."""

  def __init__(self, config, workdir, out=''):
    from peftjax import run as run_lib
    self.config, self.workdir, self.out = config, pathlib.Path(workdir), out
    self.setup, self.params = run_lib.restore_trained(config, str(workdir))
    self.summary = _summary(workdir)


def _train(config, tmp_path_factory, name) -> Run:
  from peftjax import train
  wd = tmp_path_factory.mktemp(name)
  train.train_and_evaluate(config, str(wd))
  return Run(config, wd)


# In-process runs skip the evaluations the tests below do not read (before training and at
# step 3); the validation split is still evaluated at the last step.
QUICK = dict(train__eval_every=0, train__eval_before=False, data__max_eval_examples=8)


@pytest.fixture(scope='module')
def lora_run(tmp_path_factory):
  """The uninterrupted LoRA run of configs/lm_tiny.py through python -m peftjax.main."""
  wd = tmp_path_factory.mktemp('lora')
  code, out, err = _run([*TINY, f'--workdir={wd}'])
  assert code == 0, err[-3000:]
  return Run(_config(), wd, out)


@pytest.fixture(scope='module')
def ia3_run(tmp_path_factory):
  return _train(_config(peft__method='ia3', **QUICK), tmp_path_factory, 'ia3')


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  """Full fine-tuning at a learning rate that, in 6 steps, makes the random LM answer
  'positive' or 'negative' (5 of the 8 test answers match), so exact match is not trivially 0."""
  return _train(_config(peft__method='full', optim__learning_rate=3e-3, **QUICK),
                tmp_path_factory, 'full')


# ---------------------------------------------------------------------------- counts


def _expected_trainable(config) -> int:
  """The trainable parameters of ``config``'s method, from the LlamaConfig alone."""
  from peftjax.models.llama import LlamaConfig
  a = LlamaConfig(**dict(config.model.llama))
  d, f, v, n = a.hidden_size, a.intermediate_size, a.vocab_size, a.num_layers
  q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
  method = config.peft.method
  if method == 'lora':  # A (in, r) and B (r, out) on q, k, v and o
    r = config.peft.lora.rank
    return n * sum(r * (i + o) for i, o in ((d, q), (d, kv), (d, kv), (q, d)))
  if method == 'ia3':  # the outputs of k and v, the input of down_proj
    return n * (kv + kv + f)
  assert method == 'full'
  layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d  # attention, SwiGLU, two norms
  return v * d + n * layer + d + (0 if a.tie_embeddings else d * v)


def _bytes_equal(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _check_run(run: Run, examples: int):
  """The summary's metrics and counts, the restored base against a fresh one, and what moved."""
  from peftjax import models
  from peftjax import tree as tree_lib
  config, s, params = run.config, run.summary, run.params
  assert s['headline'] == 'exact_match' and s['method'] == config.peft.method
  for split in ('validation', 'test'):
    m = s[split]
    assert m['examples'] == examples, (split, m)
    assert 0.0 <= m['exact_match'] <= 1.0, (split, m)
    assert math.isfinite(m['perplexity']) and m['perplexity'] > 1.0, (split, m)
    assert m['perplexity'] == pytest.approx(math.exp(m['loss']), rel=1e-12)
  assert s['exact_match_after'] == s['test']['exact_match']
  assert s['perplexity_after'] == s['test']['perplexity']

  expected = _expected_trainable(config)
  assert s['trainable_params'] == expected
  fresh = models.build_lm(config.model, seed=config.seed)[0].params
  got, want = tree_lib.flatten(jax.device_get(params['base'])), tree_lib.flatten(
      jax.device_get(fresh))
  assert sorted(got) == sorted(want)
  if config.peft.method == 'full':
    assert s['total_params'] == expected and not params['peft']
    # The restored parameters are the run's final trainable partition, every leaf of the base.
    assert tree_lib.fingerprint(jax.device_get(params)) == s['trainable_sha256']
    moved = [p for p in want if not _bytes_equal(got[p], want[p])]
    assert moved == sorted(want), f'unchanged by training: {sorted(set(want) - set(moved))}'
    return
  assert s['total_params'] == expected + tree_lib.count(fresh)
  assert tree_lib.count(params['peft']) == expected
  # The run's final trainable partition held no base leaf: it is the method's parameters alone.
  assert tree_lib.fingerprint(jax.device_get({'base': {}, 'peft': params['peft']})) == (
      s['trainable_sha256'])
  same = [p for p in want if _bytes_equal(got[p], want[p])]
  assert same == list(want), f'base leaves changed: {sorted(set(want) - set(same))}'
  trained = tree_lib.flatten(jax.device_get(params['peft']))
  init = tree_lib.flatten(jax.device_get(run.setup.trainable['peft']))
  assert sorted(trained) == sorted(init) and trained
  unchanged = [p for p in init if _bytes_equal(trained[p], init[p])]
  assert not unchanged, f'{config.peft.method} leaves unchanged by training: {unchanged}'


def test_lora_run_through_main(lora_run):
  _check_run(lora_run, examples=16)
  s, out = lora_run.summary, lora_run.out
  assert s['exact_match_before'] is not None and s['perplexity_before'] > 1.0
  assert f"trainable {_expected_trainable(lora_run.config):,d} of" in out
  assert 'test exact_match before' in out and 'test perplexity before' in out


def test_ia3_run(ia3_run):
  _check_run(ia3_run, examples=8)


def test_full_fine_tuning_run(full_run):
  _check_run(full_run, examples=8)


# ---------------------------------------------------------------------------- resume


def test_sigkill_and_resume_is_bit_identical(lora_run, tmp_path):
  """Killed (SIGKILL) once its first checkpoint exists, then rerun to the end: the final
  trainable parameters, every metric and the metrics log equal the uninterrupted run's."""
  wd_full = lora_run.workdir
  wd = tmp_path / 'killed'
  p = _main([*TINY, f'--workdir={wd}'])
  deadline = time.time() + 300
  while not _steps(wd) and p.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.communicate()
  killed_at = _steps(wd)
  assert killed_at and killed_at[-1] < lora_run.config.train.steps, (
      f'not killed mid-run (checkpoints {killed_at})')
  assert not (wd / 'summary.json').exists()
  code, out, err = _run([*TINY, f'--workdir={wd}'])
  assert code == 0, err[-3000:]
  assert f'resumed from checkpoint at step {killed_at[-1]}' in out
  a, b = _summary(wd_full), _summary(wd)
  assert a['trainable_sha256'] == b['trainable_sha256']
  for key in ('test', 'validation', 'loss_before', 'exact_match_before', 'perplexity_before'):
    assert a[key] == b[key], key

  def log(w):  # throughput is the only field allowed to differ
    lines = [json.loads(l) for l in (w / 'metrics.jsonl').read_text().splitlines()]
    return [{k: v for k, v in l.items() if k != 'examples_per_sec'} for l in lines]
  assert log(wd_full) == log(wd)


# ---------------------------------------------------------------------------- exact match


def _normalized(text: str) -> str:
  return ' '.join(text.split()).casefold().rstrip(string.punctuation + string.whitespace)


def test_exact_match_equals_greedy_full_forwards(full_run):
  """The summary's test exact match recomputed without the loop's generator or data pipeline:
  prompts rendered from the raw records with the chat template, greedy decoding by full
  forwards (no KV cache) of the restored model through its method, answers compared with the
  records' completions."""
  from peftjax import peft
  from peftjax.data import lm_pipeline
  config, setup, params = full_run.config, full_run.setup, full_run.params
  tok = setup.task.tokenizer
  n = config.data.max_eval_examples
  source = lm_pipeline.load_lm_source('rt_instructions', config.data.test_split)
  records = [source[i] for i in range(n)]
  refs = [r['completion'].decode() for r in records]
  assert set(refs) == {'positive', 'negative'}
  prompts = [tok.encode(tok.apply_chat_template(
      [{'role': 'user', 'content': r['prompt'].decode()}], add_generation_prompt=True))
      for r in records]
  # The answer and its end-of-turn, plus 2 (see run.generation_eval), within the config's cap.
  new = min(config.generate.max_new_tokens, max(len(tok.encode(r)) + 1 for r in refs) + 2)
  width = max(map(len, prompts)) + new
  ids = np.full((n, width), tok.eos_id, np.int32)
  for row, p in enumerate(prompts):
    ids[row, :len(p)] = p
  # Right padding: a causal LM's logits at a position ignore every later token.
  forward = jax.jit(lambda x: peft.apply(setup.built.module, setup.method, params['base'],
                                         params['peft'], {'input_ids': x}))
  answers = [[] for _ in range(n)]
  done = [False] * n
  for _ in range(new):
    logits = np.asarray(forward(jnp.asarray(ids)))
    for row, p in enumerate(prompts):
      if done[row]:
        continue
      t = int(logits[row, len(p) + len(answers[row]) - 1].argmax())
      if t == tok.eos_id:
        done[row] = True
      else:
        ids[row, len(p) + len(answers[row])] = t
        answers[row].append(t)
  texts = [tok.decode(a) for a in answers]
  hits = [_normalized(t) == _normalized(r) for t, r in zip(texts, refs)]
  s = full_run.summary
  assert s['test']['examples'] == n
  assert s['exact_match_after'] == sum(hits) / n, list(zip(texts, refs))
  assert 0 < sum(hits) < n, list(zip(texts, refs))  # neither trivially 0 nor all


def test_generation_alone_gives_the_same_exact_match(full_run, tmp_path_factory):
  """generate.teacher_forced=False: the same training, scored by generation alone (no loss
  pass, no validation pass with data.eval_split=''): the same exact match, no loss keys."""
  run = _train(_config(peft__method='full', optim__learning_rate=3e-3,
                       generate__teacher_forced=False, data__eval_split='', **QUICK),
               tmp_path_factory, 'gen_only')
  s = run.summary
  assert set(s['test']) == {'exact_match'}, s['test']
  assert s['exact_match_after'] == full_run.summary['exact_match_after']
  assert s['perplexity_after'] is None and s['validation'] is None
  assert s['trainable_sha256'] == full_run.summary['trainable_sha256']


# ---------------------------------------------------------------------------- too long


def _refused(config, workdir, expect: str):
  from peftjax import train
  from peftjax.errors import UserInputError
  with pytest.raises(UserInputError) as e:
    train.train_and_evaluate(config, str(workdir))
  assert expect in str(e.value), str(e.value)
  assert not workdir.exists()
  return str(e.value)


def test_example_longer_than_max_length_fails_before_compute(tmp_path):
  msg = _refused(_config(data__max_length=32), tmp_path / 'w', 'longer than data.max_length=32')
  assert msg.startswith('rt_instructions/') and "data.truncation='left'" in msg


def test_max_length_beyond_the_model_positions_fails_before_compute(tmp_path):
  _refused(_config(model__llama__max_position=64), tmp_path / 'w',
           'config.data.max_length=128 is invalid: the model has 64 positions '
           '(config.model.llama.max_position); valid: data.max_length <= 64')


def test_prompt_plus_generated_tokens_beyond_the_model_positions(tmp_path):
  """Every example fits data.max_length = the model's positions, but the longest test prompt
  plus the tokens generated for exact match does not: refused before training, not in the
  first evaluation."""
  from peftjax.models import load_lm_tokenizer
  tok = load_lm_tokenizer(_config().model)
  short, long = 'Is water wet?', 'Is water wet? Think about it, then answer in one word.'
  prompt = tok.encode(tok.apply_chat_template([{'role': 'user', 'content': long}],
                                              add_generation_prompt=True))
  total = len(prompt) + len(tok.encode('yes')) + 1  # the answer and its end-of-turn
  data = tmp_path / 'data'
  data.mkdir()
  for split in ('train', 'validation', 'test'):
    rows = [{'prompt': short, 'completion': 'yes'}] * 4 + [{'prompt': long, 'completion': 'yes'}]
    (data / f'{split}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  config = _config(data__name=str(data), data__max_length=total,
                   model__llama__max_position=total)
  _refused(config, tmp_path / 'w',
           f'the prompt of data/validation[4] ({len(prompt)} tokens) + 4 generated tokens '
           f'(generate.max_new_tokens=4) is {len(prompt) + 4} tokens; the model has {total} '
           'positions')
