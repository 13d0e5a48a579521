"""Entropy coding for Deep Compression: canonical Huffman codes, relative indices, real sizes.

* :func:`code_lengths` / :func:`build_code` make a *canonical* Huffman code over the alphabet
  ``0..n_symbols-1``: the code is fully determined by the code length of each symbol, so storing a
  code table costs one byte (the length) per alphabet symbol. :func:`encode` packs symbols into
  bytes (MSB first) with numpy; :func:`decode` inverts it exactly.
* :func:`relative_index` stores a pruned leaf's sparse structure as in Han et al. (2016): per
  stored entry, the number of pruned positions skipped since the previous one, in ``gap_bits``
  bits; a run longer than ``2^gap_bits - 1`` gets *filler* entries (explicit zeros).
  :func:`from_relative_index` inverts it.
* :func:`compressed_size` counts the real bytes of a model after
  :func:`peftjax.compress.share.share` (and/or pruning): Huffman-coded cluster indices and gaps,
  codebooks, code tables and the untouched leaves at 32 bits, per leaf and in total.

>>> cb = build_code([0, 0, 0, 1, 2])
>>> data, n_bits = encode([0, 0, 0, 1, 2], cb)
>>> n_bits, decode(data, n_bits, cb).tolist()
(7, [0, 0, 0, 1, 2])
"""
from __future__ import annotations

import array
import dataclasses
import heapq
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from peftjax import tree
from peftjax.compress import share as share_lib
from peftjax.errors import ConfigError
from peftjax.errors import UserInputError

PyTree = Any

# decode reads a code from one 64-bit word taken at a byte boundary, after shifting out up to 7
# bits; a Huffman code that long needs over 1e12 symbols (Fibonacci-like counts), so this bound
# never binds in practice.
MAX_CODE_LENGTH = 57
TABLE_BITS_PER_SYMBOL = 8  # a canonical code table stores one length byte per alphabet symbol
VALUE_BITS = 32  # centroids, untouched leaves and the values of sparse unshared leaves: float32
_DECODE_CHUNK = 1 << 20  # bits whose code lengths are computed at once (bounds decode's memory)


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
  """A canonical prefix code over the symbols ``0..n_symbols-1``.

  Attributes:
    lengths: uint8 ``(n_symbols,)``, the code length of each symbol; 0 = symbol absent.
    codes: uint64 ``(n_symbols,)``, each symbol's code as an integer (its ``length`` low bits are
      the code, most significant bit sent first); 0 for absent symbols.
  """
  lengths: np.ndarray
  codes: np.ndarray

  @classmethod
  def from_lengths(cls, lengths) -> 'Codebook':
    """The canonical code with these lengths (what a decoder rebuilds from a stored table).

    Codes are assigned in order of (length, symbol), each the previous one plus one, shifted
    left when the length grows.

    >>> Codebook.from_lengths([1, 2, 2]).codes.tolist()
    [0, 2, 3]
    """
    lengths = np.asarray(lengths)
    if lengths.ndim != 1 or (lengths.size and (lengths.min() < 0 or
                                               lengths.max() > MAX_CODE_LENGTH)):
      raise UserInputError(f'code lengths must be a 1-D array of integers in 0..'
                           f'{MAX_CODE_LENGTH}, got {lengths!r}')
    lengths = lengths.astype(np.uint8)
    present = lengths[lengths > 0].astype(np.int64)
    # Kraft: a prefix code with these lengths exists iff sum 2^-l <= 1 (exact, in integers).
    if present.size and int(np.sum(1 << (MAX_CODE_LENGTH - present))) > 1 << MAX_CODE_LENGTH:
      raise UserInputError('code lengths violate the Kraft inequality (sum of 2^-length > 1); '
                           'no prefix code has them')
    codes = np.zeros(lengths.size, np.uint64)
    code, prev = 0, 0
    for s in np.lexsort((np.arange(lengths.size), lengths)):
      n = int(lengths[s])
      if n == 0:
        continue
      code <<= n - prev
      codes[s] = code
      code, prev = code + 1, n
    return cls(lengths, codes)

  @property
  def n_symbols(self) -> int:
    """Size of the alphabet (including absent symbols)."""
    return int(self.lengths.size)

  @property
  def table_bits(self) -> int:
    """Bits to store this code: one length byte per alphabet symbol."""
    return TABLE_BITS_PER_SYMBOL * self.n_symbols

  def bits_for(self, counts) -> int:
    """Encoded length in bits of a stream with these symbol ``counts``.

    >>> build_code(counts=[3, 1, 1]).bits_for([3, 1, 1])
    7
    """
    counts = np.asarray(counts, np.int64)
    if np.any(counts[self.lengths == 0] > 0):
      raise UserInputError('counts include symbols that have no code in this codebook')
    return int(np.sum(counts * self.lengths.astype(np.int64)))


def code_lengths(freqs) -> np.ndarray:
  """Huffman code lengths (uint8) for symbol frequencies ``freqs`` (0 = absent, no code).

  Optimal: ``sum(freqs * lengths)`` is minimal among prefix codes. With a single present symbol
  its length is 1 (a code needs at least one bit per symbol). Ties merge the lower (count,
  creation order) first, so the result is deterministic.

  >>> code_lengths([5, 1, 1, 0]).tolist()
  [1, 2, 2, 0]
  """
  f = np.asarray(freqs)
  if f.size == 0:
    f = f.astype(np.int64)  # np.asarray([]) is float64; an empty alphabet is fine
  if (f.ndim != 1 or f.dtype.kind not in 'iuf' or not np.all(np.isfinite(f)) or
      np.any(f < 0)):
    raise UserInputError(f'freqs must be a 1-D array of finite counts >= 0, got {freqs!r}')
  lengths = np.zeros(f.size, np.uint8)
  present = np.flatnonzero(f > 0)
  if present.size <= 1:
    lengths[present] = 1
    return lengths
  m = present.size
  heap = [(f[s].item(), i) for i, s in enumerate(present)]
  heapq.heapify(heap)
  parent = np.zeros(2 * m - 1, np.int64)
  node = m
  while len(heap) > 1:
    wa, a = heapq.heappop(heap)
    wb, b = heapq.heappop(heap)
    parent[a] = parent[b] = node
    heapq.heappush(heap, (wa + wb, node))
    node += 1
  # A parent is created after its children, so walking ids downward from the root visits every
  # parent before its children.
  depth = np.zeros(2 * m - 1, np.int64)
  for i in range(2 * m - 3, -1, -1):
    depth[i] = depth[parent[i]] + 1
  if depth[:m].max() > MAX_CODE_LENGTH:
    raise UserInputError(f'a Huffman code longer than {MAX_CODE_LENGTH} bits is needed; '
                         'the counts are too skewed to encode here')
  lengths[present] = depth[:m]
  return lengths


def _as_symbols(symbols, what: str = 'symbols') -> np.ndarray:
  s = np.asarray(jax.device_get(symbols)).ravel()
  if s.size == 0:
    return s.astype(np.int64)
  if not np.issubdtype(s.dtype, np.integer) or s.min() < 0:
    raise UserInputError(f'{what} must be integers >= 0, got dtype {s.dtype} '
                         f'with min {s.min()}')
  return s.astype(np.int64)


def build_code(symbols=None, *, counts=None, n_symbols: int | None = None) -> Codebook:
  """The canonical Huffman code of a stream of ``symbols`` or of symbol ``counts``.

  Args:
    symbols: integers >= 0 (any shape); their histogram gives the counts.
    counts: alternatively, the count of each symbol ``0..len(counts)-1``.
    n_symbols: alphabet size (default ``max(symbols) + 1``, or ``len(counts)``); it sets the
      size of the code table.

  >>> cb = build_code([3, 3, 1], n_symbols=4)
  >>> cb.lengths.tolist(), cb.codes.tolist()
  ([0, 1, 0, 1], [0, 0, 0, 1])
  >>> build_code(counts=[0, 9]).lengths.tolist()
  [0, 1]
  """
  if (symbols is None) == (counts is None):
    raise UserInputError('build_code takes exactly one of symbols and counts')
  if symbols is not None:
    s = _as_symbols(symbols)
    n = n_symbols if n_symbols is not None else (int(s.max()) + 1 if s.size else 0)
    if s.size and s.max() >= n:
      raise UserInputError(f'symbol {int(s.max())} is outside the alphabet 0..{n - 1} '
                           f'(n_symbols={n_symbols})')
    counts = np.bincount(s, minlength=n)
  else:
    counts = np.asarray(counts)
    n = counts.size if n_symbols is None else n_symbols
    if counts.size > n:
      raise UserInputError(f'{counts.size} counts for n_symbols={n_symbols}')
    counts = np.pad(counts, (0, n - counts.size))
  return Codebook.from_lengths(code_lengths(counts))


def encode(symbols, codebook: Codebook) -> tuple[bytes, int]:
  """Huffman-codes ``symbols`` (flattened): ``(data, n_bits)``, MSB first, zero-padded bytes.

  Vectorised: every bit of the output is computed at once from per-symbol code/length arrays,
  then packed with ``np.packbits``.

  >>> cb = Codebook.from_lengths([1, 2, 2])      # codes 0, 10, 11
  >>> encode([1, 0, 2], cb)
  (b'\\x98', 5)
  """
  s = _as_symbols(symbols)
  if s.size == 0:
    return b'', 0
  known = s < codebook.n_symbols
  known[known] = codebook.lengths[s[known]] > 0
  if not known.all():
    raise UserInputError(f'symbol {int(s[np.argmin(known)])} has no code in this codebook '
                         f'({codebook.n_symbols} symbols, '
                         f'{int(np.sum(codebook.lengths > 0))} with a code)')
  lens = codebook.lengths[s].astype(np.int64)
  n_bits = int(lens.sum())
  starts = np.cumsum(lens) - lens
  # Bit j of symbol i's code (j = 0 first) is bit (len_i - 1 - j) of the code integer.
  rep_len = np.repeat(lens, lens)
  pos = np.arange(n_bits, dtype=np.int64) - np.repeat(starts, lens)
  shift = (rep_len - 1 - pos).astype(np.uint64)
  bits = (np.repeat(codebook.codes[s], lens) >> shift) & np.uint64(1)
  return np.packbits(bits.astype(np.uint8)).tobytes(), n_bits


def _canonical_tables(codebook: Codebook):
  """Per length l = 1..L: left-aligned upper limits, first codes, offsets; sorted symbols."""
  lengths = codebook.lengths.astype(np.int64)
  big = int(lengths.max())
  order = np.lexsort((np.arange(lengths.size), lengths))
  sorted_syms = order[lengths[order] > 0]
  count = np.bincount(lengths, minlength=big + 1)[1:]  # codes of length 1..L
  first = np.zeros(big, np.uint64)
  code = 0
  for l in range(1, big + 1):
    first[l - 1] = code
    code = (code + int(count[l - 1])) << 1
  offset = np.concatenate([[0], np.cumsum(count)[:-1]])
  # Codes of length l, left-aligned to L bits, fill [first_l << (L-l), limit_l): increasing in l.
  shifts = np.array([big - l for l in range(1, big + 1)], np.uint64)
  limit = (first + count.astype(np.uint64)) << shifts
  return big, sorted_syms, first, offset, limit, shifts


def decode(data: bytes, n_bits: int, codebook: Codebook) -> np.ndarray:
  """Decodes :func:`encode`'s output exactly: the symbols as an int64 array.

  Canonical decoding: for a window of the next ``L`` (max code length) bits, the code length is
  the first ``l`` whose left-aligned limit exceeds the window. The lengths at every bit position
  of a chunk are computed with numpy; a plain Python loop then hops from code to code, and the
  symbols at the code starts are looked up vectorised.

  >>> decode(b'\\x98', 5, Codebook.from_lengths([1, 2, 2])).tolist()
  [1, 0, 2]
  """
  buf = np.frombuffer(bytes(data), np.uint8)
  if not isinstance(n_bits, (int, np.integer)) or not 0 <= n_bits <= 8 * buf.size:
    raise UserInputError(f'n_bits={n_bits!r} is invalid for {buf.size} bytes of data; valid: an '
                         f'integer in 0..{8 * buf.size}')
  n_bits = int(n_bits)
  if n_bits == 0:
    return np.zeros(0, np.int64)
  if not np.any(codebook.lengths > 0):
    raise UserInputError(f'cannot decode {n_bits} bits with a codebook that has no codes')
  big, sorted_syms, first, offset, limit, shifts = _canonical_tables(codebook)
  nb = (n_bits + 7) // 8
  padded = np.zeros(nb + 8, np.uint8)
  padded[:nb] = buf[:nb]
  # words[i] = the 64 bits starting at byte i: any code (<= 57 bits) starting at bit p lies in
  # words[p >> 3] once its first p & 7 bits are shifted out.
  words = np.zeros(nb, np.uint64)
  for i in range(8):
    words = (words << np.uint64(8)) | padded[i:i + nb].astype(np.uint64)

  def windows(p):
    p = p.astype(np.uint64)
    return (words[p >> np.uint64(3)] << (p & np.uint64(7))) >> np.uint64(64 - big)

  starts = array.array('q')
  p = 0
  while p < n_bits:
    end = min(p + _DECODE_CHUNK, n_bits)
    # Code length at each position of the chunk (index = L for a window that is no code word:
    # step L + 1 jumps past it, and it is reported below). uint8 + memoryview: fast indexing.
    step = (np.searchsorted(limit, windows(np.arange(p, end)), side='right') + 1).astype(np.uint8)
    view = memoryview(step)
    base = p
    while p < end:
      starts.append(p)
      p += view[p - base]
  pos = np.frombuffer(starts, np.int64)
  w = windows(pos)
  li = np.searchsorted(limit, w, side='right')
  if np.any(li >= big):
    bad = int(pos[np.argmax(li >= big)])
    raise UserInputError(f'invalid data: the bits at position {bad} are no code word of this '
                         'codebook')
  if p != n_bits:
    raise UserInputError(f'invalid data: the last code word ends at bit {p}, past n_bits={n_bits}')
  rank = offset[li] + ((w >> shifts[li]) - first[li]).astype(np.int64)
  return sorted_syms[rank].astype(np.int64)


# ----------------------------------------------------------------------------- relative indices


def check_gap_bits(gap_bits, field: str = 'gap_bits') -> int:
  """Returns ``gap_bits`` if it is an integer in 1..16, else raises :class:`ConfigError`.

  >>> check_gap_bits(5)
  5
  """
  ok = isinstance(gap_bits, (int, np.integer)) and not isinstance(gap_bits, (bool, np.bool_))
  if not ok or not 1 <= gap_bits <= 16:
    raise ConfigError(f'{field}={gap_bits!r} is invalid; valid: an integer in 1..16 (Han et al. '
                      'use 8 for conv and 5 for fully connected layers)')
  return int(gap_bits)


def relative_index(mask_flat, gap_bits: int) -> tuple[np.ndarray, np.ndarray]:
  """Deep Compression's sparse format: per stored entry, the pruned positions skipped before it.

  Kept positions ``p_0 < p_1 < ...`` are stored as gaps ``p_i - p_{i-1} - 1`` (with
  ``p_{-1} = -1``), each in ``gap_bits`` bits, so a gap is at most ``M = 2^gap_bits - 1``. A longer
  run inserts *filler* entries: skip ``M`` positions and store an explicit zero at the next one,
  as often as needed. Trailing pruned positions are not stored (the size is known).

  Args:
    mask_flat: 1-D mask, nonzero = kept.
    gap_bits: 1..16 (Han et al.: 8 for conv, 5 for fully connected layers).

  Returns:
    ``(gaps, filler)``: int64 gaps in ``0..M`` and a bool marking the filler entries, one per
    stored entry (kept positions + fillers). In storage a filler is known by its weight (the
    reserved zero symbol in :func:`compressed_size`), so ``filler`` costs no extra stream.

  >>> gaps, filler = relative_index(np.array([0, 1, 0, 0, 1] + [0] * 10 + [1]), 3)
  >>> gaps.tolist(), filler.tolist()              # the example of Han et al.'s Figure 2
  ([1, 2, 7, 2], [False, False, True, False])
  """
  gap_bits = check_gap_bits(gap_bits)
  m = np.asarray(jax.device_get(mask_flat))
  if m.ndim != 1:
    raise UserInputError(f'mask_flat must be 1-D, got shape {m.shape}; pass mask.ravel()')
  kept = np.flatnonzero(m)
  runs = np.diff(kept, prepend=-1) - 1
  big = (1 << gap_bits) - 1
  # A filler consumes M skipped positions plus its own; the rest (< M + 1) is the real gap.
  n_fill, rest = np.divmod(runs, big + 1)
  per = n_fill + 1
  ends = np.cumsum(per) - 1  # where each real entry lands among all stored entries
  gaps = np.full(int(per.sum()), big, np.int64)
  gaps[ends] = rest
  filler = np.ones(gaps.size, bool)
  filler[ends] = False
  return gaps, filler


def from_relative_index(gaps, filler, size: int) -> np.ndarray:
  """Inverse of :func:`relative_index`: the bool mask of length ``size``.

  >>> from_relative_index([1, 2, 7, 2], [False, False, True, False], 16).nonzero()[0].tolist()
  [1, 4, 15]
  """
  gaps = np.asarray(gaps, np.int64)
  filler = np.asarray(filler, bool)
  if gaps.shape != filler.shape or gaps.ndim != 1:
    raise UserInputError(f'gaps {gaps.shape} and filler {filler.shape} must be 1-D and of the '
                         'same length')
  pos = np.cumsum(gaps + 1) - 1
  if pos.size and (gaps.min() < 0 or pos[-1] >= size):
    raise UserInputError(f'the relative indices reach position {int(pos[-1])}, past size={size}')
  mask = np.zeros(size, bool)
  mask[pos[~filler]] = True
  return mask


# ----------------------------------------------------------------------------- sizes


def _stream_bits(symbols: np.ndarray, n_symbols: int, width: int, huffman: bool) -> tuple[int,
                                                                                           int]:
  """(coded bits, table bits) of one symbol stream; an empty stream stores nothing."""
  if symbols.size == 0:
    return 0, 0
  if not huffman:
    return int(symbols.size) * width, 0
  counts = np.bincount(symbols, minlength=n_symbols)
  cb = Codebook.from_lengths(code_lengths(counts))
  return cb.bits_for(counts), cb.table_bits


def _leaf_size(leaf, mask, gap_bits, huffman) -> dict:
  shared = share_lib.is_shared(leaf)
  shape = np.shape(leaf['indices']) if shared else np.shape(leaf)
  size = int(np.prod(shape))
  r = {'kind': 'dense', 'n_weights': size, 'n_entries': size, 'n_fillers': 0, 'gap_bits': None,
       'index_bits': 0, 'relative_index_bits': 0, 'centroid_bits': 0, 'table_bits': 0,
       'value_bits': 0}
  filler = np.zeros(size, bool)
  if mask is not None:
    if gap_bits is None:
      gap_bits = 8 if len(shape) == 4 else 5  # Han et al.: 8 bits for conv, 5 for fc
    gaps, filler = relative_index(np.asarray(mask).ravel(), gap_bits)
    bits, table = _stream_bits(gaps, 1 << gap_bits, gap_bits, huffman)
    r.update(kind='sparse', gap_bits=int(gap_bits), n_entries=int(gaps.size),
             n_fillers=int(filler.sum()), relative_index_bits=bits, table_bits=table)
  if shared:
    k = int(np.shape(leaf['centroids'])[0])
    idx = np.asarray(jax.device_get(leaf['indices'])).ravel().astype(np.int64)
    if mask is not None:
      # Stored entries in order: the kept weights' clusters, fillers as the extra symbol k
      # (decoded as an exact 0), so the decoder tells fillers from kept weights.
      kept = np.asarray(mask).ravel() != 0
      stream = np.full(filler.size, k, np.int64)
      stream[~filler] = idx[kept]
    else:
      stream = idx
    n_alpha = k + int(r['n_fillers'] > 0)
    bits, table = _stream_bits(stream, n_alpha, max(1, math.ceil(math.log2(n_alpha))), huffman)
    r.update(kind='shared', index_bits=bits, centroid_bits=VALUE_BITS * k,
             table_bits=r['table_bits'] + table)
  else:
    r['value_bits'] = VALUE_BITS * r['n_entries']
  _finish(r, 4 * size)
  return r


_PARTS = ('index_bits', 'relative_index_bits', 'centroid_bits', 'table_bits', 'value_bits')


def _finish(r: dict, float32_bytes: int) -> None:
  r['total_bits'] = sum(r[k] for k in _PARTS)
  # Each coded stream is stored byte-aligned (as encode returns it); the rest are whole bytes.
  r['bytes'] = (-(-r['index_bits'] // 8) + -(-r['relative_index_bits'] // 8) +
                (r['centroid_bits'] + r['table_bits'] + r['value_bits']) // 8)
  r['float32_bytes'] = float32_bytes
  r['ratio'] = float32_bytes / max(r['bytes'], 1)


def compressed_size(params: PyTree, *, masks: PyTree = None, gap_bits: int | None = None,
                    huffman: bool = True) -> dict:
  """The real compressed size of a model, per leaf and in total (Deep Compression's storage).

  Takes :func:`peftjax.compress.share.share`'s output directly (plain parameters work too).
  Per leaf:

  * a shared leaf: its cluster indices (of the stored entries only, when pruned) Huffman-coded,
    ``centroid_bits = 32 * k`` for the codebook, and a code table;
  * a pruned leaf (the shared leaf's ``mask``, or ``masks`` for an unshared leaf): its
    :func:`relative_index` gaps Huffman-coded plus their code table; a filler entry costs a gap
    and a weight (the reserved symbol ``k`` in the index stream, or a float32 0). A dense leaf
    stores no gaps;
  * an unshared leaf: its stored values at 32 bits each (biases, norms, ...).

  Code tables cost one byte per alphabet symbol (``k``, ``k + 1`` with fillers, ``2^gap_bits``)
  for each non-empty stream. ``bytes`` counts each coded stream rounded up to whole bytes.

  Args:
    params: a nested dict, possibly with shared leaves.
    masks: optional pruning masks (sparse tree, nonzero = kept) for unshared leaves; a mask
      given for a shared leaf must equal its stored ``mask``.
    gap_bits: width of a relative index (1..16); default 8 for 4-D (conv) kernels, else 5.
    huffman: False gives the pre-Huffman size: indices at ``ceil(log2(alphabet))`` bits, gaps at
      ``gap_bits`` bits, no code tables.

  Returns:
    ``{'leaves': {path: report}, 'total': totals}``. A report has ``kind`` ('shared', 'sparse',
    'dense'), ``n_weights``, ``n_entries`` (stored entries, fillers included), ``n_fillers``,
    ``gap_bits``, the parts ``index_bits``, ``relative_index_bits``, ``centroid_bits``,
    ``table_bits``, ``value_bits``, and ``total_bits``, ``bytes``, ``float32_bytes`` and
    ``ratio`` (= float32_bytes / bytes). The totals have the sums and the overall ratio.

  >>> s = {'d': {'kernel': {'centroids': np.zeros(2, np.float32),
  ...                       'indices': np.array([0, 0, 0, 1], np.uint8)},
  ...            'bias': np.zeros(2, np.float32)}}
  >>> r = compressed_size(s)
  >>> r['leaves']['d/kernel']['index_bits'], r['leaves']['d/kernel']['bytes']
  (4, 11)
  >>> r['total']['bytes'], r['total']['float32_bytes']
  (19, 24)
  """
  if gap_bits is not None:
    check_gap_bits(gap_bits)
  flat_masks = tree.flatten(masks) if masks is not None else {}
  leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=share_lib.is_shared)
  by_path = {tree.path_str(p): x for p, x in leaves}
  for p in flat_masks:
    if p not in by_path:
      raise UserInputError(f'masks has {p!r}, which is no leaf; closest paths: '
                           f'{tree.closest_paths(p, by_path)}')
  out = {}
  for path, leaf in by_path.items():
    mask = flat_masks.get(path)
    if mask is not None:
      mask = np.asarray(jax.device_get(mask)) != 0
    if share_lib.is_shared(leaf):
      own = leaf.get('mask')
      own = None if own is None else np.asarray(jax.device_get(own)) != 0
      if mask is not None and (own is None or not np.array_equal(own, mask)):
        raise UserInputError(f'masks[{path!r}] differs from the mask stored in its shared leaf; '
                             'pass the masks to share() instead')
      mask = own
    shape = np.shape(leaf['indices']) if share_lib.is_shared(leaf) else np.shape(leaf)
    if mask is not None and mask.shape != tuple(shape):
      raise UserInputError(f'masks[{path!r}] has shape {mask.shape}; the leaf has {tuple(shape)}')
    out[path] = _leaf_size(leaf, mask, gap_bits, huffman)
  total = {k: sum(r[k] for r in out.values()) for k in
           ('n_weights', 'n_entries', 'n_fillers') + _PARTS + ('total_bits', 'bytes',
                                                                 'float32_bytes')}
  total['ratio'] = total['float32_bytes'] / max(total['bytes'], 1)
  return {'leaves': out, 'total': total}


def format_size_report(report: dict) -> str:
  """A readable table of :func:`compressed_size`'s report.

  >>> print(format_size_report(compressed_size({'b': np.zeros(2, np.float32)})))  # doctest: +SKIP
  """
  rows = [f"{'leaf':40s} {'kind':>6s} {'weights':>10s} {'bytes':>10s} {'ratio':>7s}"]
  for path, r in report['leaves'].items():
    rows.append(f"{path:40s} {r['kind']:>6s} {r['n_weights']:10,d} {r['bytes']:10,d} "
                f"{r['ratio']:7.1f}")
  t = report['total']
  rows.append(f"{'total':40s} {'':>6s} {t['n_weights']:10,d} {t['bytes']:10,d} "
              f"{t['ratio']:7.1f}")
  return '\n'.join(rows)
