"""From a data config to numpy batches: TFDS random-access sources, batched with grain.

>>> data = build(config.data)                   # doctest: +SKIP
>>> batch = data.train_batches(32, seed=0)[0]   # a pure function of (seed, index)
>>> batch['input_ids'].shape, batch['label'].shape
((32, 64), (32,))
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pathlib
import shutil

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from peftjax.errors import UserInputError
from peftjax.data.assets import minilm_dir
from peftjax.data.builders import Digits
from peftjax.data.builders import Mnist5k
from peftjax.data.builders import RottenTomatoes
from peftjax.data.tokenize import Tokenizer
from peftjax.validate import check_data_dir

KNOWN = {'rotten_tomatoes': RottenTomatoes, 'mnist5k': Mnist5k, 'digits': Digits}
# Never look for prepared copies on GCS: there is no network, and these are built locally.
_DOWNLOAD_CONFIG = tfds.download.DownloadConfig(try_download_gcs=False)


class DataError(UserInputError):
  """A dataset, split or feature the config asks for is not there."""


def default_data_dir() -> str:
  """``$PEFTJAX_DATA_DIR`` if set, else ``~/.cache/peftjax/tfds``.

  >>> default_data_dir()  # doctest: +SKIP
  '/home/me/.cache/peftjax/tfds'
  """
  return os.environ.get('PEFTJAX_DATA_DIR') or os.path.expanduser('~/.cache/peftjax/tfds')


# ---------------------------------------------------------------------------- sources


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  """Exclusive ``flock`` on ``path``: serialises builders across processes (and threads)."""
  with open(path, 'a') as f:  # closing the file releases the lock, even on error
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def _prepare_known(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The bundled builder ``name``, prepared in ``data_dir`` (built once, under a file lock).

  TFDS writes into ``<name>/incomplete.XXXXXX_<version>/`` and renames it to ``<version>/`` only
  when complete, so readers never see a partial dataset. The lock makes concurrent processes
  (pytest-xdist workers, several runs) wait for one build instead of racing to rename.
  """
  make = lambda: KNOWN[name](data_dir=data_dir, file_format='array_record')
  builder = make()
  if builder.is_prepared():
    return builder
  os.makedirs(data_dir, exist_ok=True)
  with _file_lock(pathlib.Path(data_dir) / f'.{name}.lock'):
    builder = make()  # re-read: another process may have finished while we waited
    if not builder.is_prepared():
      # Under the lock, an incomplete dir can only be left by a build that was killed.
      for stale in (pathlib.Path(data_dir) / name).glob('incomplete.*'):
        shutil.rmtree(stale)
      builder.download_and_prepare(download_config=_DOWNLOAD_CONFIG)
  return builder


def _prepared_names(data_dir: str) -> list[str]:
  root = pathlib.Path(data_dir)
  infos = [*root.glob('*/*/dataset_info.json'), *root.glob('*/*/*/dataset_info.json')]
  return sorted({p.relative_to(root).parts[0] for p in infos} - set(KNOWN))


def _unknown(name: str, data_dir: str, why: str) -> DataError:
  prepared = _prepared_names(data_dir)
  return DataError(
      f'data.name={name!r} is invalid: {why}; valid: one of {sorted(KNOWN)} (built on first '
      f'use), or a TFDS dataset prepared in array_record format in data_dir={data_dir!r}'
      + (f' (found: {prepared})' if prepared else ' (none found there)'))


def _prepared_other(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """A dataset the user prepared: read only, never downloaded or generated here."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown(name, data_dir, 'no such dataset') from None
  if not builder.is_prepared():
    raise _unknown(name, data_dir, f'not prepared in {data_dir}')
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DataError(f'data.name={name!r} is prepared as {builder.info.file_format.value}, which '
                    'has no random access; re-prepare it with '
                    "builder.download_and_prepare(file_format='array_record')")
  return builder


def _builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  return _prepare_known(name, data_dir) if name in KNOWN else _prepared_other(name, data_dir)


def _split_source(builder: tfds.core.DatasetBuilder, split: str):
  if split not in builder.info.splits:
    raise DataError(f'split {split!r} is not in dataset {builder.name!r}; valid: '
                    f'{sorted(builder.info.splits)}')
  return builder.as_data_source(split=split)


def load_source(name: str, split: str, data_dir: str | None = None):
  """The random-access source (``len``, ``[i]``, ``__getitems__``) of one split.

  Bundled datasets (``KNOWN``) are built on first use; any other name must already be prepared
  in ``data_dir`` with ``file_format='array_record'``.

  >>> src = load_source('digits', 'train')  # doctest: +SKIP
  >>> len(src), src[0]['image'].shape
  (1437, (8, 8, 1))
  """
  return _split_source(_builder(name, data_dir or default_data_dir()), split)


# ---------------------------------------------------------------------------- Data


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a model needs to know about a dataset."""
  name: str
  kind: str  # 'text' | 'image'
  num_classes: int
  class_names: tuple[str, ...]
  splits: dict[str, int]  # split name -> number of examples stored
  image_shape: tuple[int, ...] | None  # (H, W, C) for images, None for text


def _feature(features, key: str):
  return features[key] if key in features.keys() else None  # FeaturesDict has no .get


def _kind(features, cfg) -> str:
  """'text' or 'image', from the features the config's keys point at."""
  text, image = _feature(features, cfg.text_key), _feature(features, cfg.image_key)
  if isinstance(text, tfds.features.Text):  # Text is a Tensor subclass: test it first
    return 'text'
  if isinstance(image, (tfds.features.Image, tfds.features.Tensor)) and not isinstance(
      image, tfds.features.Text) and len(image.shape) == 3 and None not in image.shape:
    return 'image'
  raise DataError(f'data.text_key={cfg.text_key!r} / data.image_key={cfg.image_key!r} match no '
                  'Text feature nor fixed-shape (H, W, C) image feature; valid: one of the '
                  f'dataset features {sorted(features.keys())}')


def _class_label(features, key: str) -> tfds.features.ClassLabel:
  feature = _feature(features, key)
  if not isinstance(feature, tfds.features.ClassLabel):
    raise DataError(f'data.label_key={key!r} is invalid; valid: a ClassLabel feature among '
                    f'{sorted(features.keys())}')
  return feature


def _shuffle_seed(seed: int) -> int:
  # grain reseeds epoch e with (seed + e); hashing spreads user seeds apart so that run seed=1
  # does not replay run seed=0's second epoch.
  return int.from_bytes(hashlib.sha256(f'peftjax-train:{seed}'.encode()).digest()[:4], 'little')


def _hosts(batch_size: int, process_index: int | None, process_count: int | None,
           limit: int | None = None) -> tuple[int, int]:
  """(this process, process count), JAX's by default; checks that ``batch_size`` splits evenly."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if batch_size < 1 or batch_size % count or (limit is not None and batch_size > limit):
    raise DataError(f'batch_size={batch_size} is invalid; valid: a positive multiple of the '
                     f'process count ({count})'
                     + (f', at most {limit} (the train examples)' if limit is not None else ''))
  return index, count


def _host_rows(batch: dict, index: int, count: int) -> dict:
  """This process's contiguous rows of a global batch (all of it on a single host)."""
  size = len(batch['label']) // count
  return {k: v[index * size:(index + 1) * size] for k, v in batch.items()}


class Data:
  """One dataset, ready to batch: ``info``, infinite ``train_batches``, exact ``eval_batches``.

  Make it with :func:`build`. Batches are dicts of numpy arrays: text gives int32
  ``input_ids``/``attention_mask``/``token_type_ids`` (B, L) and int32 ``label`` (B,); images
  give float32 ``image`` (B, H, W, C) in [0, 1] and int32 ``label``. Eval batches add a float32
  ``weight`` (1 real, 0 padding).
  """

  def __init__(self, builder: tfds.core.DatasetBuilder, cfg, tokenizer_path: str | None = None):
    features = builder.info.features
    labels = _class_label(features, cfg.label_key)
    kind = _kind(features, cfg)
    for field in ('train_split', 'eval_split', 'test_split'):
      if field == 'eval_split' and not cfg.eval_split:
        continue  # '' = no validation during training
      if getattr(cfg, field) not in builder.info.splits:
        raise DataError(f'data.{field}={getattr(cfg, field)!r} is invalid; valid: '
                        f'{sorted(builder.info.splits)} (splits of {builder.name!r})')
    self.info = DataInfo(
        name=builder.name, kind=kind, num_classes=labels.num_classes,
        class_names=tuple(labels.names),
        splits={k: v.num_examples for k, v in builder.info.splits.items()},
        image_shape=tuple(features[cfg.image_key].shape) if kind == 'image' else None)
    self.tokenizer = None
    if kind == 'text':
      self.tokenizer = Tokenizer(tokenizer_path or minilm_dir() / 'tokenizer.json',
                                 max_length=cfg.max_length, padding=cfg.padding)
    self._builder, self._cfg, self._sources = builder, cfg, {}
    self._uint8 = kind == 'image' and features[cfg.image_key].np_dtype == np.uint8

  def _source(self, split: str):
    if split not in self._sources:
      self._sources[split] = _split_source(self._builder, split)
    return self._sources[split]

  def _batch(self, split: str, indices) -> dict:
    """Reads and collates the examples at ``indices`` (numpy, in order) of ``split``.

    Text is tokenized here, per batch: reading and tokenizing 32 reviews takes ~7 ms on a
    2-core machine, against ~1.3 s to pre-tokenize the 10k-review train split up front and
    memory per example; per batch also scales to large user datasets.
    """
    records = self._source(split).__getitems__([int(i) for i in indices])
    c = self._cfg
    out = {'label': np.array([r[c.label_key] for r in records], np.int32)}
    if self.info.kind == 'text':
      texts = [r[c.text_key] for r in records]
      out.update(self.tokenizer.encode(
          [t.decode('utf-8') if isinstance(t, bytes) else t for t in texts]))
    else:
      images = np.stack([r[c.image_key] for r in records]).astype(np.float32)
      out['image'] = images / 255.0 if self._uint8 else images  # float images: used as stored
    return out

  def num_examples(self, split: str) -> int:
    """Examples of ``split`` that batches draw from (after ``max_*_examples``)."""
    limit = self._cfg.max_train_examples if split == self._cfg.train_split else (
        self._cfg.max_eval_examples)
    n = len(self._source(split))
    return n if limit < 0 else min(n, limit)

  def train_batches(self, batch_size: int, seed: int, *, process_index: int | None = None,
                    process_count: int | None = None) -> grain.MapDataset:
    """Infinite, random-access training batches: ``ds[i]`` is a pure function of (seed, i).

    Epoch ``e`` is a fresh permutation of the train split (grain's O(1) ``index_shuffle``,
    seeded by ``seed`` and ``e``), cut into ``len // batch_size`` full batches (the remainder
    of each epoch is dropped); epochs follow each other. Resuming at step ``s`` is ``ds[s]``.
    ``batch_size`` is global: each process gets its own contiguous rows of the global batch
    (``process_*`` default to JAX's), so the data order does not depend on the host count.

    >>> ds = data.train_batches(32, seed=0)  # doctest: +SKIP
    >>> ds[1000]['label'].shape
    (32,)
    """
    split = self._cfg.train_split
    n = self.num_examples(split)
    hosts = _hosts(batch_size, process_index, process_count, limit=n)
    return (grain.MapDataset.range(n)
            .shuffle(seed=_shuffle_seed(seed))
            .batch(batch_size, drop_remainder=True)  # batches within an epoch
            .repeat()  # batch i reads shuffle epoch i // (n // batch_size)
            .map(lambda indices: _host_rows(self._batch(split, indices), *hosts)))

  def eval_batches(self, split: str, batch_size: int, *, process_index: int | None = None,
                   process_count: int | None = None) -> grain.MapDataset:
    """Every example of ``split`` once, in stored order, in full batches with a ``weight``.

    The last batch is filled up to ``batch_size`` by repeating its last example (real inputs,
    so padded rows give finite logits) with weight 0; all other rows have weight 1. Returns a
    grain ``MapDataset``: ``len``, ``ds[i]`` and iteration (with background prefetch).

    >>> sum(b['weight'].sum() for b in data.eval_batches('test', 128))  # doctest: +SKIP
    1275.0
    """
    n = self.num_examples(split)  # raises DataError for an unknown split
    hosts = _hosts(batch_size, process_index, process_count)

    def padded(indices):
      real = len(indices)
      batch = self._batch(split, np.pad(indices, (0, batch_size - real), mode='edge'))
      batch['weight'] = (np.arange(batch_size) < real).astype(np.float32)
      return _host_rows(batch, *hosts)

    return grain.MapDataset.range(n).batch(batch_size).map(padded)


def build(data_cfg, *, tokenizer_path: str | None = None) -> Data:
  """The :class:`Data` for ``data_cfg`` (the ``config.data`` block; see configs/common.py).

  Bundled datasets are built into ``data_cfg.data_dir`` (``''`` = :func:`default_data_dir`) on
  first use. Text is tokenized with ``tokenizer_path`` (default: the bundled MiniLM's).

  >>> data = build(configs.common.get_config().data)  # doctest: +SKIP
  >>> data.info.splits
  {'train': 10202, 'validation': 1275, 'test': 1275}
  """
  check_data_dir(data_cfg.data_dir)  # a file, or a directory that cannot be made: one line
  builder = _builder(data_cfg.name, data_cfg.data_dir or default_data_dir())
  return Data(builder, data_cfg, tokenizer_path)
