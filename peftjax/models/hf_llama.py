"""Hugging Face directories of Llama-family decoders: import (llama, mistral, qwen2) and export.

Import: :func:`load_hf_dir` reads ``config.json`` and ``model.safetensors`` (or the shards listed
in ``model.safetensors.index.json``) with ``safetensors.numpy`` (no torch; bfloat16 tensors
through ``ml_dtypes``) into a ``config.json`` dict and HF-named float32 arrays, the ``state`` of
:func:`peftjax.models.llama_convert.params_from_hf`. The config is checked before any weight
is read, the tensors before they are converted.

Export: :func:`export_hf_dir` writes a directory ``transformers.AutoModelForCausalLM`` loads as
``LlamaForCausalLM`` (Qwen2's q/k/v biases are Llama's ``attention_bias``), with the tokenizer,
its chat template and a ``generation_config.json``. It is built in a temporary directory beside
the target and renamed into place at the end, so a failure leaves nothing behind.

>>> config, state = load_hf_dir('/models/Qwen2-0.5B')                    # doctest: +SKIP
>>> export_hf_dir('/tmp/merged', config, state, tokenizer)               # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from peftjax.errors import UserInputError

SUPPORTED_MODEL_TYPES = ('llama', 'mistral', 'qwen2')
# Tensors some checkpoints carry that the model recomputes (RoPE inverse frequencies).
_IGNORED_SUFFIXES = ('.rotary_emb.inv_freq',)


class HFCheckpointError(UserInputError):
  """An HF directory that cannot be imported or exported; the message says what is wrong."""


def _read_json(path: pathlib.Path) -> dict:
  try:
    data = json.loads(path.read_text())
  except ValueError as e:
    raise HFCheckpointError(f'{path} is not valid JSON: {e}') from None
  if not isinstance(data, dict):
    raise HFCheckpointError(f'{path} holds a {type(data).__name__}, expected a JSON object')
  return data


def normalize_config(hf: dict, source: str = 'config.json') -> dict:
  """A copy of an HF config dict checked for what the Llama model computes, with transformers
  5's ``rope_parameters`` folded back into ``rope_theta`` / ``rope_scaling``.

  Refuses (naming the key, the value and what is valid) other model types, activations other
  than SiLU, MLP biases, and a missing required key.

  >>> normalize_config({'model_type': 'gpt2'})  # doctest: +SKIP
  HFCheckpointError: config.json: model_type='gpt2' is not supported; supported: llama, ...
  """
  cfg = dict(hf)
  kind = cfg.get('model_type')
  if kind not in SUPPORTED_MODEL_TYPES:
    raise HFCheckpointError(f'{source}: model_type={kind!r} is not supported; supported: '
                            f'{", ".join(SUPPORTED_MODEL_TYPES)}')
  act = cfg.get('hidden_act', 'silu')
  if act != 'silu':
    raise HFCheckpointError(f"{source}: hidden_act={act!r}; supported: 'silu' (SwiGLU)")
  if cfg.get('mlp_bias'):
    raise HFCheckpointError(f'{source}: mlp_bias=true; supported: MLPs without biases')
  required = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
              'num_attention_heads')
  missing = [k for k in required if not isinstance(cfg.get(k), int)]
  if missing:
    raise HFCheckpointError(f'{source}: {missing[0]}={cfg.get(missing[0])!r}; a {kind} '
                            'config needs it as an integer')
  params = cfg.pop('rope_parameters', None)
  if isinstance(params, dict):
    params = dict(params)
    if 'rope_theta' in params:
      cfg.setdefault('rope_theta', params.pop('rope_theta'))
    if params.get('rope_type', 'default') != 'default' and not cfg.get('rope_scaling'):
      cfg['rope_scaling'] = params
  if kind == 'qwen2':
    cfg.setdefault('attention_bias', True)
  return cfg


def read_hf_config(model_dir: str | os.PathLike) -> dict:
  """The checked ``config.json`` of an HF directory (see :func:`normalize_config`).

  >>> read_hf_config('/models/SmolLM2')['model_type']  # doctest: +SKIP
  'llama'
  """
  d = pathlib.Path(model_dir).expanduser()
  if not d.is_dir():
    state = 'is a file' if d.exists() else 'does not exist'
    raise HFCheckpointError(f'{d} {state}; expected a Hugging Face model directory with '
                            'config.json and model.safetensors')
  path = d / 'config.json'
  if not path.is_file():
    raise HFCheckpointError(f'{d} has no config.json; expected a Hugging Face model directory')
  return normalize_config(_read_json(path), str(path))


def weight_files(model_dir: str | os.PathLike) -> list[pathlib.Path]:
  """The safetensors files of a directory: ``model.safetensors``, or every shard named by
  ``model.safetensors.index.json`` (each checked to exist)."""
  d = pathlib.Path(model_dir).expanduser()
  single, index = d / 'model.safetensors', d / 'model.safetensors.index.json'
  if single.is_file():
    return [single]
  if index.is_file():
    weight_map = _read_json(index).get('weight_map')
    if not isinstance(weight_map, dict) or not weight_map:
      raise HFCheckpointError(f'{index} has no weight_map')
    shards = [d / name for name in sorted(set(weight_map.values()))]
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
      raise HFCheckpointError(f'{index} lists shard {absent[0]!r}, which is not in {d} '
                              f'({len(absent)} of {len(shards)} shards missing)')
    return shards
  other = sorted(p.name for p in d.glob('*.bin')) + sorted(p.name for p in d.glob('*.gguf'))
  hint = f' (found {other[0]}: convert it to safetensors, or load a .gguf with gguf_file)' \
      if other else ''
  raise HFCheckpointError(f'{d} has neither model.safetensors nor model.safetensors.index.json'
                          f'{hint}')


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  import ml_dtypes  # pylint: disable=g-import-not-at-top,unused-import  (numpy learns bfloat16)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(str(path))
  except Exception as e:  # pylint: disable=broad-except  (truncated or corrupt file)
    raise HFCheckpointError(f'cannot read {path}: {" ".join(str(e).split())}') from None


def _llama_config(config: dict, source: str):
  from peftjax.models.llama import LlamaConfig  # pylint: disable=g-import-not-at-top
  try:
    return LlamaConfig.from_hf(config)
  except (ValueError, TypeError) as e:  # an unsupported RoPE type, heads not in whole groups
    raise HFCheckpointError(f'{source}: {" ".join(str(e).split())}') from None


def load_hf_dir(model_dir: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """``(config, state)`` of an HF Llama / Mistral / Qwen2 directory: the checked ``config.json``
  dict and every tensor as float32 numpy in torch layout, checked against the config.

  >>> config, state = load_hf_dir('/models/SmolLM2-135M')  # doctest: +SKIP
  >>> state['model.embed_tokens.weight'].dtype            # doctest: +SKIP
  dtype('float32')
  """
  # pylint: disable-next=g-import-not-at-top
  from peftjax.models.llama_convert import check_state, expected_shapes
  d = pathlib.Path(model_dir).expanduser()
  config = read_hf_config(d)
  files = weight_files(d)
  cfg = _llama_config(config, str(d / 'config.json'))
  want = expected_shapes(cfg)
  state: dict[str, np.ndarray] = {}
  for f in files:
    for name, arr in _read_safetensors(f).items():
      if name.endswith(_IGNORED_SUFFIXES):
        continue
      if name == 'lm_head.weight' and cfg.tie_embeddings:
        continue  # tied: the output layer is the embedding; some exports store a copy
      if name not in want:
        raise HFCheckpointError(f'{f}: tensor {name!r} is not part of a {config["model_type"]} '
                                'model as its config.json describes it')
      if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != 'bfloat16':
        raise HFCheckpointError(f'{f}: tensor {name!r} has dtype {arr.dtype}; expected floats '
                                '(quantized safetensors are not supported)')
      state[name] = np.asarray(arr, np.float32)
  check_state(cfg, state, str(d))
  return config, state


# ------------------------------------------------------------------------------ export


def _export_config(config: dict, state: dict, tokenizer) -> dict:
  """The config.json of the export: the architecture as ``LlamaForCausalLM``."""
  from peftjax.models.llama_convert import check_state  # pylint: disable=g-import-not-at-top
  src = normalize_config(config, 'config')
  cfg = _llama_config(src, 'config')
  if cfg.sliding_window:
    raise HFCheckpointError(
        f'config: sliding_window={cfg.sliding_window}; LlamaForCausalLM attends the whole '
        'context, so an export would compute something else past that length; valid: a model '
        'without a sliding window (use_sliding_window false or sliding_window null)')
  check_state(cfg, state, 'state')
  out = cfg.to_hf()
  for key in ('bos_token_id', 'eos_token_id', 'pad_token_id'):
    if src.get(key) is not None:
      out[key] = src[key]
  if tokenizer is not None:
    for key, value in (('bos_token_id', tokenizer.bos_id), ('eos_token_id', tokenizer.eos_id),
                       ('pad_token_id', tokenizer.pad_id)):
      if value is not None:
        out[key] = value
  return out


def export_hf_dir(path: str | os.PathLike, config: dict, state: dict, tokenizer=None, *,
                  overwrite: bool = False) -> pathlib.Path:
  """Writes an HF ``LlamaForCausalLM`` directory: ``config.json``, ``model.safetensors``
  (float32), ``generation_config.json`` and, with ``tokenizer`` (an
  :class:`peftjax.data.lm_tokenizer.LMTokenizer`), ``tokenizer.json`` and
  ``tokenizer_config.json`` with the chat template and special tokens.

  ``config`` is an HF config dict (:func:`load_hf_dir`'s, ``gguf_file.load_gguf``'s or
  ``LlamaConfig.to_hf()``), ``state`` HF-named arrays (``llama_convert.hf_from_params``).
  Everything is checked first (shapes against the config, the tokenizer's ids against the
  embedding); the directory appears whole or not at all. An existing ``path`` is replaced only
  with ``overwrite=True``.

  >>> export_hf_dir('/tmp/smollm2_hf', config, state, tokenizer)  # doctest: +SKIP
  PosixPath('/tmp/smollm2_hf')
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  from peftjax import storage  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(path).expanduser().absolute()
  if out.exists() and not overwrite:
    raise HFCheckpointError(f'{out} already exists; choose a new directory or pass '
                            'overwrite=True to replace it')
  hf = _export_config(config, state, tokenizer)
  if tokenizer is not None:
    tokenizer.check_vocab(hf['vocab_size'], field='exported model')
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()
             if not (k == 'lm_head.weight' and hf['tie_word_embeddings'])}
  generation = {k: hf[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id') if k in hf}
  generation['do_sample'] = False
  with storage.atomic_dir(out, replace=overwrite) as tmp:
    (tmp / 'config.json').write_text(json.dumps(hf, indent=2, sort_keys=True) + '\n')
    (tmp / 'generation_config.json').write_text(json.dumps(generation, indent=2,
                                                           sort_keys=True) + '\n')
    # 'format': 'pt' is what transformers expects of a torch-layout checkpoint.
    save_file(tensors, str(tmp / 'model.safetensors'), metadata={'format': 'pt'})
    # safetensors creates its file 0600; give it the mode the JSON files got (0666 & ~umask).
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp / 'model.safetensors', 0o666 & ~mask)
    if tokenizer is not None:
      tokenizer.save(tmp)
  return out
