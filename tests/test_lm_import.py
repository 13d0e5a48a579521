"""Decoder-LM import: the GGUF reader (the bundled SmolLM2 and small files written with
gguf.GGUFWriter), q/k un-permutation, the tokenizer against transformers' ids and chat strings
(tests/fixtures/lm), HF directories in and out, and one clear error for each bad input."""
import json
import pathlib

import numpy as np
import pytest

from peftjax.data.lm_tokenizer import ChatTemplateError
from peftjax.data.lm_tokenizer import LMTokenizer
from peftjax.data.lm_tokenizer import TokenizerError
from peftjax.data.lm_tokenizer import VocabMismatchError
from peftjax.errors import UserInputError
from peftjax.models import gguf_file
from peftjax.models import hf_llama
from peftjax.models.gguf_file import GGUFError
from peftjax.models.hf_llama import HFCheckpointError
from peftjax.models.llama import LlamaConfig
from peftjax.models.llama_convert import WeightsError
from peftjax.models.llama_convert import expected_shapes

gguf = pytest.importorskip('gguf')

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'lm' / 'smollm2_reference.npz'


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(FIXTURE))


@pytest.fixture(scope='module')
def smollm2():
  """(path, header, config, state, tokenizer metadata) of the bundled GGUF, read once."""
  path = gguf_file.smollm2_gguf()
  config, state, tok = gguf_file.load_gguf(path)
  return path, gguf_file.read_header(path), config, state, tok


@pytest.fixture(scope='module')
def tok(smollm2):
  return LMTokenizer.from_gguf_metadata(smollm2[4])


# ------------------------------------------------------------------------------ tiny GGUF files

TINY_HF = {'model_type': 'llama', 'vocab_size': 262, 'hidden_size': 64, 'intermediate_size': 128,
           'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
           'head_dim': 16, 'rms_norm_eps': 1e-5, 'rope_theta': 10000.0,
           'max_position_embeddings': 128, 'tie_word_embeddings': True}
SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
MERGED = [('h', 'e'), ('l', 'l'), ('Ġ', 'w')]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_chars():
  """GPT-2's 256 byte characters, built independently of the module under test."""
  printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
  chars, n = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + n))
      n += 1
  return chars


def _tiny_tokens():
  tokens = SPECIALS + _byte_chars() + [a + b for a, b in MERGED]
  types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
  return tokens, types, [f'{a} {b}' for a, b in MERGED]


def _interleave(w, n_heads):
  """llama.cpp's row order, written out row by row: head h's GGUF row 2i is HF row i, row 2i+1
  is HF row i + d/2 (the pairs its interleaved RoPE rotates)."""
  d = w.shape[0] // n_heads
  out = np.empty_like(w)
  for h in range(n_heads):
    for i in range(d // 2):
      out[h * d + 2 * i] = w[h * d + i]
      out[h * d + 2 * i + 1] = w[h * d + i + d // 2]
  return out


def _tiny_state(hf, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=s).astype(np.float32)
          for k, s in expected_shapes(LlamaConfig.from_hf(hf)).items()}


_TO_GGUF = {'model.embed_tokens.weight': 'token_embd.weight',
            'model.norm.weight': 'output_norm.weight', 'lm_head.weight': 'output.weight'}
_LAYER_TO_GGUF = {'input_layernorm.weight': 'attn_norm.weight',
                  'self_attn.q_proj.weight': 'attn_q.weight',
                  'self_attn.k_proj.weight': 'attn_k.weight',
                  'self_attn.v_proj.weight': 'attn_v.weight',
                  'self_attn.o_proj.weight': 'attn_output.weight',
                  'self_attn.q_proj.bias': 'attn_q.bias', 'self_attn.k_proj.bias': 'attn_k.bias',
                  'self_attn.v_proj.bias': 'attn_v.bias',
                  'post_attention_layernorm.weight': 'ffn_norm.weight',
                  'mlp.gate_proj.weight': 'ffn_gate.weight', 'mlp.up_proj.weight': 'ffn_up.weight',
                  'mlp.down_proj.weight': 'ffn_down.weight'}


def _gguf_name(hf_name):
  if hf_name in _TO_GGUF:
    return _TO_GGUF[hf_name]
  _, _, i, rest = hf_name.split('.', 3)
  return f'blk.{i}.{_LAYER_TO_GGUF[rest]}'


def write_tiny_gguf(path, *, arch='llama', hf=None, state=None, types=None, drop=(), extra=None,
                    meta=None):
  """A small GGUF made with gguf.GGUFWriter from an HF-layout state (q/k interleaved for llama).

  ``types``: GGUF name -> GGMLQuantizationType (default F32); ``drop``: GGUF names left out;
  ``extra``: GGUF name -> array added; ``meta``: key -> value overrides (None removes).
  Returns the HF state written.
  """
  hf = dict(TINY_HF if hf is None else hf)
  state = _tiny_state(hf) if state is None else state
  w = gguf.GGUFWriter(str(path), arch)
  kv = {'block_count': hf['num_hidden_layers'], 'context_length': hf['max_position_embeddings'],
        'embedding_length': hf['hidden_size'], 'feed_forward_length': hf['intermediate_size'],
        'attention.head_count': hf['num_attention_heads'],
        'attention.head_count_kv': hf['num_key_value_heads'],
        'attention.layer_norm_rms_epsilon': hf['rms_norm_eps'],
        'rope.freq_base': hf['rope_theta'], 'rope.dimension_count': hf['head_dim']}
  for k, v in {**kv, **(meta or {})}.items():
    if v is None:
      continue
    full = k if '.' in k and k.split('.')[0] in ('general', 'tokenizer') else f'{arch}.{k}'
    if isinstance(v, str):
      w.add_string(full, v)
    elif isinstance(v, float):
      w.add_float32(full, v)
    else:
      w.add_uint32(full, v)
  tokens, token_types, merges = _tiny_tokens()
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('smollm')
  w.add_token_list(tokens)
  w.add_token_types(token_types)
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(TEMPLATE)
  heads = {'attn_q': hf['num_attention_heads'], 'attn_k': hf['num_key_value_heads']}
  for name, arr in state.items():
    g = _gguf_name(name)
    if g in drop:
      continue
    kind = g.split('.')[-2]
    if arch == 'llama' and kind in heads:
      arr = _interleave(arr, heads[kind])
    qtype = (types or {}).get(g, gguf.GGMLQuantizationType.F32)
    if qtype == gguf.GGMLQuantizationType.F32:
      w.add_tensor(g, np.ascontiguousarray(arr))
    elif qtype == gguf.GGMLQuantizationType.F16:
      w.add_tensor(g, arr.astype(np.float16))
    elif qtype == gguf.GGMLQuantizationType.Q8_1:  # no quantizer: zero blocks of its byte size
      block, size = gguf.GGML_QUANT_SIZES[qtype]
      w.add_tensor(g, np.zeros((arr.shape[0], arr.shape[1] // block * size), np.uint8),
                   raw_dtype=qtype)
    else:
      w.add_tensor(g, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
  for g, arr in (extra or {}).items():
    w.add_tensor(g, arr)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return state


# ------------------------------------------------------------------------------ the bundled GGUF


def test_bundled_gguf_metadata(smollm2):
  path, header, config, _, tok_meta = smollm2
  assert path.name == 'SmolLM2-135M-Instruct.Q4_1.gguf'
  assert header.version == 3 and len(header.tensors) == 272
  assert config == {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': 49152,
      'hidden_size': 576, 'intermediate_size': 1536, 'num_hidden_layers': 30,
      'num_attention_heads': 9, 'num_key_value_heads': 3, 'head_dim': 64,
      'rms_norm_eps': float(np.float32(1e-5)), 'rope_theta': 100000.0, 'rope_scaling': None,
      'max_position_embeddings': 8192, 'tie_word_embeddings': True, 'attention_bias': False,
      'mlp_bias': False, 'hidden_act': 'silu', 'bos_token_id': 1, 'eos_token_id': 2,
      'pad_token_id': 2}
  assert header.metadata['general.architecture'] == 'llama'
  assert header.metadata['general.file_type'] == 3  # mostly Q4_1
  assert tok_meta['model'] == 'gpt2' and tok_meta['pre'] == 'smollm'
  assert len(tok_meta['tokens']) == 49152 and len(tok_meta['merges']) == 48900
  assert tok_meta['token_type'].count(3) == 17 and tok_meta['token_type'].count(1) == 49135
  assert tok_meta['tokens'][:3] == SPECIALS
  assert (tok_meta['bos_token_id'], tok_meta['eos_token_id'], tok_meta['unknown_token_id'],
          tok_meta['padding_token_id'], tok_meta['add_bos_token']) == (1, 2, 0, 2, False)
  assert tok_meta['chat_template'].startswith('{% for message in messages %}')
  types = {t.type_name for t in header.tensors.values()}
  assert types == {'Q8_0', 'Q4_1', 'F32'}
  assert header.tensors['token_embd.weight'].type_name == 'Q8_0'
  assert header.tensors['blk.7.attn_q.weight'].type_name == 'Q4_1'
  assert header.tensors['blk.7.ffn_norm.weight'].type_name == 'F32'


def test_bundled_gguf_state(smollm2, ref):
  _, _, config, state, _ = smollm2
  want = expected_shapes(LlamaConfig.from_hf(config))
  assert len(want) == 272 and 'lm_head.weight' not in want  # tied
  assert {k: v.shape for k, v in state.items()} == want
  assert all(v.dtype == np.float32 for v in state.values())
  assert all(np.isfinite(v).all() for v in state.values())
  # Un-permuted as transformers un-permutes: per-row sums of layer 0's q/k (a wrong order
  # permutes these rows).
  np.testing.assert_allclose(state['model.layers.0.self_attn.q_proj.weight'].sum(1),
                             ref['layer0_q_row_sums'], atol=2e-5)
  np.testing.assert_allclose(state['model.layers.0.self_attn.k_proj.weight'].sum(1),
                             ref['layer0_k_row_sums'], atol=2e-5)


def test_header_matches_what_gguf_writer_wrote(tmp_path):
  """Every GGUF value type, read back exactly as gguf.GGUFWriter wrote it."""
  p = tmp_path / 'kinds.gguf'
  w = gguf.GGUFWriter(str(p), 'llama')
  w.add_uint8('t.u8', 200)
  w.add_int8('t.i8', -100)
  w.add_uint16('t.u16', 60000)
  w.add_int16('t.i16', -30000)
  w.add_uint32('t.u32', 4_000_000_000)
  w.add_int32('t.i32', -2_000_000_000)
  w.add_uint64('t.u64', 2**63 + 5)
  w.add_int64('t.i64', -(2**62))
  w.add_float32('t.f32', 0.1)
  w.add_float64('t.f64', 0.1)
  w.add_bool('t.bool', True)
  w.add_string('t.str', 'naïve ✓')
  w.add_array('t.strs', ['a', '', 'ß' * 3])
  w.add_array('t.ints', [1, -2, 3])
  w.add_array('t.floats', [0.5, -1.25])
  w.add_tensor('x', np.arange(6, dtype=np.float32).reshape(2, 3))
  w.add_tensor('y', np.ones((4, 32), np.float16))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  h = gguf_file.read_header(p)
  m = h.metadata
  assert (m['t.u8'], m['t.i8'], m['t.u16'], m['t.i16'], m['t.u32'], m['t.i32'], m['t.u64'],
          m['t.i64']) == (200, -100, 60000, -30000, 4_000_000_000, -2_000_000_000, 2**63 + 5,
                          -(2**62))
  assert m['t.f32'] == float(np.float32(0.1)) and m['t.f64'] == 0.1
  assert m['t.bool'] is True and m['t.str'] == 'naïve ✓'
  assert m['t.strs'] == ['a', '', 'ßßß'] and m['t.ints'] == [1, -2, 3]
  assert m['t.floats'] == [0.5, -1.25] and m['general.architecture'] == 'llama'
  assert h.tensors['x'].shape == (2, 3) and h.tensors['x'].type_name == 'F32'
  assert h.tensors['y'].shape == (4, 32) and h.tensors['y'].nbytes == 4 * 32 * 2
  # The tensor table and offsets agree with gguf's own reader.
  r = gguf.GGUFReader(p)
  for t in r.tensors:
    assert h.tensors[t.name].offset == t.data_offset
    assert h.tensors[t.name].shape == tuple(int(d) for d in reversed(t.shape))


# ------------------------------------------------------------------------------ q/k layout


def test_unpermute_inverts_llama_cpp_interleaving():
  rng = np.random.default_rng(0)
  for heads, d, cols in ((1, 4, 3), (4, 16, 5), (3, 64, 2)):
    w = rng.normal(size=(heads * d, cols)).astype(np.float32)
    gguf_rows = _interleave(w, heads)
    np.testing.assert_array_equal(gguf_file.unpermute_rope_rows(gguf_rows, heads), w)
    np.testing.assert_array_equal(gguf_file.permute_rope_rows(w, heads), gguf_rows)
    bias = w[:, 0].copy()
    np.testing.assert_array_equal(gguf_file.unpermute_rope_rows(_interleave(bias[:, None],
                                                                            heads)[:, 0], heads),
                                  bias)


def test_tiny_llama_gguf_round_trip(tmp_path):
  """HF weights written as llama.cpp would (q/k interleaved) come back exactly, k with the KV
  head count."""
  p = tmp_path / 'tiny.gguf'
  state = write_tiny_gguf(p)
  config, got, tok_meta = gguf_file.load_gguf(p)
  assert config['num_key_value_heads'] == 2 and config['vocab_size'] == 262
  assert set(got) == set(state)
  for k in state:
    np.testing.assert_array_equal(got[k], state[k], err_msg=k)
  tok = LMTokenizer.from_gguf_metadata(tok_meta)
  assert tok.encode('hello world') == [tok.token_to_id(t) for t in
                                       ('he', 'll', 'o', 'Ġw', 'o', 'r', 'l', 'd')]
  assert tok.encode('<|im_start|>hi') == [1, tok.token_to_id('h'), tok.token_to_id('i')]


def test_tiny_quantized_gguf_dequantizes_as_gguf_does(tmp_path):
  Q = gguf.GGMLQuantizationType
  types = {'token_embd.weight': Q.Q8_0, 'blk.0.attn_q.weight': Q.Q4_1,
           'blk.0.attn_k.weight': Q.Q4_0, 'blk.1.ffn_down.weight': Q.Q5_1,
           'blk.0.ffn_up.weight': Q.Q5_0, 'blk.0.ffn_gate.weight': Q.BF16,
           'blk.1.attn_v.weight': Q.F16}
  hf = dict(TINY_HF)
  p = tmp_path / 'q.gguf'
  state = write_tiny_gguf(p, hf=hf, types=types)
  _, got, _ = gguf_file.load_gguf(p)
  heads = {'attn_q': 4, 'attn_k': 2}
  for name, arr in state.items():
    g = _gguf_name(name)
    kind = g.split('.')[-2]
    stored = _interleave(arr, heads[kind]) if kind in heads else arr
    if g in types and types[g] == Q.F16:
      want = stored.astype(np.float16).astype(np.float32)
    elif g in types:
      want = gguf.quants.dequantize(gguf.quants.quantize(stored, types[g]), types[g])
    else:
      want = stored
    if kind in heads:
      want = _interleave_inverse(want, heads[kind])
    np.testing.assert_array_equal(got[name], want, err_msg=name)
    if g in types and types[g] != Q.F16:
      assert 0 < np.abs(got[name] - arr).max() < 0.5 * np.abs(arr).max()  # really quantized


def _interleave_inverse(w, n_heads):
  d = w.shape[0] // n_heads
  out = np.empty_like(w)
  for h in range(n_heads):
    for i in range(d // 2):
      out[h * d + i] = w[h * d + 2 * i]
      out[h * d + i + d // 2] = w[h * d + 2 * i + 1]
  return out


def test_qwen2_gguf_has_biases_and_no_permutation(tmp_path):
  hf = dict(TINY_HF, model_type='qwen2', attention_bias=True, tie_word_embeddings=False)
  p = tmp_path / 'qwen.gguf'
  state = write_tiny_gguf(p, arch='qwen2', hf=hf, state=_tiny_state(hf))
  config, got, _ = gguf_file.load_gguf(p)
  assert config['model_type'] == 'qwen2' and config['attention_bias'] is True
  assert config['tie_word_embeddings'] is False and config['use_sliding_window'] is False
  assert 'lm_head.weight' in got and 'model.layers.1.self_attn.k_proj.bias' in got
  for k in state:
    np.testing.assert_array_equal(got[k], state[k], err_msg=k)


# ------------------------------------------------------------------------------ GGUF bad input


def _raises(exc, match, fn, *args, **kwargs):
  with pytest.raises(exc) as info:
    fn(*args, **kwargs)
  msg = str(info.value)
  assert '\n' not in msg
  for m in ([match] if isinstance(match, str) else match):
    assert m in msg, msg
  return msg


def test_not_a_gguf_file(tmp_path):
  p = tmp_path / 'config.json'
  p.write_text('{"model_type": "llama"}')
  _raises(GGUFError, ['is not a GGUF file', "b'{\"mo'"], gguf_file.load_gguf, p)
  empty = tmp_path / 'empty.gguf'
  empty.write_bytes(b'')
  _raises(GGUFError, 'is not a GGUF file', gguf_file.read_header, empty)
  _raises(GGUFError, 'is a directory', gguf_file.load_gguf, tmp_path)
  _raises(GGUFError, 'does not exist', gguf_file.load_gguf, tmp_path / 'nope.gguf')


def test_truncated_gguf(smollm2, tmp_path):
  src = smollm2[0]
  size = src.stat().st_size
  for cut in (20, 300_000, size // 2, size - 1):  # in the counts, the vocabulary, the tensors
    p = tmp_path / f'cut{cut}.gguf'
    with open(src, 'rb') as f:
      p.write_bytes(f.read(cut))
    msg = _raises(GGUFError, ['truncated GGUF file', str(cut)], gguf_file.load_gguf, p)
    assert 'fetch it again' in msg


def test_unsupported_version(tmp_path):
  p = tmp_path / 'v1.gguf'
  p.write_bytes(b'GGUF' + (1).to_bytes(4, 'little') + bytes(16))
  _raises(GGUFError, ['GGUF version 1', 'supported versions: 2, 3'], gguf_file.load_gguf, p)
  p.write_bytes(b'GGUF' + (3).to_bytes(4, 'big') + bytes(16))
  _raises(GGUFError, 'big-endian', gguf_file.load_gguf, p)


def test_unsupported_architecture(tmp_path):
  p = tmp_path / 'gpt2.gguf'
  write_tiny_gguf(p, arch='gpt2')
  _raises(GGUFError, ["architecture 'gpt2' is not supported", 'supported: llama, qwen2'],
          gguf_file.load_gguf, p)


def test_unsupported_quantization_type(tmp_path):
  p = tmp_path / 'q81.gguf'
  # Q8_1 is a GGUF block type (32 values in 40 bytes) that gguf.quants cannot dequantize.
  write_tiny_gguf(p, types={'blk.1.attn_output.weight': gguf.GGMLQuantizationType.Q8_1})
  _raises(GGUFError, ["tensor 'blk.1.attn_output.weight'", 'quantization type Q8_1',
                      'supported: F32, F16, BF16, Q4_0'], gguf_file.load_gguf, p)


def test_missing_and_unknown_tensors(tmp_path):
  p = tmp_path / 'missing.gguf'
  write_tiny_gguf(p, drop=('blk.1.ffn_up.weight',))
  _raises(GGUFError, ['1 tensors are missing', "'blk.1.ffn_up.weight'"], gguf_file.load_gguf, p)
  p = tmp_path / 'unknown.gguf'
  write_tiny_gguf(p, extra={'blk.0.attn_sinks.weight': np.ones(4, np.float32)})
  _raises(GGUFError, ['not part of a llama model', 'blk.0.attn_sinks.weight'],
          gguf_file.load_gguf, p)
  p = tmp_path / 'freqs.gguf'
  write_tiny_gguf(p, extra={'rope_freqs.weight': np.ones(8, np.float32)})
  _raises(GGUFError, ["'rope_freqs.weight'", 'Llama 3.1'], gguf_file.load_gguf, p)


def test_metadata_that_contradicts_the_tensors(tmp_path):
  p = tmp_path / 'heads.gguf'
  write_tiny_gguf(p, meta={'attention.head_count_kv': 4})
  _raises(GGUFError, ["tensor 'blk.0.attn_k.weight' has shape (32, 64)", '(64, 64)'],
          gguf_file.load_gguf, p)
  p = tmp_path / 'noeps.gguf'
  write_tiny_gguf(p, meta={'attention.layer_norm_rms_epsilon': None})
  _raises(GGUFError, "'llama.attention.layer_norm_rms_epsilon' is missing", gguf_file.load_gguf, p)
  p = tmp_path / 'yarn.gguf'
  write_tiny_gguf(p, meta={'rope.scaling.type': 'yarn'})
  _raises(GGUFError, ["rope.scaling.type='yarn'", "supported: 'none', 'linear'"],
          gguf_file.load_gguf, p)
  p = tmp_path / 'linear.gguf'
  write_tiny_gguf(p, meta={'rope.scaling.type': 'linear', 'rope.scaling.factor': 4.0})
  assert gguf_file.load_gguf(p).config['rope_scaling'] == {'rope_type': 'linear', 'factor': 4.0}


# ------------------------------------------------------------------------------ the tokenizer


def _case_ids(ref):
  off = np.concatenate([[0], np.cumsum(ref['tokenizer_case_lengths'])])
  return [ref['tokenizer_case_ids'][a:b].tolist() for a, b in zip(off[:-1], off[1:])]


def test_tokenizer_ids_equal_transformers(tok, ref):
  cases = [str(s) for s in ref['tokenizer_cases']]
  want = _case_ids(ref)
  assert len(cases) == 15
  for s, ids in zip(cases, want):
    assert tok.encode(s) == ids, s
  assert tok.encode_batch(cases) == want
  for i, n in enumerate(ref['lengths']):
    assert tok.encode(str(ref['texts'][i])) == ref['input_ids'][i, :n].tolist()
  for ids, text, raw in zip(want, ref['tokenizer_case_decoded'], ref['tokenizer_case_decoded_raw']):
    assert tok.decode(ids) == str(text)
    assert tok.decode(ids, skip_special_tokens=False) == str(raw)
  # No BOS/EOS for this model (add_bos_token false), as transformers' GGUF tokenizer.
  assert tok.encode('Hello world', add_special_tokens=True) == [19556, 905]
  assert tok.encode('Hello world') == [19556, 905]


def test_tokenizer_special_tokens(tok):
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
      '<|im_start|>', '<|im_end|>', '<|im_end|>', '<|endoftext|>')
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
  assert tok.special_ids == list(range(17))
  assert tok.decode([1, 19556, 2, 3], skip_special_tokens=True) == 'Hello'


def test_chat_template_equals_transformers(tok, ref):
  n_plain = sum(str(n).startswith('plain_') for n in ref['names'])
  for j, (messages, gen) in enumerate(zip(ref['chat_messages'], ref['chat_add_generation_prompt'])):
    got = tok.apply_chat_template(json.loads(str(messages)), add_generation_prompt=bool(gen))
    assert got == str(ref['texts'][n_plain + j])
  assert bool(ref['chat_add_generation_prompt'][0]) and got.endswith('<|im_end|>\n')


def test_chat_template_features():
  """transformers' environment: trim/lstrip blocks, loop controls, tojson keeping non-ASCII,
  raise_exception, special tokens as variables, {% generation %} blocks."""
  tokens, types, merges = _tiny_tokens()
  # trim_blocks drops the newline after a block tag, lstrip_blocks the spaces before one (not
  # before an expression); the expected string is what transformers 5.25 renders.
  template = ("{{ bos_token }}{% for m in messages %}\n    {% if m.role == 'skip' %}{% continue %}"
              "{% endif %}\n  {{ m | tojson }}\n"
              "{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
              "{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}")
  tok = LMTokenizer.from_gguf_metadata({'model': 'gpt2', 'pre': 'smollm', 'tokens': tokens,
                                        'token_type': types, 'merges': merges, 'bos_token_id': 1,
                                        'eos_token_id': 2, 'chat_template': template})
  got = tok.apply_chat_template([{'role': 'user', 'content': 'é'},
                                 {'role': 'skip', 'content': 'x'}])
  assert got == '<|im_start|>  {"role": "user", "content": "é"}\n[é]'
  _raises(ChatTemplateError, ['refused the conversation', 'too long'], tok.apply_chat_template,
          [{'role': 'user', 'content': 'a'}] * 3)
  _raises(ChatTemplateError, ['messages[1] has role=None', 'needs a role'],
          tok.apply_chat_template, [{'role': 'user', 'content': 'a'}, {'content': 'b'}])
  _raises(ChatTemplateError, ['messages[0]', "content=None"], tok.apply_chat_template,
          [{'role': 'user', 'content': None}])
  _raises(ChatTemplateError, 'non-empty list', tok.apply_chat_template, [])


def test_pre_tokenizer_kinds():
  tokens, types, merges = _tiny_tokens()
  base = {'model': 'gpt2', 'tokens': tokens, 'token_type': types, 'merges': merges}

  def pieces(pre, text):
    t = LMTokenizer.from_gguf_metadata({**base, 'pre': pre}).tokenizer.pre_tokenizer
    return [p for p, _ in t.pre_tokenize_str(text)]

  assert pieces('smollm', 'ab 12345') == ['ab', 'Ġ', '1', '2', '3', '4', '5']
  assert pieces('gpt2', 'ab 12345') == ['ab', 'Ġ12345']
  assert pieces('llama-bpe', 'ab 12345') == ['ab', 'Ġ', '123', '45']
  assert pieces('qwen2', 'ab 12345') == ['ab', 'Ġ', '1', '2', '3', '4', '5']
  _raises(TokenizerError, ["tokenizer.ggml.pre='tekken'", 'supported: default, gpt2'],
          LMTokenizer.from_gguf_metadata, {**base, 'pre': 'tekken'}, 'x.gguf')
  _raises(TokenizerError, ["tokenizer.ggml.model='llama'", 'supported: gpt2'],
          LMTokenizer.from_gguf_metadata, {**base, 'model': 'llama', 'pre': 'default'}, 'x.gguf')


def test_vocab_must_fit_the_embedding(tok):
  tok.check_vocab(49152)
  tok.check_vocab(49216)  # a table padded past the vocabulary is fine
  _raises(VocabMismatchError, ['ids up to 49151', '49152 tokens', '32000 rows'],
          tok.check_vocab, 32000)


def test_tokenizer_save_and_hf_dir_round_trip(tok, tmp_path, ref):
  tok.save(tmp_path / 't')
  assert sorted(p.name for p in (tmp_path / 't').iterdir()) == ['tokenizer.json',
                                                                'tokenizer_config.json']
  back = LMTokenizer.from_hf_dir(tmp_path / 't')
  for s, ids in zip(ref['tokenizer_cases'], _case_ids(ref)):
    assert back.encode(str(s)) == ids
  assert (back.bos_id, back.eos_id, back.pad_id, back.unk_token) == (1, 2, 2, '<|endoftext|>')
  assert back.chat_template == tok.chat_template
  _raises(TokenizerError, 'has no tokenizer.json', LMTokenizer.from_hf_dir, tmp_path)


# ------------------------------------------------------------------------------ HF directories


def _tiny_tok():
  tokens, types, merges = _tiny_tokens()
  return LMTokenizer.from_gguf_metadata({'model': 'gpt2', 'pre': 'smollm', 'tokens': tokens,
                                         'token_type': types, 'merges': merges, 'bos_token_id': 1,
                                         'eos_token_id': 2, 'padding_token_id': 0,
                                         'chat_template': TEMPLATE})


@pytest.mark.parametrize('variant', ['tied', 'untied_biases'])
def test_hf_export_import_round_trip(tmp_path, variant):
  hf = dict(TINY_HF)
  if variant == 'untied_biases':
    hf.update(model_type='qwen2', tie_word_embeddings=False, attention_bias=True,
              use_sliding_window=False, sliding_window=4096)
  state = _tiny_state(hf, seed=3)
  out = hf_llama.export_hf_dir(tmp_path / 'm', hf, state, _tiny_tok())
  assert sorted(p.name for p in out.iterdir()) == [
      'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json',
      'tokenizer_config.json']
  assert [p.name for p in tmp_path.iterdir()] == ['m']  # no temporary directory left beside it
  written = json.loads((out / 'config.json').read_text())
  assert written['architectures'] == ['LlamaForCausalLM'] and written['model_type'] == 'llama'
  assert written['attention_bias'] is (variant == 'untied_biases')
  assert (written['bos_token_id'], written['eos_token_id'], written['pad_token_id']) == (1, 2, 0)
  assert json.loads((out / 'generation_config.json').read_text()) == {
      'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': 0, 'do_sample': False}
  config, back = hf_llama.load_hf_dir(out)
  assert set(back) == set(state)
  for k in state:
    np.testing.assert_array_equal(back[k], state[k], err_msg=k)
  assert LlamaConfig.from_hf(config) == LlamaConfig.from_hf(hf)
  tok = LMTokenizer.from_hf_dir(out)
  assert tok.encode('hello') == _tiny_tok().encode('hello')
  assert tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True) \
      == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'


def test_hf_sharded_and_bfloat16_import(tmp_path):
  import ml_dtypes
  from safetensors.numpy import save_file
  hf = dict(TINY_HF, model_type='mistral', sliding_window=None)
  state = _tiny_state(hf, seed=5)
  d = tmp_path / 'sharded'
  d.mkdir()
  (d / 'config.json').write_text(json.dumps(hf))
  names = sorted(state)
  half = len(names) // 2
  shards = {'model-00001-of-00002.safetensors': names[:half],
            'model-00002-of-00002.safetensors': names[half:]}
  for shard, keys in shards.items():
    # The second shard in bfloat16, as many hub checkpoints are.
    bf16 = shard.startswith('model-00002')
    save_file({k: state[k].astype(ml_dtypes.bfloat16) if bf16 else state[k] for k in keys},
              str(d / shard))
  (d / 'model.safetensors.index.json').write_text(json.dumps(
      {'metadata': {}, 'weight_map': {k: s for s, ks in shards.items() for k in ks}}))
  config, back = hf_llama.load_hf_dir(d)
  assert config['model_type'] == 'mistral'
  for k in names[:half]:
    np.testing.assert_array_equal(back[k], state[k])
  for k in names[half:]:
    assert back[k].dtype == np.float32
    np.testing.assert_array_equal(back[k], state[k].astype(ml_dtypes.bfloat16).astype(np.float32))
  (d / 'model-00002-of-00002.safetensors').unlink()
  _raises(HFCheckpointError, ["lists shard 'model-00002-of-00002.safetensors'", '1 of 2'],
          hf_llama.load_hf_dir, d)


def test_transformers5_rope_parameters_are_read(tmp_path):
  hf = dict(TINY_HF)
  del hf['rope_theta']
  hf['rope_parameters'] = {'rope_theta': 5e5, 'rope_type': 'linear', 'factor': 2.0}
  cfg = hf_llama.normalize_config(hf)
  assert cfg['rope_theta'] == 5e5 and cfg['rope_scaling'] == {'rope_type': 'linear', 'factor': 2.0}
  assert 'rope_parameters' not in cfg


@pytest.mark.parametrize('kind', ['bert', 'gpt2'])
def test_hf_other_model_types_refused(tmp_path, kind):
  d = tmp_path / kind
  d.mkdir()
  (d / 'config.json').write_text(json.dumps({**TINY_HF, 'model_type': kind}))
  _raises(HFCheckpointError, [f'model_type={kind!r} is not supported',
                              'supported: llama, mistral, qwen2'], hf_llama.load_hf_dir, d)


def test_hf_dir_bad_input(tmp_path):
  from safetensors.numpy import save_file
  _raises(HFCheckpointError, 'does not exist', hf_llama.load_hf_dir, tmp_path / 'none')
  _raises(HFCheckpointError, 'has no config.json', hf_llama.load_hf_dir, tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({**TINY_HF, 'hidden_act': 'gelu'}))
  _raises(HFCheckpointError, ["hidden_act='gelu'", "'silu'"], hf_llama.load_hf_dir, tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps(TINY_HF))
  _raises(HFCheckpointError, 'neither model.safetensors', hf_llama.load_hf_dir, tmp_path)
  state = _tiny_state(TINY_HF)
  save_file({**state, 'model.extra.weight': np.ones(3, np.float32)},
            str(tmp_path / 'model.safetensors'))
  _raises(HFCheckpointError, "'model.extra.weight' is not part of a llama model",
          hf_llama.load_hf_dir, tmp_path)
  del state['model.layers.1.mlp.up_proj.weight']
  save_file(state, str(tmp_path / 'model.safetensors'))
  _raises(WeightsError, "'model.layers.1.mlp.up_proj.weight' is missing", hf_llama.load_hf_dir,
          tmp_path)
  (tmp_path / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a"')
  _raises(HFCheckpointError, 'cannot read', hf_llama.load_hf_dir, tmp_path)


def test_export_refuses_bad_input_and_writes_nothing(tmp_path):
  state = _tiny_state(TINY_HF)
  small_vocab = dict(TINY_HF, vocab_size=200)
  # The tokenizer has 262 ids; an embedding of 200 rows cannot hold them.
  _raises(VocabMismatchError, ['ids up to 261', '200 rows'], hf_llama.export_hf_dir,
          tmp_path / 'a', small_vocab, _tiny_state(small_vocab), _tiny_tok())
  bad = dict(state)
  bad['model.norm.weight'] = np.ones(3, np.float32)
  _raises(WeightsError, "'model.norm.weight' has shape (3,)", hf_llama.export_hf_dir,
          tmp_path / 'b', TINY_HF, bad, _tiny_tok())
  _raises(HFCheckpointError, 'sliding_window=4096', hf_llama.export_hf_dir, tmp_path / 'c',
          dict(TINY_HF, model_type='mistral', sliding_window=4096), state, _tiny_tok())
  _raises(HFCheckpointError, "model_type='gpt2'", hf_llama.export_hf_dir, tmp_path / 'd',
          dict(TINY_HF, model_type='gpt2'), state)
  assert list(tmp_path.iterdir()) == []
  # A failure while writing (here: the tokenizer's save) leaves no directory either.
  class Broken:
    bos_id = eos_id = pad_id = None

    def check_vocab(self, rows, field):
      del rows, field

    def save(self, directory):
      raise OSError('disk full')

  with pytest.raises(OSError):
    hf_llama.export_hf_dir(tmp_path / 'e', TINY_HF, state, Broken())
  assert list(tmp_path.iterdir()) == []
  hf_llama.export_hf_dir(tmp_path / 'f', TINY_HF, state)
  _raises(HFCheckpointError, 'already exists', hf_llama.export_hf_dir, tmp_path / 'f', TINY_HF,
          state)
  hf_llama.export_hf_dir(tmp_path / 'f', TINY_HF, _tiny_state(TINY_HF, seed=9), overwrite=True)
  _, back = hf_llama.load_hf_dir(tmp_path / 'f')
  np.testing.assert_array_equal(back['model.norm.weight'],
                                _tiny_state(TINY_HF, seed=9)['model.norm.weight'])


def test_errors_are_user_input_errors():
  for e in (GGUFError, HFCheckpointError, TokenizerError, VocabMismatchError, ChatTemplateError):
    assert issubclass(e, UserInputError)
