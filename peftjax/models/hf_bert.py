"""Import a Hugging Face BERT-format directory (``config.json`` + ``model.safetensors``).

The import is exact: every tensor the encoder needs must be present with the expected shape,
and the result matches sentence-transformers' outputs to 1e-4 (tests/test_models.py). Reading
uses ``safetensors.numpy``, so no torch is needed. BERT's pooler (``pooler.dense``, the tanh
layer on [CLS] that ``BertForSequenceClassification`` feeds its classifier) is read separately
by :func:`load_pooler`, for ``model.pooling='cls_pooler'``.

A directory used as ``model.pretrained`` must hold :data:`REQUIRED_FILES`;
:func:`check_model_dir` says which one is missing before anything else happens.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from peftjax.errors import UserInputError
from peftjax.models.bert import BertConfig
from peftjax.tree import unflatten

# What a directory given as model.pretrained must hold: the architecture, the weights, and the
# tokenizer the data pipeline reads (ids must be the ones the embeddings were trained on).
REQUIRED_FILES = ('config.json', 'model.safetensors', 'tokenizer.json')
# The tokenizer files an HF directory may carry (tokenizer.json is the one peftjax reads; the
# others let transformers' AutoTokenizer load the directory as it loaded the source).
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'vocab.txt',
                   'special_tokens_map.json')
POOLER_TENSORS = ('pooler.dense.weight', 'pooler.dense.bias')
# The bundled encoder's name on the Hugging Face hub (its config.json names the checkpoint it was
# distilled from instead).
BUNDLED_HUB_ID = 'sentence-transformers/all-MiniLM-L6-v2'
_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[\w.-]+$')


class CheckpointError(UserInputError):
  """A model directory that cannot be imported; the message says what is wrong."""


def read_config(model_dir: str | pathlib.Path, **overrides) -> BertConfig:
  """Reads a HF ``config.json`` into a :class:`BertConfig`; ``overrides`` replace fields.

  >>> cfg = read_config(minilm_dir(), num_layers=3)  # doctest: +SKIP
  """
  model_dir = pathlib.Path(model_dir)
  path = model_dir / 'config.json'
  if not path.is_file():
    raise CheckpointError(f'model directory {str(model_dir)!r} has no config.json '
                          '(expected a Hugging Face BERT-format directory)')
  hf = json.loads(path.read_text())
  if hf.get('model_type', 'bert') != 'bert':
    raise CheckpointError(f"{path}: model_type={hf.get('model_type')!r}; only 'bert' is supported")
  act = hf.get('hidden_act', 'gelu')
  if act != 'gelu':
    raise CheckpointError(f"{path}: hidden_act={act!r}; supported: 'gelu' (exact erf GELU)")
  pos = hf.get('position_embedding_type', 'absolute')
  if pos != 'absolute':
    raise CheckpointError(f"{path}: position_embedding_type={pos!r}; supported: 'absolute'")
  cfg = BertConfig(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
      intermediate_size=hf['intermediate_size'], max_position=hf['max_position_embeddings'],
      type_vocab_size=hf.get('type_vocab_size', 2), layer_norm_eps=hf.get('layer_norm_eps', 1e-12),
      dropout_rate=hf.get('hidden_dropout_prob', 0.1),
      attention_dropout_rate=hf.get('attention_probs_dropout_prob', 0.1))
  fields = {f for f in BertConfig.__dataclass_fields__}
  bad = sorted(set(overrides) - fields)
  if bad:
    raise ValueError(f'unknown BertConfig fields {bad}; valid: {sorted(fields)}')
  if overrides.get('num_layers', 0) > cfg.num_layers:
    raise ValueError(f"model.num_layers={overrides['num_layers']} but the checkpoint has only "
                     f'{cfg.num_layers} layers')
  return BertConfig(**{**cfg.__dict__, **overrides})


def _expected_shapes(cfg: BertConfig) -> dict[str, tuple]:
  d, f = cfg.hidden_size, cfg.intermediate_size
  shapes = {
      'embeddings.word_embeddings.weight': (cfg.vocab_size, d),
      'embeddings.position_embeddings.weight': (cfg.max_position, d),
      'embeddings.token_type_embeddings.weight': (cfg.type_vocab_size, d),
      'embeddings.LayerNorm.weight': (d,), 'embeddings.LayerNorm.bias': (d,),
  }
  for i in range(cfg.num_layers):
    p = f'encoder.layer.{i}.'
    for n in ('query', 'key', 'value'):
      shapes[p + f'attention.self.{n}.weight'] = (d, d)
      shapes[p + f'attention.self.{n}.bias'] = (d,)
    shapes.update({
        p + 'attention.output.dense.weight': (d, d), p + 'attention.output.dense.bias': (d,),
        p + 'attention.output.LayerNorm.weight': (d,), p + 'attention.output.LayerNorm.bias': (d,),
        p + 'intermediate.dense.weight': (f, d), p + 'intermediate.dense.bias': (f,),
        p + 'output.dense.weight': (d, f), p + 'output.dense.bias': (d,),
        p + 'output.LayerNorm.weight': (d,), p + 'output.LayerNorm.bias': (d,),
    })
  return shapes


def _normalize_names(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strips a ``bert.`` prefix and maps old ``gamma``/``beta`` LayerNorm names."""
  out = {}
  for k, v in raw.items():
    k = k[len('bert.'):] if k.startswith('bert.') else k
    k = re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', k)
    k = re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', k)
    out[k] = v
  return out


def convert(cfg: BertConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
  """HF tensors -> the ``encoder`` parameter tree of :class:`~peftjax.models.bert.BertEncoder`.

  Torch ``Linear`` stores ``(out, in)``; flax kernels are ``(in, out)``, with the per-head
  projections split into ``(embed, heads, head_dim)``.
  """
  t = _normalize_names(tensors)
  want = _expected_shapes(cfg)
  missing = sorted(k for k in want if k not in t)
  if missing:
    raise CheckpointError(f'checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}')
  wrong = [(k, t[k].shape, s) for k, s in want.items() if tuple(t[k].shape) != s]
  if wrong:
    k, got, s = wrong[0]
    raise CheckpointError(f'tensor {k!r} has shape {got}, expected {s} from config.json')
  d, h, dh = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  f32 = lambda x: np.asarray(x, np.float32)
  flat = {}
  e = 'embeddings/'
  flat[e + 'word_embeddings/embedding'] = f32(t['embeddings.word_embeddings.weight'])
  flat[e + 'position_embeddings/embedding'] = f32(t['embeddings.position_embeddings.weight'])
  flat[e + 'token_type_embeddings/embedding'] = f32(t['embeddings.token_type_embeddings.weight'])
  flat[e + 'layer_norm/scale'] = f32(t['embeddings.LayerNorm.weight'])
  flat[e + 'layer_norm/bias'] = f32(t['embeddings.LayerNorm.bias'])
  for i in range(cfg.num_layers):
    src, dst = f'encoder.layer.{i}.', f'layer_{i}/'
    for n in ('query', 'key', 'value'):
      w = t[src + f'attention.self.{n}.weight']
      flat[dst + f'attention/{n}/kernel'] = f32(w.T.reshape(d, h, dh))
      flat[dst + f'attention/{n}/bias'] = f32(t[src + f'attention.self.{n}.bias'].reshape(h, dh))
    flat[dst + 'attention/out/kernel'] = f32(t[src + 'attention.output.dense.weight'].T.reshape(h, dh, d))
    flat[dst + 'attention/out/bias'] = f32(t[src + 'attention.output.dense.bias'])
    flat[dst + 'attention_norm/scale'] = f32(t[src + 'attention.output.LayerNorm.weight'])
    flat[dst + 'attention_norm/bias'] = f32(t[src + 'attention.output.LayerNorm.bias'])
    flat[dst + 'intermediate/kernel'] = f32(t[src + 'intermediate.dense.weight'].T)
    flat[dst + 'intermediate/bias'] = f32(t[src + 'intermediate.dense.bias'])
    flat[dst + 'output/kernel'] = f32(t[src + 'output.dense.weight'].T)
    flat[dst + 'output/bias'] = f32(t[src + 'output.dense.bias'])
    flat[dst + 'output_norm/scale'] = f32(t[src + 'output.LayerNorm.weight'])
    flat[dst + 'output_norm/bias'] = f32(t[src + 'output.LayerNorm.bias'])
  return unflatten(flat)


def check_model_dir(model_dir: str | pathlib.Path, *, field: str = 'model.pretrained',
                    pooling: str | None = None) -> None:
  """Raises :class:`CheckpointError` (one line naming ``field``, the directory and the missing
  file) unless ``model_dir`` is a directory with :data:`REQUIRED_FILES` and a readable
  ``model.safetensors`` header; with ``pooling='cls_pooler'`` the weights must include the
  pooler. Reads only the safetensors header, so it is cheap enough to run before a run starts.

  >>> check_model_dir('/tmp/merged')  # doctest: +SKIP
  """
  path = pathlib.Path(model_dir).expanduser()
  what = 'a Hugging Face BERT directory with ' + ', '.join(REQUIRED_FILES)
  if not path.is_dir():
    state = 'is a file' if path.exists() else 'does not exist'
    raise CheckpointError(f'{field}={str(model_dir)!r} {state}; valid: {what}')
  missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
  if missing:
    hint = (' (a merged export from an older peftjax has none: export it again)'
            if missing == ['tokenizer.json'] else '')
    raise CheckpointError(f'{field}={str(model_dir)!r}: the directory has no {missing[0]}; '
                          f'valid: {what}{hint}')
  keys = tensor_names(path / 'model.safetensors')
  if pooling == 'cls_pooler':
    missing = [k for k in POOLER_TENSORS if k not in keys and f'bert.{k}' not in keys]
    if missing:
      raise CheckpointError(
          f"{field}={str(model_dir)!r}: model.safetensors has no {missing[0]!r}, which "
          "model.pooling='cls_pooler' uses (BERT's tanh pooler on [CLS]); valid: a checkpoint "
          "with the pooler, or model.pooling='mean' / 'cls'")


def tensor_names(path: str | pathlib.Path) -> set[str]:
  """The tensor names in a safetensors file (its header only); CheckpointError if unreadable."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(str(path), 'np') as f:
      return set(f.keys())
  except Exception as e:  # pylint: disable=broad-except  (corrupt or truncated header)
    raise CheckpointError(f'cannot read {path}: {" ".join(str(e).split())}') from None


def load_pooler(model_dir: str | pathlib.Path, cfg: BertConfig) -> dict[str, np.ndarray]:
  """BERT's pooler from a HF directory: ``{'kernel': (D, D), 'bias': (D,)}`` (flax layout).

  >>> pooler = load_pooler(minilm_dir(), cfg)  # doctest: +SKIP
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  st = pathlib.Path(model_dir) / 'model.safetensors'
  keys = tensor_names(st)
  found = {}
  for k in POOLER_TENSORS:
    name = k if k in keys else f'bert.{k}'
    if name not in keys:
      raise CheckpointError(f"{st} has no {k!r}: model.pooling='cls_pooler' uses BERT's pooler; "
                            "valid: a checkpoint with it, or model.pooling='mean' / 'cls'")
    found[k] = name
  with safe_open(str(st), 'np') as f:
    w = np.asarray(f.get_tensor(found['pooler.dense.weight']), np.float32)
    b = np.asarray(f.get_tensor(found['pooler.dense.bias']), np.float32)
  d = cfg.hidden_size
  if w.shape != (d, d) or b.shape != (d,):
    raise CheckpointError(f"{st}: 'pooler.dense.weight' {w.shape} / 'pooler.dense.bias' "
                          f'{b.shape}; expected ({d}, {d}) and ({d},) from config.json')
  return {'kernel': np.ascontiguousarray(w.T), 'bias': b}


def hub_id(model_dir: str | pathlib.Path) -> str:
  """A portable name for the model in ``model_dir``: its Hugging Face hub id when known (the
  bundled MiniLM's, or the one an export recorded), else the directory's name. Never an
  absolute path of this machine.

  >>> hub_id(minilm_dir())  # doctest: +SKIP
  'sentence-transformers/all-MiniLM-L6-v2'
  """
  path = pathlib.Path(str(model_dir)).expanduser()
  try:
    from peftjax.data import minilm_dir  # pylint: disable=g-import-not-at-top
    if path.resolve() == minilm_dir().resolve():
      return BUNDLED_HUB_ID
  except Exception:  # pylint: disable=broad-except  (the bundled asset is not installed)
    pass
  try:
    hf = json.loads((path / 'config.json').read_text())
  except (OSError, ValueError):
    hf = {}
  if not isinstance(hf, dict):
    hf = {}
  for name in ((hf.get('peftjax') or {}).get('base_model'), hf.get('_name_or_path')):
    if isinstance(name, str) and _HUB_ID.match(name) and not pathlib.Path(name).exists():
      return name
  return path.name or str(model_dir)


def load_bert(model_dir: str | pathlib.Path, **overrides) -> tuple[BertConfig, dict]:
  """Loads a HF BERT directory: ``(BertConfig, encoder_params)``.

  ``overrides`` replace config fields; ``num_layers=k`` keeps the first k layers.

  >>> cfg, enc = load_bert(minilm_dir())  # doctest: +SKIP
  >>> enc['layer_0']['attention']['query']['kernel'].shape  # doctest: +SKIP
  (384, 12, 32)
  """
  model_dir = pathlib.Path(model_dir)
  cfg = read_config(model_dir, **overrides)
  st = model_dir / 'model.safetensors'
  if not st.is_file():
    raise CheckpointError(f'model directory {str(model_dir)!r} has no model.safetensors '
                          '(convert other formats to safetensors first)')
  try:
    tensors = load_file(str(st))
  except Exception as e:  # corrupt or truncated file
    raise CheckpointError(f'cannot read {st}: {e}') from None
  return cfg, convert(cfg, tensors)
