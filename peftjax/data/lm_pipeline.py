"""From a data config and an LM tokenizer to causal-LM batches (packed or length-bucketed).

The same protocol as :class:`peftjax.data.pipeline.Data`: ``info``, ``num_examples(split)``,
``train_batches(batch_size, seed)`` (grain ``MapDataset``, ``ds[i]`` a pure function of
(seed, i), so resuming at step s is ``ds[s]``) and ``eval_batches(split, batch_size)`` (every
example once, rows with a float32 ``weight``); plus ``eval_prompts`` for generation.

Sources (``data.name``): a bundled builder (``rt_instructions``, ``word_reverse``,
``hamlet_text``), a JSONL file (split 80/10/10 with the builders' fixed
:func:`~peftjax.data.builders.split_indices`), a directory of ``<split>.jsonl`` files, or a TFDS
dataset prepared in ``array_record`` with text features ``data.prompt_key`` and
``data.completion_key`` (instructions) or ``data.text_key`` (plain text).

Every record of the used splits is validated and tokenized when the data is built, so a bad
record or an over-long prompt fails before any compute.

>>> data = build_lm(config.data, tokenizer)        # doctest: +SKIP
>>> batch = data.train_batches(8, seed=0)[0]   # doctest: +SKIP
>>> sorted(batch), batch['input_ids'].shape     # doctest: +SKIP
(['attention_mask', 'input_ids', 'loss_mask', 'positions', 'targets'], (8, 128))
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil

import grain
import numpy as np
import tensorflow_datasets as tfds

from peftjax.data import instructions as inst
from peftjax.data import packing
from peftjax.data import pipeline
from peftjax.data.builders import split_indices
from peftjax.data.lm_builders import KNOWN_LM
from peftjax.data.pipeline import DataError
from peftjax.validate import check_data_dir

PACKINGS = ('pack', 'bucket', 'none')
BUCKET_POOL = 16  # bucketing sorts pools of 16 batches by length: similar lengths, still random
_PROMPT_MULTIPLE = 8  # eval_prompts pads prompts to a multiple of 8: few distinct shapes


@dataclasses.dataclass(frozen=True)
class LMDataInfo:
  """What the model and the loop need to know about an LM dataset."""
  name: str
  kind: str  # 'lm'
  splits: dict[str, int]  # split -> records stored (plain text may give several rows' worth)
  max_length: int  # tokens per row
  packing: str  # 'pack' | 'bucket' | 'none'
  exact_match: bool  # records have completions: generation is scored by exact match
  num_classes: int = 0  # the classification fields, empty, so shared code can read them
  class_names: tuple[str, ...] = ()
  image_shape: tuple[int, ...] | None = None


# ---------------------------------------------------------------------------- sources


def _prepare(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """A bundled LM builder prepared in ``data_dir``: built once, under the encoder's file lock
  (same protocol as :func:`peftjax.data.pipeline._prepare_known`)."""
  make = lambda: KNOWN_LM[name](data_dir=data_dir, file_format='array_record')
  builder = make()
  if builder.is_prepared():
    return builder
  os.makedirs(data_dir, exist_ok=True)
  with pipeline._file_lock(pathlib.Path(data_dir) / f'.{name}.lock'):
    builder = make()
    if not builder.is_prepared():
      for stale in (pathlib.Path(data_dir) / name).glob('incomplete.*'):
        shutil.rmtree(stale)
      builder.download_and_prepare(download_config=pipeline._DOWNLOAD_CONFIG)
  return builder


def load_lm_source(name: str, split: str, data_dir: str | None = None):
  """The random-access TFDS source of one split of a bundled LM builder (built on first use).

  >>> load_lm_source('hamlet_text', 'test')[0]['text'][:20]  # doctest: +SKIP
  b'...'
  """
  if name not in KNOWN_LM:
    raise DataError(f'{name!r} is not a bundled LM dataset; valid: {sorted(KNOWN_LM)}')
  return pipeline._split_source(_prepare(name, data_dir or pipeline.default_data_dir()), split)


def _valid_names() -> str:
  return (f'one of {sorted(KNOWN_LM)} (built on first use), a .jsonl file, a directory of '
          '<split>.jsonl files, or a TFDS dataset prepared in array_record format with '
          'prompt/completion or text features')


def _tfds_records(builder, cfg, splits) -> dict[str, list[inst.Record]]:
  features = builder.info.features
  keys = set(features.keys())
  pk, ck, tk = cfg.get('prompt_key', 'prompt'), cfg.get('completion_key', 'completion'), (
      cfg.get('text_key', 'text'))
  is_text = lambda k: k in keys and isinstance(features[k], tfds.features.Text)
  if not ((is_text(pk) and is_text(ck)) or is_text(tk)):
    raise DataError(f'data.prompt_key={pk!r} / data.completion_key={ck!r} / data.text_key={tk!r}'
                    f' name no Text features of {builder.name!r}; valid: Text features among '
                    f'{sorted(keys)} (prompt and completion, or text)')
  out = {}
  for split in splits:
    src = pipeline._split_source(builder, split)
    rows = src.__getitems__(list(range(len(src))))
    out[split] = [inst.from_features(r, f'{builder.name}/{split}[{i}]', prompt_key=pk,
                                     completion_key=ck, text_key=tk) for i, r in enumerate(rows)]
  return out


def _jsonl_records(path: pathlib.Path) -> dict[str, list[inst.Record]]:
  if path.is_dir():
    files = sorted(path.glob('*.jsonl'))
    if not files:
      raise DataError(f'data.name={str(path)!r} is a directory with no .jsonl files; valid: '
                      'files named <split>.jsonl (train.jsonl, validation.jsonl, test.jsonl)')
    return {f.stem: inst.read_jsonl(f) for f in files}
  records = inst.read_jsonl(path)
  # The builders' split; each split keeps the file's order (as TFDS stores the bundled splits).
  return {split: [records[i] for i in sorted(idx)]
          for split, idx in split_indices(len(records)).items()}


def _open(cfg):
  """(name, builder or None, records by split or None) for ``cfg.name``."""
  name = cfg.name
  data_dir = cfg.data_dir or pipeline.default_data_dir()
  if name in KNOWN_LM:
    return name, _prepare(name, data_dir), None
  path = pathlib.Path(os.path.expanduser(name))
  if name.endswith('.jsonl') or path.is_dir():
    if not path.exists():
      raise DataError(f'data.name={name!r} is invalid: no such file; valid: {_valid_names()}')
    return path.stem, None, _jsonl_records(path)
  try:
    return name, pipeline._prepared_other(name, data_dir), None
  except DataError as e:
    raise DataError(f'data.name={name!r} is invalid ({e}); valid: {_valid_names()}') from None


# ---------------------------------------------------------------------------- LMData


def _grain_seed(seed: int, salt: str) -> int:
  """grain's shuffle seed for one use of the run seed: 'examples' (the packing order, the
  bucketed epochs), 'rows' (packed rows per epoch), 'buckets' (batch order). Hashed so that
  run seed 1 does not replay run seed 0's second epoch (grain reseeds epoch e with seed + e)."""
  digest = hashlib.sha256(f'peftjax-lm:{salt}:{seed}'.encode()).digest()
  return int.from_bytes(digest[:4], 'little')


def _host_rows(batch: dict, index: int, count: int) -> dict:
  """This process's contiguous rows of a global batch (every key has the batch as lead axis)."""
  size = len(batch['input_ids' if 'input_ids' in batch else 'prompt_ids']) // count
  return {k: v[index * size:(index + 1) * size] for k, v in batch.items()}


def _pad_to(indices: list, size: int) -> tuple[list, np.ndarray]:
  """``indices`` filled up to ``size`` by repeating the last (real content, finite logits), and
  the weights (1 real, 0 repeated)."""
  real = len(indices)
  return list(indices) + [indices[-1]] * (size - real), (np.arange(size) < real).astype(
      np.float32)


class LMData:
  """A tokenized LM dataset: packed or bucketed causal-LM batches; prompts for generation.

  Train/eval batches hold int32 ``input_ids``, ``attention_mask`` (segment ids, 0 = pad),
  ``positions``, ``targets`` and float32 ``loss_mask`` (see :mod:`peftjax.data.packing`), all
  (B, T); eval batches add float32 ``weight`` (B,). ``T`` is ``data.max_length``, or with
  ``data.packing='bucket'`` the smallest bucket length holding the batch's longest example.
  """

  def __init__(self, name: str, records: dict, cfg, tokenizer):
    packing_mode = cfg.get('packing', 'pack')
    if packing_mode not in PACKINGS:
      raise DataError(f'data.packing={packing_mode!r} is invalid; valid: '
                      + ', '.join(map(repr, PACKINGS)))
    max_length = cfg.max_length
    if not isinstance(max_length, int) or max_length < 2:
      raise DataError(f'data.max_length={max_length!r} is invalid; valid: an integer >= 2')
    for field in ('train_split', 'eval_split', 'test_split'):
      value = cfg.get(field, '')
      if field == 'eval_split' and not value:
        continue
      if value not in records:
        raise DataError(f'data.{field}={value!r} is invalid; valid: {sorted(records)} (splits '
                        f'of {name!r})')
    self._cfg, self.tokenizer = cfg, tokenizer
    self.pad_id = int(tokenizer.pad_id if getattr(tokenizer, 'pad_id', None) is not None
                      else tokenizer.eos_id)
    self._records = records
    self.buckets = packing.bucket_lengths(max_length, tuple(cfg.get('buckets', ()) or ()))
    used = {cfg.train_split, cfg.test_split} | ({cfg.eval_split} if cfg.get('eval_split') else
                                                set())
    self._encoded = {s: self._encode(s) for s in sorted(used)}  # every error before compute
    has_completion = [r.kind != 'text' for split in used for r in records[split]]
    self.info = LMDataInfo(
        name=name, kind='lm', splits={k: len(v) for k, v in records.items()},
        max_length=max_length, packing=packing_mode,
        exact_match=bool(has_completion) and all(has_completion))
    self._plans: dict = {}

  # -------------------------------------------------------------------------- examples

  def num_examples(self, split: str) -> int:
    """Records of ``split`` that batches draw from (after ``max_*_examples``)."""
    if split not in self._records:
      raise DataError(f'split {split!r} is invalid; valid: {sorted(self._records)}')
    limit = self._cfg.get('max_train_examples', -1) if split == self._cfg.train_split else (
        self._cfg.get('max_eval_examples', -1))
    n = len(self._records[split])
    return n if limit < 0 else min(n, limit)

  def _encode(self, split: str) -> list[inst.Encoded]:
    records = self._records[split][:self.num_examples(split)]
    return inst.encode_records(
        records, self.tokenizer, max_length=self._cfg.max_length,
        chat_template=self._cfg.get('chat_template', True),
        truncation=self._cfg.get('truncation', 'error'))

  def examples(self, split: str) -> list[inst.Encoded]:
    """The tokenized examples of ``split`` in stored order (plain text: its pieces)."""
    if split not in self._encoded:
      self.num_examples(split)  # an unknown split: DataError
      self._encoded[split] = self._encode(split)
    return self._encoded[split]

  def lengths(self, split: str) -> np.ndarray:
    """Tokens (prompt + completion) of each example of ``split``."""
    return np.array([len(e) for e in self.examples(split)], np.int64)

  # -------------------------------------------------------------------------- plans

  @staticmethod
  def _order(n: int, seed: int, epoch: int, salt: str = 'examples') -> list[int]:
    """Epoch ``epoch`` of grain's shuffle of ``range(n)`` seeded by (``seed``, ``salt``)."""
    ds = grain.MapDataset.range(n).shuffle(seed=_grain_seed(seed, salt)).repeat()
    return [int(ds[epoch * n + j]) for j in range(n)]

  def _pack_rows(self, split: str, seed: int | None) -> list[list[int]]:
    """Rows of example indices: best-fit in the seed's shuffled order (train) or in stored
    order (``seed=None``: evaluation). Cached."""
    key = ('pack', split, seed)
    if key not in self._plans:
      lengths = self.lengths(split)
      order = None if seed is None else self._order(len(lengths), seed, 0)
      self._plans[key] = packing.best_fit(lengths, self._cfg.max_length, order)
    return self._plans[key]

  def _epoch_batches(self, split: str, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each batch of one train epoch (bucket / none). Cached per epoch."""
    key = ('epoch', split, batch_size, seed, epoch)
    if key not in self._plans:
      for old in [k for k in self._plans if k[0] == 'epoch' and k[4] < epoch - 1]:
        del self._plans[old]  # keep two epochs: memory stays flat over long runs
      lengths = self.lengths(split)
      order = self._order(len(lengths), seed, epoch)
      if self.info.packing == 'bucket':
        batches = packing.bucket_batches(lengths, order, batch_size, BUCKET_POOL)
        shuffle = self._order(len(batches), seed, epoch, salt='buckets')
        batches = [batches[k] for k in shuffle]
      else:
        batches = [order[k:k + batch_size]
                   for k in range(0, len(order) - batch_size + 1, batch_size)]
      self._plans[key] = batches
    return self._plans[key]

  def _row_length(self, split: str, indices) -> int:
    if self.info.packing != 'bucket':
      return self._cfg.max_length
    return packing.bucket_for(int(max(self.lengths(split)[list(indices)])), self.buckets)

  def _collate_examples(self, split: str, indices) -> dict:
    ex = self.examples(split)
    return packing.collate([[ex[i]] for i in indices], self._row_length(split, indices),
                           self.pad_id)

  def _collate_rows(self, split: str, rows, row_ids) -> dict:
    ex = self.examples(split)
    return packing.collate([[ex[i] for i in rows[r]] for r in row_ids], self._cfg.max_length,
                           self.pad_id)

  # -------------------------------------------------------------------------- batches

  def train_batches(self, batch_size: int, seed: int, *, process_index: int | None = None,
                    process_count: int | None = None) -> grain.MapDataset:
    """Infinite, random-access training batches: ``ds[i]`` is a pure function of (seed, i).

    ``pack``: the train examples, in the seed's shuffled order, are best-fit packed into rows
    once; each epoch is a fresh shuffle of the rows cut into full batches (as :class:`Data`
    does with examples). ``bucket``: each epoch is a shuffle of the examples, sorted by length
    within pools of 16 batches, the batches shuffled; a batch is padded to its bucket length.
    ``none``: shuffled examples padded to ``max_length``. ``batch_size`` is global (rows);
    each process gets its contiguous rows.

    >>> ds = data.train_batches(8, seed=0)  # doctest: +SKIP
    >>> ds[500]['input_ids'].shape           # doctest: +SKIP
    (8, 128)
    """
    split = self._cfg.train_split
    if self.info.packing == 'pack':
      rows = self._pack_rows(split, seed)
      hosts = pipeline._hosts(batch_size, process_index, process_count, limit=len(rows))
      return (grain.MapDataset.range(len(rows))
              .shuffle(seed=_grain_seed(seed, 'rows'))
              .batch(batch_size, drop_remainder=True)
              .repeat()
              .map(lambda ids: _host_rows(self._collate_rows(split, rows, ids), *hosts)))
    n = len(self.examples(split))
    hosts = pipeline._hosts(batch_size, process_index, process_count, limit=n)
    per_epoch = n // batch_size

    def batch(i, _):
      indices = self._epoch_batches(split, batch_size, seed, i // per_epoch)[i % per_epoch]
      return _host_rows(self._collate_examples(split, indices), *hosts)

    return grain.MapDataset.range(1).repeat().map_with_index(batch)

  def _eval_plan(self, split: str, batch_size: int) -> list[tuple[list, int]]:
    """(rows of example indices, row length) of each eval batch, before filling the last."""
    if self.info.packing == 'pack':
      rows = self._pack_rows(split, None)
    else:
      lengths = self.lengths(split)
      order = range(len(lengths))
      if self.info.packing == 'bucket':  # sorted by length: little padding, exact all the same
        order = sorted(order, key=lambda i: int(lengths[i]))
      rows = [[i] for i in order]
    batches = [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
    return [(b, self._row_length(split, [i for row in b for i in row])) for b in batches]

  def eval_batches(self, split: str, batch_size: int, *, process_index: int | None = None,
                   process_count: int | None = None) -> grain.MapDataset:
    """Every example of ``split`` once, in full batches of ``batch_size`` rows with ``weight``.

    Rows are packed in stored order (``pack``), one example each in stored order (``none``) or
    sorted by length (``bucket``). The last batch is filled by repeating its last row with
    weight 0 (real tokens, so the model's outputs stay finite).

    >>> batches = data.eval_batches('test', 16)                        # doctest: +SKIP
    >>> sum(b['loss_mask'][b['weight'] > 0].sum() for b in batches)   # doctest: +SKIP
    2550.0
    """
    if not self.examples(split):
      raise DataError(f'split {split!r} of {self.info.name!r} has no examples to evaluate')
    hosts = pipeline._hosts(batch_size, process_index, process_count)
    plan = self._eval_plan(split, batch_size)
    ex = self.examples(split)

    def make(k):
      rows, length = plan[k]
      rows, weight = _pad_to(rows, batch_size)
      batch = packing.collate([[ex[i] for i in row] for row in rows], length, self.pad_id)
      batch['weight'] = weight
      return _host_rows(batch, *hosts)

    return grain.MapDataset.range(len(plan)).map(make)

  def eval_prompts(self, split: str, batch_size: int, *, process_index: int | None = None,
                   process_count: int | None = None, by_length: bool = False,
                   limit: int = -1) -> grain.MapDataset:
    """Prompts of ``split`` for generation (the first ``limit`` in stored order; -1: all), in
    that order or, with ``by_length``, shortest first (a batch then pads little, and prefill is
    compute-bound), ``batch_size`` per batch.

    Each batch: int32 ``prompt_ids`` (B, P) right-padded with ``pad_id`` (P = the split's
    longest prompt rounded up to a multiple of 8: one shape per split), int32 ``prompt_lengths``
    (B,), float32 ``weight`` (0 on the rows repeated to fill the last batch) and
    ``references``, a list of the B answer strings for :func:`peftjax.tasks.causal_lm.exact_match`.

    >>> b = data.eval_prompts('test', 16)[0]  # doctest: +SKIP
    >>> b['prompt_ids'].shape, b['references'][:2]  # doctest: +SKIP
    ((16, 112), ['positive', 'negative'])
    """
    if not self.info.exact_match:
      raise DataError(f'data {self.info.name!r} is plain text: it has no completions to '
                      'generate (its metric is perplexity); valid: instruction data')
    ex = self.examples(split)
    if not ex:
      raise DataError(f'split {split!r} of {self.info.name!r} has no examples')
    hosts = pipeline._hosts(batch_size, process_index, process_count)
    longest = max(len(e.prompt_ids) for e in ex)
    width = -(-longest // _PROMPT_MULTIPLE) * _PROMPT_MULTIPLE

    n = len(ex) if limit < 0 else min(limit, len(ex))
    order = (np.argsort([len(e.prompt_ids) for e in ex[:n]], kind='stable') if by_length
             else np.arange(n))

    def make(indices):
      indices, weight = _pad_to([int(order[int(i)]) for i in indices], batch_size)
      ids = np.full((batch_size, width), self.pad_id, np.int32)
      lengths = np.zeros(batch_size, np.int32)
      for r, i in enumerate(indices):
        p = ex[i].prompt_ids
        ids[r, :len(p)], lengths[r] = p, len(p)
      return _host_rows({'prompt_ids': ids, 'prompt_lengths': lengths, 'weight': weight,
                         'references': [ex[i].reference for i in indices]}, *hosts)

    return grain.MapDataset.range(n).batch(batch_size).map(make)

  def max_completion_length(self, split: str) -> int:
    """The longest completion of ``split`` in tokens (end-of-turn included): a bound for
    ``max_new_tokens`` when generating for exact match."""
    return max(len(e.completion_ids) for e in self.examples(split))

  def padding_fraction(self, batch_size: int, seed: int = 0, split: str | None = None) -> float:
    """The share of padding slots in one epoch of ``train_batches(batch_size, seed)`` (or, with
    ``split``, in ``eval_batches(split, batch_size)`` before filling the last batch).

    >>> data.padding_fraction(8)  # doctest: +SKIP
    0.031
    """
    lengths = self.lengths(split or self._cfg.train_split)
    if split is not None:
      return packing.planned_padding(lengths, self._eval_plan(split, batch_size))
    split = self._cfg.train_split
    if self.info.packing == 'pack':
      rows = self._pack_rows(split, seed)
      order = self._order(len(rows), seed, 0, salt='rows')
      full = len(rows) // batch_size * batch_size
      used = [rows[r] for r in order[:full]]
      return packing.planned_padding(lengths, [(used, self._cfg.max_length)])
    batches = self._epoch_batches(split, batch_size, seed, 0)
    return packing.planned_padding(
        lengths, [([[i] for i in b], self._row_length(split, b)) for b in batches])


def build_lm(data_cfg, tokenizer) -> LMData:
  """The :class:`LMData` of ``data_cfg`` (``config.data``) tokenized with ``tokenizer`` (an
  :class:`peftjax.data.lm_tokenizer.LMTokenizer` or anything with its ``encode``, ``eos_id``,
  ``pad_id``, ``bos_id`` and ``apply_chat_template``).

  Fields read beyond the encoder's: ``packing`` ('pack' | 'bucket' | 'none', default 'pack'),
  ``buckets`` (bucket lengths, default four steps up to ``max_length``), ``chat_template``
  (default True), ``truncation`` ('error' | 'left', default 'error'), ``prompt_key`` /
  ``completion_key`` (default 'prompt' / 'completion').

  >>> data = build_lm(config.data, tokenizer)  # doctest: +SKIP
  >>> data.info.splits                         # doctest: +SKIP
  {'test': 1275, 'train': 10202, 'validation': 1275}
  """
  check_data_dir(data_cfg.data_dir)
  name, builder, records = _open(data_cfg)
  if builder is not None:
    splits = [s for s in builder.info.splits]
    records = _tfds_records(builder, data_cfg, splits)
  return LMData(name, records, data_cfg, tokenizer)
