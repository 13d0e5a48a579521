"""LoRA adapters of the decoder LM in the Hugging Face PEFT format, for ``LlamaForCausalLM``.

The format (checked against huggingface/peft: ``tuners/lora/{layer,model,config}.py``,
``tuners/tuners_utils.py``, ``utils/save_and_load.py``), beside the BERT one in
:mod:`peftjax.hf.peft_lora`:

* ``task_type='CAUSAL_LM'``; keys ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
  ``.lora_B.weight`` ``(out, r)`` for the linear modules ``model.layers.<i>.self_attn.{q,k,v,o}_
  proj``, ``model.layers.<i>.mlp.{gate,up,down}_proj`` and ``lm_head``;
  ``base_model.model.model.embed_tokens.lora_embedding_A`` ``(r, vocab)`` and
  ``.lora_embedding_B`` ``(hidden, r)`` for the input embedding.
* The update is ``W + scaling * B @ A`` (torch layout), ``scaling = lora_alpha / r`` (or
  ``/ sqrt(r)`` with ``use_rslora``); ``rank_pattern``/``alpha_pattern`` per module
  (:func:`peftjax.hf.peft_lora.pattern_key`).
* Tied embeddings (``tie_word_embeddings``: one table is the input embedding and the output
  layer). Our LoRA on the tied ``embed/embedding`` adds ``s * A @ B`` to that one table, so the
  lookup and the logits both change. PEFT's exact form of this is ``ensure_weight_tying=True``
  with ``embed_tokens`` among the targets: PEFT puts the LoRA on ``embed_tokens`` and gives
  ``lm_head`` a LoRA whose ``lora_A`` is ``lora_embedding_B.T`` and ``lora_B`` is
  ``lora_embedding_A.T`` (the same tensors), i.e. the same update of the output layer. The export
  also writes those ``lm_head`` tensors (as PEFT's own save does), so a PEFT without
  ``ensure_weight_tying``, which adapts ``lm_head`` on its own from the file, computes the same.
  Without ``ensure_weight_tying`` PEFT adapts ``embed_tokens`` and ``lm_head`` separately: the
  import accepts that on a tied model only when both carry the same update, and refuses it
  naming the site otherwise (one table cannot be two).
* Whole tables in the file (``model.embed_tokens.base_layer.weight``, ``lm_head.base_layer.weight``
  from PEFT's ``save_embedding_layers``, or ``model.embed_tokens.weight`` / ``lm_head.weight``
  from ``modules_to_save``) replace the base's table when PEFT loads the adapter; the import
  returns them as trained base leaves (``trainable['base']``), under the same tying rule.

Our tree: ``layers/attn/q_proj/{lora_a (L, in, r), lora_b (L, r, out)}`` with the scanned
model's leading layer axis (``layer_<i>/attn/q_proj/...`` unrolled), ``embed/{lora_a (V, r),
lora_b (r, D)}``, ``lm_head/...`` (untied models only): per layer ``A = lora_A.T``,
``B = lora_B.T``. The import stacks the layers back (a layer without factors gets zeros, and
layers of different ranks are zero-padded to the largest: ``A @ B`` is unchanged) and folds each
module's PEFT scale into its ``B`` (see :mod:`peftjax.hf.peft_lora`).

``base_model_name_or_path`` never names a path of the exporting machine (:func:`base_name`):
the bundled SmolLM2 GGUF is ``'HuggingFaceTB/SmolLM2-135M-Instruct'`` (the model it quantizes:
PEFT applies the adapter to that float model, whose logits differ from the Q4_1 file's by the
quantization of the base, not by the adapter); an HF directory is the hub id its
``config.json`` records, else the directory's name; another GGUF the repository its metadata
names, else the file's stem; a random base (``model.pretrained='random'``) is ``'random'``.

>>> config, tensors = to_peft_llama(lora, cfg, rank=8, alpha=16.0)  # doctest: +SKIP
>>> key = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
>>> tensors[key].shape  # doctest: +SKIP
(8, 576)
>>> save_peft_llama('/tmp/lm_peft', lora, cfg, rank=8, alpha=16.0)  # doctest: +SKIP
PosixPath('/tmp/lm_peft')
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any

import jax
import numpy as np

from peftjax import tree as tree_lib
from peftjax.hf.bert_export import _safetensors_bytes
from peftjax.hf.bert_export import write_dir_atomic
from peftjax.hf.peft_lora import CONFIG_NAME
from peftjax.hf.peft_lora import PREFIX
from peftjax.hf.peft_lora import WEIGHTS_NAME
from peftjax.hf.peft_lora import PeftFormatError
from peftjax.hf.peft_lora import _scale
from peftjax.hf.peft_lora import lora_config

TASK_TYPES = ('CAUSAL_LM',)
SMOLLM2_HUB_ID = 'HuggingFaceTB/SmolLM2-135M-Instruct'  # what the bundled GGUF quantizes
RANDOM_BASE_NAME = 'random'
EMBED, HEAD = 'model.embed_tokens', 'lm_head'  # HF module names

# Our module path inside a layer <-> HF's inside model.layers.<i>.
_SUBLAYERS = (('attn/q_proj', 'self_attn.q_proj'), ('attn/k_proj', 'self_attn.k_proj'),
              ('attn/v_proj', 'self_attn.v_proj'), ('attn/o_proj', 'self_attn.o_proj'),
              ('mlp/gate_proj', 'mlp.gate_proj'), ('mlp/up_proj', 'mlp.up_proj'),
              ('mlp/down_proj', 'mlp.down_proj'))
TO_HF = dict(_SUBLAYERS)
TO_OURS = {hf: ours for ours, hf in _SUBLAYERS}
_OUR_SITE = re.compile(r'^(?:(?:layers|layer_(?P<layer>\d+))/(?P<sub>attn/[qkvo]_proj|'
                       r'mlp/(?:gate|up|down)_proj)|(?P<embed>embed)|(?P<head>lm_head))$')
HF_SITE = re.compile(r'^(?:model\.layers\.(?P<layer>\d+)\.(?P<sub>self_attn\.[qkvo]_proj|'
                     r'mlp\.(?:gate|up|down)_proj)|(?P<embed>model\.embed_tokens)|'
                     r'(?P<head>lm_head))$')
OUR_SITES = ('layers/attn/{q,k,v,o}_proj (or layer_<i>/...)', 'layers/mlp/{gate,up,down}_proj',
             'embed', 'lm_head (untied models)')
VALID_KEYS = (
    PREFIX + 'model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight',
    PREFIX + 'model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight',
    PREFIX + 'model.embed_tokens.lora_embedding_{A,B}',
    PREFIX + 'lm_head.lora_{A,B}.weight',
    PREFIX + '{model.embed_tokens,lm_head}[.base_layer].weight',
)


def torch_dims(cfg, name: str) -> tuple[int, int]:
  """``(in_features, out_features)`` of HF module ``name`` (``(num_embeddings, dim)`` for the
  embedding) in a ``LlamaForCausalLM`` of ``cfg``.

  >>> torch_dims(LlamaConfig(), 'model.layers.0.self_attn.k_proj')  # doctest: +SKIP
  (576, 192)
  """
  d, m, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  if name == EMBED:
    return v, d
  if name == HEAD:
    return d, v
  sub = name.split('.', 3)[3]
  return {'self_attn.q_proj': (d, q), 'self_attn.k_proj': (d, kv),
          'self_attn.v_proj': (d, kv), 'self_attn.o_proj': (q, d), 'mlp.gate_proj': (d, m),
          'mlp.up_proj': (d, m), 'mlp.down_proj': (m, d)}[sub]


# ----------------------------------------------------------------------------- the base's name


def _gguf_repo(path: pathlib.Path) -> str | None:
  """The hub repository a GGUF file's metadata says it was converted from, if any."""
  from peftjax.models import gguf_file  # pylint: disable=g-import-not-at-top
  try:
    meta = gguf_file.read_header(path).metadata
  except Exception:  # pylint: disable=broad-except  (not a GGUF we can read: use its name)
    return None
  for key in ('general.source.huggingface.repository', 'general.source.repo_url'):
    value = str(meta.get(key) or '')
    m = re.search(r'(?:huggingface\.co/)?([A-Za-z0-9][\w.-]*/[\w.-]+?)/?$', value)
    if m and not value.startswith(('/', '.')):
      return m.group(1)
  return None


def base_name(pretrained: str) -> str:
  """``base_model_name_or_path`` for a run's ``model.pretrained``: never a path of this machine.

  ``''`` (the bundled SmolLM2 GGUF, or a copy under its file name) is
  ``'HuggingFaceTB/SmolLM2-135M-Instruct'``; ``'random'`` stays ``'random'``; an HF directory is
  the hub id its ``config.json`` records, else its name; a GGUF file is the repository its
  metadata names, else its stem.

  >>> base_name('')
  'HuggingFaceTB/SmolLM2-135M-Instruct'
  >>> base_name('/data/models/my-llama')  # doctest: +SKIP
  'my-llama'
  """
  from peftjax.models import gguf_file  # pylint: disable=g-import-not-at-top
  from peftjax.models.hf_bert import hub_id  # pylint: disable=g-import-not-at-top
  if pretrained == '':
    return SMOLLM2_HUB_ID
  if pretrained == RANDOM_BASE_NAME:
    return RANDOM_BASE_NAME
  path = pathlib.Path(os.path.expanduser(str(pretrained)))
  if path.is_dir():
    return hub_id(path)
  if path.name == gguf_file.SMOLLM2_FILE:
    return SMOLLM2_HUB_ID
  if path.is_file():
    return _gguf_repo(path) or path.stem
  return path.stem or path.name or RANDOM_BASE_NAME


# ----------------------------------------------------------------------------- export


def _sites(lora_tree) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Module path -> (lora_a, lora_b) as float32 numpy, every leaf checked."""
  sites: dict[str, dict] = {}
  for path, value in tree_lib.flatten(lora_tree).items():
    module, _, leaf = path.rpartition('/')
    if leaf not in ('lora_a', 'lora_b'):
      raise PeftFormatError(f'LoRA tree leaf {path!r} is not a lora_a/lora_b factor (a LoRA '
                            'variant, e.g. DoRA\'s magnitude, has no plain PEFT LoRA form)')
    sites.setdefault(module, {})[leaf] = np.asarray(jax.device_get(value), np.float32)
  if not sites:
    raise PeftFormatError('the LoRA tree is empty: nothing to export')
  out = {}
  for module, ab in sorted(sites.items()):
    if set(ab) != {'lora_a', 'lora_b'}:
      raise PeftFormatError(f'LoRA site {module!r} has {sorted(ab)}; expected lora_a and lora_b')
    out[module] = ab['lora_a'], ab['lora_b']
  return out


def _per_layer(path: str, m, a, b, cfg) -> list[tuple[str, np.ndarray, np.ndarray]]:
  """``[(HF module name, A (in, r), B (r, out))]`` of one site, a stack split per layer."""
  if m['embed']:
    return [(EMBED, a, b)]
  if m['head']:
    return [(HEAD, a, b)]
  sub = TO_HF[m['sub']]
  if m['layer'] is not None:
    i = int(m['layer'])
    if i >= cfg.num_layers:
      raise PeftFormatError(f'LoRA site {path!r} is layer {i}, but the model has '
                            f'{cfg.num_layers} layers')
    return [(f'model.layers.{i}.{sub}', a, b)]
  if a.ndim != 3 or b.ndim != 3 or a.shape[0] != cfg.num_layers or b.shape[0] != a.shape[0]:
    raise PeftFormatError(f'LoRA site {path!r}: lora_a {a.shape} / lora_b {b.shape}; a scanned '
                          f'stack needs a leading axis of the {cfg.num_layers} layers on both')
  return [(f'model.layers.{i}.{sub}', a[i], b[i]) for i in range(cfg.num_layers)]


def to_peft_llama(lora_tree, cfg, *, rank: int, alpha: float, rslora: bool = False,
                  base_model_name_or_path: str = RANDOM_BASE_NAME,
                  dropout: float = 0.0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Our LoRA tree of a :class:`~peftjax.models.llama.LlamaForCausalLM` of ``cfg`` ->
  ``(adapter_config, tensors)`` in the PEFT format (``task_type='CAUSAL_LM'``).

  ``rank``/``alpha``/``rslora`` are the run's ``peft.lora.*`` (our single scale); a site of
  another rank gets ``rank_pattern``/``alpha_pattern`` entries that keep PEFT's scale equal to
  ours. On a tied model a LoRA on ``embed`` is written for ``embed_tokens`` and, transposed, for
  ``lm_head``, with ``ensure_weight_tying=True`` (see the module docstring).
  ``base_model_name_or_path`` is written as given: pass :func:`base_name`'s.

  >>> config, tensors = to_peft_llama(lora, cfg, rank=8, alpha=16.0)  # doctest: +SKIP
  >>> config['target_modules']  # doctest: +SKIP
  ['k_proj', 'o_proj', 'q_proj', 'v_proj']
  """
  if isinstance(rank, bool) or int(rank) != rank or rank <= 0:
    raise PeftFormatError(f'rank={rank!r}; valid: a positive integer')
  name = str(base_model_name_or_path or RANDOM_BASE_NAME)
  if os.path.isabs(os.path.expanduser(name)):
    raise PeftFormatError(f'base_model_name_or_path={name!r} is a path of this machine; valid: '
                          'a hub id or a name (peftjax.hf.peft_llama.base_name)')
  scale = _scale(alpha, int(rank), rslora)
  tensors: dict[str, np.ndarray] = {}
  targets, rank_pattern, alpha_pattern = set(), {}, {}
  tied_embed = False
  for path, (a, b) in _sites(lora_tree).items():
    m = _OUR_SITE.match(path)
    if not m:
      raise PeftFormatError(f'LoRA site {path!r} has no LlamaForCausalLM PEFT module; '
                            f'supported: {", ".join(OUR_SITES)}')
    if m['head'] and cfg.tie_embeddings:
      raise PeftFormatError(f"LoRA site {path!r} on a model with tied embeddings (it has no "
                            "lm_head: the output layer is 'embed')")
    r = a.shape[-1]
    if b.shape[-2] != r:
      raise PeftFormatError(f'LoRA site {path!r}: lora_a {a.shape} and lora_b {b.shape} '
                            'disagree on the rank (last axis of A, the one before out of B)')
    layers = _per_layer(path, m, a, b, cfg)
    for hf_name, ai, bi in layers:
      d_in, d_out = torch_dims(cfg, hf_name)
      if ai.shape != (d_in, r) or bi.shape != (r, d_out):
        raise PeftFormatError(
            f'LoRA site {path!r}: factors {ai.shape} / {bi.shape} per layer do not fit '
            f'{hf_name} of this model (in {d_in}, out {d_out}: expected ({d_in}, r) / (r, '
            f'{d_out}))')
      if hf_name == EMBED:
        tensors[f'{PREFIX}{EMBED}.lora_embedding_A'] = ai.T
        tensors[f'{PREFIX}{EMBED}.lora_embedding_B'] = bi.T
        if cfg.tie_embeddings:  # the output layer's view of the same update (PEFT's tied form)
          tensors[f'{PREFIX}{HEAD}.lora_A.weight'] = bi
          tensors[f'{PREFIX}{HEAD}.lora_B.weight'] = ai
          tied_embed = True
      else:
        tensors[f'{PREFIX}{hf_name}.lora_A.weight'] = ai.T
        tensors[f'{PREFIX}{hf_name}.lora_B.weight'] = bi.T
    targets.add(hf_name.rsplit('.', 1)[-1])
    if m['embed'] and cfg.tie_embeddings:
      targets.add(HEAD)
    if r != rank:  # PEFT's alpha_m / r_m (or / sqrt(r_m)) equal to our single scale
      if m['sub']:  # a stack: one key for all its layers; an unrolled layer: its own name
        keys = [TO_HF[m['sub']] if m['layer'] is None else layers[0][0]]
      elif m['embed']:  # the tied lm_head takes its scale from its own entry
        keys = ['embed_tokens'] + ([HEAD] if cfg.tie_embeddings else [])
      else:
        keys = [HEAD]
      for key in keys:
        rank_pattern[key] = int(r)
        alpha_pattern[key] = scale * (math.sqrt(r) if rslora else r)
  config = lora_config(
      'CAUSAL_LM', name, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
      target_modules=sorted(targets), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
  if tied_embed:
    config['ensure_weight_tying'] = True
  return config, {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}


def save_peft_llama(out_dir: str | os.PathLike, lora_tree, cfg, *, rank: int, alpha: float,
                    rslora: bool = False, base_model_name_or_path: str = RANDOM_BASE_NAME,
                    dropout: float = 0.0, overwrite: bool = False) -> pathlib.Path:
  """Writes :func:`to_peft_llama`'s result as a PEFT adapter directory, all or nothing (every
  check runs before anything is written); returns its path.

  >>> save_peft_llama('/tmp/lm_peft', lora, cfg, rank=8, alpha=16.0)  # doctest: +SKIP
  PosixPath('/tmp/lm_peft')
  """
  config, tensors = to_peft_llama(lora_tree, cfg, rank=rank, alpha=alpha, rslora=rslora,
                                  base_model_name_or_path=base_model_name_or_path,
                                  dropout=dropout)
  files = {CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode() + b'\n',
           WEIGHTS_NAME: _safetensors_bytes(tensors)}
  return write_dir_atomic(out_dir, files, overwrite=overwrite)
