"""Huffman codes, relative indices, compressed sizes: round trips, optimality, hand counts."""
import heapq
from fractions import Fraction

import numpy as np
import pytest

from peftjax.compress import huffman
from peftjax.compress import share as share_lib
from peftjax.errors import ConfigError

RNG = np.random.default_rng(0)


def _merge_cost(counts):
  """Independent reference: an optimal prefix code costs the sum of all Huffman merge weights."""
  heap = [int(c) for c in counts if c > 0]
  heapq.heapify(heap)
  cost = 0
  while len(heap) > 1:
    merged = heapq.heappop(heap) + heapq.heappop(heap)
    cost += merged
    heapq.heappush(heap, merged)
  return cost


def _round_trip(symbols, **kw):
  cb = huffman.build_code(symbols, **kw)
  data, n_bits = huffman.encode(symbols, cb)
  assert len(data) == (n_bits + 7) // 8
  out = huffman.decode(data, n_bits, cb)
  np.testing.assert_array_equal(out, np.asarray(symbols).ravel())
  return cb, n_bits


# --- codes -----------------------------------------------------------------------------------


@pytest.mark.parametrize('alphabet,p', [(32, 0.3), (256, 0.05), (256, 0.7)])
def test_round_trip_skewed(alphabet, p):
  x = np.minimum(RNG.geometric(p, 50_000) - 1, alphabet - 1).astype(np.uint8)
  cb, n_bits = _round_trip(x, n_symbols=alphabet)
  counts = np.bincount(x, minlength=alphabet)
  assert n_bits == cb.bits_for(counts) == _merge_cost(counts)


def test_round_trip_a_million_symbols():
  # Zipf-like indices over 32 clusters, like a 5-bit shared layer.
  x = np.minimum(RNG.zipf(1.5, 1_000_000) - 1, 31)
  _round_trip(x, n_symbols=32)


def test_empty_input():
  cb = huffman.build_code([])
  assert cb.n_symbols == 0
  assert huffman.encode([], cb) == (b'', 0)
  assert huffman.decode(b'', 0, cb).size == 0
  cb = huffman.build_code(np.zeros(0, np.int64), n_symbols=4)
  assert cb.lengths.tolist() == [0, 0, 0, 0]
  assert huffman.decode(b'', 0, cb).size == 0


def test_single_symbol_alphabet():
  cb, n_bits = _round_trip(np.full(100, 7), n_symbols=8)
  assert cb.lengths.tolist() == [0] * 7 + [1]
  assert n_bits == 100  # one bit per symbol; a code needs at least one
  data, _ = huffman.encode(np.full(100, 7), cb)
  assert data == bytes(13)
  _round_trip([0])


def test_all_256_symbols():
  x = RNG.permutation(np.repeat(np.arange(256), 7))
  cb, n_bits = _round_trip(x)
  assert cb.lengths.tolist() == [8] * 256 and n_bits == 8 * x.size
  # Skewed counts over all 256 symbols: long codes (up to ~20 bits) round-trip too.
  y = np.minimum(RNG.geometric(0.02, 100_000) - 1, 255)
  y[:256] = np.arange(256)
  cb, _ = _round_trip(y)
  assert np.all(cb.lengths > 0)


@pytest.mark.parametrize('seed', range(5))
def test_kraft_equality_entropy_bound_and_optimality(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 300))
  counts = rng.integers(0, 1000, n) * (rng.random(n) < 0.8)
  counts[:2] = [1, 3]  # at least two present symbols
  lengths = huffman.code_lengths(counts)
  assert np.all((lengths > 0) == (counts > 0))
  present = lengths[lengths > 0]
  assert sum(Fraction(1, 2**int(l)) for l in present) == 1  # complete code: Kraft equality
  total = counts.sum()
  p = counts[counts > 0] / total
  entropy = -np.sum(p * np.log2(p))
  mean_len = np.sum(counts * lengths.astype(np.int64)) / total
  assert entropy <= mean_len < entropy + 1
  assert np.sum(counts * lengths.astype(np.int64)) == _merge_cost(counts)


def test_canonical_codes_are_prefix_free_and_consecutive():
  cb = huffman.build_code(counts=[10, 1, 1, 5, 0, 2, 2, 30])
  words = {s: format(int(c), f'0{int(l)}b') for s, (c, l) in
           enumerate(zip(cb.codes, cb.lengths)) if l}
  for a in words.values():
    for b in words.values():
      assert a is b or not b.startswith(a)
  # Canonical: sorted by (length, symbol), each code is the previous plus one (then shifted).
  ordered = sorted(words, key=lambda s: (len(words[s]), s))
  for s, t in zip(ordered, ordered[1:]):
    nxt = (int(words[s], 2) + 1) << (len(words[t]) - len(words[s]))
    assert int(words[t], 2) == nxt
  # A decoder rebuilds the very same code from the lengths alone.
  np.testing.assert_array_equal(huffman.Codebook.from_lengths(cb.lengths).codes, cb.codes)


def test_code_errors():
  cb = huffman.build_code([0, 1, 1])
  with pytest.raises(ValueError, match='symbol 2 has no code'):
    huffman.encode([0, 2], cb)
  with pytest.raises(ValueError, match='exactly one of symbols and counts'):
    huffman.build_code()
  with pytest.raises(ValueError, match=r'n_bits=9 is invalid for 1 bytes'):
    huffman.decode(b'\x00', 9, cb)
  with pytest.raises(ValueError, match='Kraft'):
    huffman.Codebook.from_lengths([1, 1, 1])
  one = huffman.build_code([5, 5])  # the only code word is '0'
  with pytest.raises(ValueError, match='no code word'):
    huffman.decode(b'\x40', 2, one)
  three = huffman.Codebook.from_lengths([1, 2, 2])  # codes 0, 10, 11
  data, n_bits = huffman.encode([1], three)
  assert (data, n_bits) == (b'\x80', 2)
  with pytest.raises(ValueError, match='ends at bit 2, past n_bits=1'):
    huffman.decode(data, 1, three)  # truncated inside a code word
  with pytest.raises(ValueError, match='counts >= 0'):
    huffman.code_lengths([1, -1])


# --- relative indices ------------------------------------------------------------------------


def test_relative_index_paper_example():
  mask = np.zeros(16, bool)
  mask[[1, 4, 15]] = True
  gaps, filler = huffman.relative_index(mask, 3)
  assert gaps.tolist() == [1, 2, 7, 2] and filler.tolist() == [False, False, True, False]
  np.testing.assert_array_equal(huffman.from_relative_index(gaps, filler, 16), mask)


def test_relative_index_needs_several_fillers():
  mask = np.zeros(60, bool)
  mask[[0, 41, 42, 50]] = True  # a run of 40 zeros with 3-bit gaps: 40 = 5 * (7 + 1) + 0
  gaps, filler = huffman.relative_index(mask, 3)
  assert gaps.tolist() == [0, 7, 7, 7, 7, 7, 0, 0, 7]
  assert filler.tolist() == [False] + [True] * 5 + [False] * 3
  np.testing.assert_array_equal(huffman.from_relative_index(gaps, filler, 60), mask)


@pytest.mark.parametrize('gap_bits,density', [(1, 0.3), (3, 0.05), (5, 0.01), (8, 0.001),
                                              (5, 1.0), (5, 0.0)])
def test_relative_index_round_trip(gap_bits, density):
  mask = RNG.random(20_000) < density
  gaps, filler = huffman.relative_index(mask, gap_bits)
  assert gaps.min(initial=0) >= 0 and gaps.max(initial=0) <= 2**gap_bits - 1
  assert (~filler).sum() == mask.sum()
  np.testing.assert_array_equal(huffman.from_relative_index(gaps, filler, mask.size), mask)


def test_relative_index_errors():
  with pytest.raises(ConfigError, match='gap_bits=0 is invalid; valid: an integer in 1..16'):
    huffman.relative_index(np.ones(4), 0)
  with pytest.raises(ValueError, match='past size=4'):
    huffman.from_relative_index([1, 3], [False, False], 4)


# --- compressed sizes ------------------------------------------------------------------------


def _hand_model():
  mask = np.zeros(16, bool)
  mask[[0, 1, 2, 12]] = True
  indices = np.zeros(16, np.uint8)
  indices[2] = 1  # kept clusters, in order: 0, 0, 1, 0
  kernel = {'centroids': np.array([-0.5, 0.5], np.float32),
            'indices': indices.reshape(4, 4), 'mask': mask.reshape(4, 4)}
  return {'layer': {'kernel': kernel, 'bias': np.zeros(3, np.float32)}}


def test_compressed_size_hand_computed():
  r = huffman.compressed_size(_hand_model(), gap_bits=2)
  k = r['leaves']['layer/kernel']
  # gap_bits=2 (M=3): kept 0, 1, 2, 12 -> gaps 0, 0, 0, then a run of 9 = 2 fillers (3, 3) + 1.
  # Gap counts {0: 3, 1: 1, 3: 2} -> lengths 1, 2, 2 -> 3 + 2 + 4 = 9 bits; table 4 symbols.
  # Index stream 0, 0, 1, F, F, 0 (F = filler symbol 2): counts {0: 3, 1: 1, 2: 2} -> 9 bits;
  # table 3 symbols. Centroids 2 x 32.
  assert (k['kind'], k['n_weights'], k['n_entries'], k['n_fillers']) == ('shared', 16, 6, 2)
  assert (k['index_bits'], k['relative_index_bits'], k['centroid_bits'], k['table_bits'],
          k['value_bits']) == (9, 9, 64, 32 + 24, 0)
  assert k['total_bits'] == 138
  assert k['bytes'] == 2 + 2 + 8 + 4 + 3 and k['float32_bytes'] == 64
  b = r['leaves']['layer/bias']
  assert (b['kind'], b['total_bits'], b['bytes'], b['float32_bytes']) == ('dense', 96, 12, 12)
  assert r['total']['bytes'] == 31 and r['total']['float32_bytes'] == 76
  assert r['total']['ratio'] == pytest.approx(76 / 31)
  # The counted bits are what encode really produces.
  gaps, _ = huffman.relative_index(_hand_model()['layer']['kernel']['mask'].ravel(), 2)
  assert huffman.encode(gaps, huffman.build_code(gaps, n_symbols=4))[1] == 9


def test_compressed_size_without_huffman_and_sparse_unshared_leaf():
  masks = {'layer': {'bias': np.array([1.0, 0.0, 1.0], np.float32)}}
  r = huffman.compressed_size(_hand_model(), masks=masks, gap_bits=2, huffman=False)
  k = r['leaves']['layer/kernel']
  # 6 entries: indices at ceil(log2(2 + 1 filler symbol)) = 2 bits, gaps at 2 bits, no tables.
  assert (k['index_bits'], k['relative_index_bits'], k['table_bits']) == (12, 12, 0)
  assert k['bytes'] == 2 + 2 + 8
  b = r['leaves']['layer/bias']
  # Kept 0 and 2: gaps 0, 1 at 2 bits; two float32 values.
  assert (b['kind'], b['relative_index_bits'], b['value_bits'], b['bytes']) == (
      'sparse', 4, 64, 1 + 8)
  r = huffman.compressed_size(_hand_model(), masks=masks, gap_bits=2)
  b = r['leaves']['layer/bias']
  assert (b['relative_index_bits'], b['table_bits'], b['bytes']) == (2, 32, 1 + 4 + 8)


def test_compressed_size_takes_share_output():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((128, 64)).astype(np.float32)
  mask = rng.random(w.shape) < 0.1
  params = {'fc': {'kernel': w, 'bias': np.zeros(64, np.float32)},
            'fc2': {'kernel': rng.standard_normal((64, 8)).astype(np.float32)}}
  shared = share_lib.share(params, bits=5, targets='kernel$', masks={'fc': {'kernel': mask}})
  r = huffman.compressed_size(shared)
  fc, fc2 = r['leaves']['fc/kernel'], r['leaves']['fc2/kernel']
  assert fc['gap_bits'] == 5 and fc['n_entries'] == mask.sum() + fc['n_fillers']
  assert fc['n_fillers'] > 0  # runs of > 31 pruned weights occur at 10% density
  assert fc2['relative_index_bits'] == 0 and fc2['n_entries'] == 64 * 8  # dense: no gaps
  assert fc2['table_bits'] == 32 * 8 and fc2['index_bits'] <= 5 * 64 * 8
  assert r['total']['float32_bytes'] == 4 * (128 * 64 + 64 + 64 * 8)
  assert r['total']['bytes'] == sum(x['bytes'] for x in r['leaves'].values())
  # The counted bits are those of the real streams, rebuilt here from the shared leaf.
  gaps, filler = huffman.relative_index(mask.ravel(), 5)
  stream = np.full(gaps.size, 32)
  stream[~filler] = np.asarray(shared['fc']['kernel']['indices']).ravel()[mask.ravel()]
  for symbols, n, bits in ((stream, 33, fc['index_bits']), (gaps, 32, fc['relative_index_bits'])):
    cb = huffman.build_code(symbols, n_symbols=n)
    data, n_bits = huffman.encode(symbols, cb)
    assert n_bits == bits
    np.testing.assert_array_equal(huffman.decode(data, n_bits, cb), symbols)
  assert fc['table_bits'] == 8 * (33 + 32) and fc['centroid_bits'] == 32 * 32
  assert fc['ratio'] > 20  # 10% kept, < 5 bits per index and per gap
  with pytest.raises(ValueError, match='differs from the mask stored'):
    huffman.compressed_size(shared, masks={'fc': {'kernel': ~mask}})
  with pytest.raises(ValueError, match='no leaf'):
    huffman.compressed_size(shared, masks={'fc': {'kernal': mask}})
