"""Rows of tokens for the causal LM: greedy packing with segment ids, or length buckets.

A row of length ``T`` holds one or more examples (segments) side by side, then padding. The
arrays of a batch (the contract with ``peftjax.models.llama``), all (B, T):

* ``input_ids`` int32: the examples' tokens, ``pad_id`` after them;
* ``attention_mask`` int32: segment ids, 1, 2, ... per example in the row, 0 on padding; a token
  attends only to earlier tokens of its own segment;
* ``positions`` int32: 0, 1, ... restarting at each segment (0 on padding);
* ``targets`` int32: the next token of the same segment, ``pad_id`` where there is none (a
  segment's last token, padding);
* ``loss_mask`` float32: 1 where ``targets`` is a completion token, so an example of ``p`` prompt
  and ``c`` completion tokens has exactly ``c`` ones, at its positions ``p - 1 .. p + c - 2``.

>>> rows = best_fit([5, 3, 4], capacity=8)
>>> rows
[[0, 1], [2]]
"""
from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np

KEYS = ('input_ids', 'attention_mask', 'positions', 'targets', 'loss_mask')


def best_fit(lengths: Sequence[int], capacity: int, order: Sequence[int] | None = None
             ) -> list[list[int]]:
  """Greedy best-fit packing: each example (taken in ``order``, default ``0..n-1``) goes into
  the open row with the least room that still fits it, else a new row.

  Deterministic: ties go to the row opened first. Every row's total is <= ``capacity``; rows
  list their examples in the order they were placed. Raises ``ValueError`` for an example longer
  than ``capacity`` (the instruction encoder has already refused or truncated those).

  >>> best_fit([6, 2, 3, 5], capacity=8)
  [[0, 1], [2, 3]]
  """
  order = range(len(lengths)) if order is None else order
  rows: list[list[int]] = []
  free: list[tuple[int, int]] = []  # (room left, row id), sorted
  for i in order:
    n = int(lengths[i])
    if n > capacity:
      raise ValueError(f'example {i} has {n} tokens, more than the row length {capacity}')
    k = bisect.bisect_left(free, (n, -1))  # the smallest room >= n, first-opened on ties
    if k < len(free):
      room, row = free.pop(k)
      rows[row].append(int(i))
    else:
      room, row = capacity, len(rows)
      rows.append([int(i)])
    if room - n > 0:
      bisect.insort(free, (room - n, row))
  return rows


def collate(rows: Sequence[Sequence], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """The batch arrays of ``rows``: each row a sequence of examples with ``prompt_ids`` and
  ``completion_ids`` (:class:`peftjax.data.instructions.Encoded`), laid out left to right.

  >>> batch = collate([[enc_a, enc_b], [enc_c]], length=128, pad_id=2)  # doctest: +SKIP
  >>> batch['attention_mask'][0, :len(enc_a) + 1]                        # doctest: +SKIP
  array([1, 1, ..., 1, 2], dtype=int32)
  """
  b = len(rows)
  out = {'input_ids': np.full((b, length), pad_id, np.int32),
         'attention_mask': np.zeros((b, length), np.int32),
         'positions': np.zeros((b, length), np.int32),
         'targets': np.full((b, length), pad_id, np.int32),
         'loss_mask': np.zeros((b, length), np.float32)}
  for r, examples in enumerate(rows):
    at = 0
    for s, ex in enumerate(examples, start=1):
      p, c = len(ex.prompt_ids), len(ex.completion_ids)
      n = p + c
      if at + n > length:
        raise ValueError(f'row {r} holds {at + n} tokens, more than its length {length}')
      ids = np.concatenate([ex.prompt_ids, ex.completion_ids])
      out['input_ids'][r, at:at + n] = ids
      out['attention_mask'][r, at:at + n] = s
      out['positions'][r, at:at + n] = np.arange(n)
      out['targets'][r, at:at + n - 1] = ids[1:]
      # Position t predicts token t+1: completion token j (at p + j) is scored at p + j - 1.
      out['loss_mask'][r, at + p - 1:at + n - 1] = 1.0
      at += n
  return out


def padding_fraction(attention_mask) -> float:
  """The share of a batch's (or many batches') slots that are padding (segment id 0).

  >>> padding_fraction(np.array([[1, 1, 2, 0], [1, 0, 0, 0]]))
  0.5
  """
  mask = np.asarray(attention_mask)
  return float((mask == 0).sum() / mask.size) if mask.size else 0.0


def planned_padding(lengths: Sequence[int], batches: Sequence[tuple[Sequence, int]]) -> float:
  """The padding fraction of a batch plan without building it: ``batches`` is a list of
  (rows, row length), each row a list of example indices into ``lengths``.

  >>> planned_padding([3, 5, 8], [([[0, 1], [2]], 8)])
  0.0
  """
  used = sum(int(lengths[i]) for rows, _ in batches for row in rows for i in row)
  slots = sum(len(rows) * t for rows, t in batches)
  return float(1 - used / slots) if slots else 0.0


def bucket_lengths(max_length: int, buckets: Sequence[int] = ()) -> tuple[int, ...]:
  """The row lengths of length bucketing: ``buckets`` (sorted, ending at ``max_length``), or by
  default four steps of ``max_length / 4`` rounded up to a multiple of 8 (one compile each).

  >>> bucket_lengths(128)
  (32, 64, 96, 128)
  """
  if buckets:
    out = sorted({int(b) for b in buckets if 0 < int(b) < max_length} | {max_length})
    return tuple(out)
  step = -(-max_length // 4)
  return tuple(sorted({min(max_length, -(-step * k // 8) * 8) for k in (1, 2, 3, 4)}))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket length >= ``n``.

  >>> bucket_for(33, (32, 64, 96, 128))
  64
  """
  k = bisect.bisect_left(buckets, n)
  if k == len(buckets):
    raise ValueError(f'{n} tokens do not fit the largest bucket {buckets[-1]}')
  return buckets[k]


def bucket_batches(lengths: Sequence[int], order: Sequence[int], batch_size: int, pool: int = 16
                   ) -> list[list[int]]:
  """Batches of similar lengths: ``order`` is cut into pools of ``pool * batch_size`` examples,
  each pool sorted by length (stable) and cut into full batches; the batches keep pool order
  (the caller shuffles batches if it wants). The remainder (< ``batch_size``) is dropped.

  >>> bucket_batches([5, 1, 4, 2], [0, 1, 2, 3], batch_size=2, pool=2)
  [[1, 3], [2, 0]]
  """
  order = list(order)
  size = pool * batch_size
  out = []
  for start in range(0, len(order), size):
    chunk = sorted(order[start:start + size], key=lambda i: int(lengths[i]))
    out.extend(chunk[k:k + batch_size] for k in range(0, len(chunk) - batch_size + 1, batch_size))
  return out
