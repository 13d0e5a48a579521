"""Export a (merged) BERT classifier as a Hugging Face BERT-format directory, and read it back.

The directory holds ``config.json`` (the fields of HF's ``BertConfig``), ``model.safetensors``
with HF's tensor names (torch ``Linear`` layout ``(out, in)``) and the tokenizer the model was
trained with (``tokenizer.json``, and ``tokenizer_config.json``, ``vocab.txt``,
``special_tokens_map.json`` when the source has them), so the directory can be used as
``--config.model.pretrained`` and read by :func:`peftjax.models.hf_bert.load_bert` and by
``transformers``. It is the exact inverse of :func:`peftjax.models.hf_bert.convert`: a round
trip is bit-identical.

Two layouts, by the model's pooling:

* ``pooling='cls_pooler'`` with a head is HF's ``BertForSequenceClassification`` exactly
  (``architectures: ["BertForSequenceClassification"]``; ``bert.embeddings...``,
  ``bert.encoder.layer.0...``, ``bert.pooler.dense.*``, ``classifier.*``): the logits are
  ``classifier(tanh(pooler.dense(h[CLS])))``, and ``transformers.AutoModelForSequenceClassification``
  reproduces them.
* ``'mean'`` / ``'cls'`` pool without a tanh dense, which no HF class does. The directory is a
  ``BertModel`` (``embeddings...``, ``encoder.layer.0...``, the base's ``pooler.dense.*`` when
  known, unused by the head) plus ``classifier.weight`` ``(C, D)`` and ``classifier.bias``, and
  ``config.json`` carries a ``"peftjax"`` block saying how to use it::

    "peftjax": {"pooling": "mean", "head": "classifier", "base_model": "...", ...}

  ``transformers.BertModel`` loads it and ignores the head; the logits are
  ``pool(last_hidden_state) @ classifier.weight.T + classifier.bias``.

Nothing in the directory names a path of the exporting machine: ``base_model`` is the hub id
of the base when known (see :func:`peftjax.models.hf_bert.hub_id`).

Writes are atomic for the whole directory: everything is written into a temporary sibling
directory which is then renamed into place, so a crash never leaves a half-written export.

>>> export_bert('/tmp/m', cfg, merged, pooling='mean', class_names=['n', 'p'])  # doctest: +SKIP
>>> cfg, params, pooling, names = load_bert_classifier('/tmp/m')  # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from peftjax import storage
from peftjax import tree as tree_lib
from peftjax.errors import UserInputError
from peftjax.models.bert import POOLINGS
from peftjax.models.bert import BertConfig
from peftjax.models.hf_bert import TOKENIZER_FILES
from peftjax.models.hf_bert import CheckpointError
from peftjax.models.hf_bert import load_bert
from peftjax.models.hf_bert import load_pooler
from peftjax.models.hf_bert import tensor_names


class ExportError(UserInputError):
  """An export that cannot be written: bad parameters, or an existing target directory."""


# ----------------------------------------------------------------------------- atomic directories


def write_dir_atomic(out_dir: str | os.PathLike, files: dict[str, bytes], *,
                     overwrite: bool = False) -> pathlib.Path:
  """Writes ``files`` (name -> bytes) as the directory ``out_dir``, all or nothing.

  The files go to a temporary sibling directory (fsynced), which is then renamed to
  ``out_dir``. An existing non-empty ``out_dir`` is refused unless ``overwrite``; when replaced,
  the old directory is moved aside first and deleted only after the new one is in place.

  >>> write_dir_atomic('/tmp/x', {'a.json': b'{}'})  # doctest: +SKIP
  PosixPath('/tmp/x')
  """
  out = pathlib.Path(out_dir)
  if out.exists():
    if not out.is_dir():
      raise ExportError(f'output path {str(out)!r} exists and is not a directory')
    if any(out.iterdir()) and not overwrite:
      raise ExportError(f'output directory {str(out)!r} exists and is not empty; pass '
                        'overwrite=True to replace it, or choose a new directory')
  with storage.atomic_dir(out, replace=True) as tmp:
    for name, data in files.items():
      with open(tmp / name, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
  return out


def _safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  # 'pt': the tensors are in torch layout; transformers refuses files without a known format.
  return safetensors.numpy.save(tensors, metadata={'format': 'pt'})


# ----------------------------------------------------------------------------- our tree -> HF names


def _encoder_shapes(cfg: BertConfig) -> dict[str, tuple]:
  """Our ``encoder`` leaf paths and shapes (the layout ``hf_bert.convert`` produces)."""
  d, h, dh, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  shapes = {
      'embeddings/word_embeddings/embedding': (cfg.vocab_size, d),
      'embeddings/position_embeddings/embedding': (cfg.max_position, d),
      'embeddings/token_type_embeddings/embedding': (cfg.type_vocab_size, d),
      'embeddings/layer_norm/scale': (d,), 'embeddings/layer_norm/bias': (d,),
  }
  for i in range(cfg.num_layers):
    p = f'layer_{i}/'
    for n in ('query', 'key', 'value'):
      shapes[p + f'attention/{n}/kernel'] = (d, h, dh)
      shapes[p + f'attention/{n}/bias'] = (h, dh)
    shapes.update({
        p + 'attention/out/kernel': (h, dh, d), p + 'attention/out/bias': (d,),
        p + 'attention_norm/scale': (d,), p + 'attention_norm/bias': (d,),
        p + 'intermediate/kernel': (d, f), p + 'intermediate/bias': (f,),
        p + 'output/kernel': (f, d), p + 'output/bias': (d,),
        p + 'output_norm/scale': (d,), p + 'output_norm/bias': (d,),
    })
  return shapes


def _check_encoder(cfg: BertConfig, flat: dict[str, np.ndarray]) -> None:
  want = _encoder_shapes(cfg)
  missing = sorted(set(want) - set(flat))
  extra = sorted(set(flat) - set(want))
  if missing or extra:
    raise ExportError(
        f"params['encoder'] does not match BertConfig(num_layers={cfg.num_layers}, "
        f'hidden_size={cfg.hidden_size}): missing {missing[:3]}, unexpected {extra[:3]} '
        '(only dense BERT encoders export to the HF BERT format)')
  for path, shape in want.items():
    if tuple(flat[path].shape) != shape:
      raise ExportError(f"params['encoder'][{path!r}] has shape {tuple(flat[path].shape)}, "
                        f'expected {shape} from the BertConfig')


def to_hf_tensors(cfg: BertConfig, encoder: dict) -> dict[str, np.ndarray]:
  """Our ``encoder`` tree -> HF ``BertModel`` tensors (names without a ``bert.`` prefix).

  The exact inverse of :func:`peftjax.models.hf_bert.convert`.

  >>> t = to_hf_tensors(cfg, enc)  # doctest: +SKIP
  >>> t['encoder.layer.0.attention.self.query.weight'].shape  # doctest: +SKIP
  (384, 384)
  """
  if cfg.moe_layers:
    raise ExportError(f'model.moe_layers={cfg.moe_layers}: the HF BERT format has no '
                      'Mixture-of-Experts layers; export a dense model')
  _check_heads(cfg)
  flat = {p: np.asarray(jax.device_get(v)) for p, v in tree_lib.flatten(encoder).items()}
  _check_encoder(cfg, flat)
  d = cfg.hidden_size
  t = {}
  for name in ('word', 'position', 'token_type'):
    t[f'embeddings.{name}_embeddings.weight'] = flat[f'embeddings/{name}_embeddings/embedding']
  t['embeddings.LayerNorm.weight'] = flat['embeddings/layer_norm/scale']
  t['embeddings.LayerNorm.bias'] = flat['embeddings/layer_norm/bias']
  for i in range(cfg.num_layers):
    src, dst = f'layer_{i}/', f'encoder.layer.{i}.'
    for n in ('query', 'key', 'value'):
      t[dst + f'attention.self.{n}.weight'] = flat[src + f'attention/{n}/kernel'].reshape(d, d).T
      t[dst + f'attention.self.{n}.bias'] = flat[src + f'attention/{n}/bias'].reshape(d)
    t[dst + 'attention.output.dense.weight'] = flat[src + 'attention/out/kernel'].reshape(d, d).T
    t[dst + 'attention.output.dense.bias'] = flat[src + 'attention/out/bias']
    t[dst + 'attention.output.LayerNorm.weight'] = flat[src + 'attention_norm/scale']
    t[dst + 'attention.output.LayerNorm.bias'] = flat[src + 'attention_norm/bias']
    t[dst + 'intermediate.dense.weight'] = flat[src + 'intermediate/kernel'].T
    t[dst + 'intermediate.dense.bias'] = flat[src + 'intermediate/bias']
    t[dst + 'output.dense.weight'] = flat[src + 'output/kernel'].T
    t[dst + 'output.dense.bias'] = flat[src + 'output/bias']
    t[dst + 'output.LayerNorm.weight'] = flat[src + 'output_norm/scale']
    t[dst + 'output.LayerNorm.bias'] = flat[src + 'output_norm/bias']
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in t.items()}


def _check_heads(cfg: BertConfig) -> None:
  # HF BERT derives the head size as hidden_size / num_attention_heads; a head-pruned config
  # (peftjax.compress.structured.prune_heads keeps the head size) has no HF equivalent.
  if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
    raise ExportError(
        f'num_heads={cfg.num_heads} x head_size={cfg.head_dim} != hidden_size={cfg.hidden_size} '
        '(a head-pruned model): the HF BERT format needs num_heads * head_size == hidden_size; '
        'export the model before head pruning')


def hf_config(cfg: BertConfig, *, num_labels: int | None = None, class_names=None,
              pooling: str = 'mean', source: str = '', base_model: str = '') -> dict[str, Any]:
  """The ``config.json`` of an export: HF ``BertConfig`` fields + our ``"peftjax"`` block."""
  _check_heads(cfg)
  seq_cls = pooling == 'cls_pooler' and num_labels is not None
  out = {
      'model_type': 'bert',
      'architectures': ['BertForSequenceClassification' if seq_cls else 'BertModel'],
      'vocab_size': cfg.vocab_size,
      'hidden_size': cfg.hidden_size,
      'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads,
      'intermediate_size': cfg.intermediate_size,
      'max_position_embeddings': cfg.max_position,
      'type_vocab_size': cfg.type_vocab_size,
      'layer_norm_eps': cfg.layer_norm_eps,
      'hidden_act': 'gelu',
      'position_embedding_type': 'absolute',
      'hidden_dropout_prob': cfg.dropout_rate,
      'attention_probs_dropout_prob': cfg.attention_dropout_rate,
      'initializer_range': 0.02,
      'pad_token_id': 0,
      'torch_dtype': 'float32',
  }
  block = {'pooling': pooling, 'head': None, 'source': source, 'format': 'peftjax-hf-bert/1'}
  if base_model:
    block['base_model'] = base_model
  if num_labels is not None:
    names = list(class_names) if class_names is not None else [f'LABEL_{i}'
                                                                 for i in range(num_labels)]
    out['num_labels'] = num_labels
    out['id2label'] = {str(i): str(n) for i, n in enumerate(names)}
    out['label2id'] = {str(n): i for i, n in enumerate(names)}
    block['head'] = 'classifier'
    if seq_cls:
      out['problem_type'] = 'single_label_classification'
      block['logits'] = ('classifier(tanh(pooler.dense(last_hidden_state[:, 0]))): '
                         'BertForSequenceClassification')
    else:
      block['logits'] = ('pool(last_hidden_state) @ classifier.weight.T + classifier.bias; no '
                         'tanh pooler (this is not BertForSequenceClassification)')
  out['peftjax'] = block
  return out


def _dense(params: dict, name: str, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
  """``params[name]`` as float32 ``(kernel, bias)`` of a dense layer, checked against ``shape``."""
  head = params[name]
  if not isinstance(head, dict) or set(head) != {'kernel', 'bias'}:
    raise ExportError(f"params[{name!r}] must hold 'kernel' and 'bias'; got "
                      f'{sorted(head) if isinstance(head, dict) else type(head).__name__}')
  kernel = np.asarray(jax.device_get(head['kernel']), np.float32)
  bias = np.asarray(jax.device_get(head['bias']), np.float32)
  ok = kernel.ndim == 2 and kernel.shape[0] == shape[0] and bias.shape == kernel.shape[1:]
  if not ok or (shape[1] is not None and kernel.shape[1] != shape[1]):
    want = f'({shape[0]}, {"C" if shape[1] is None else shape[1]})'
    raise ExportError(f'params[{name!r}] kernel {kernel.shape} / bias {bias.shape}; expected '
                      f'{want} and its bias')
  return kernel, bias


def tokenizer_files(tokenizer_dir: str | os.PathLike | None, vocab_size: int) -> dict[str, bytes]:
  """The tokenizer files to ship with an export, read from ``tokenizer_dir`` (default: the
  bundled MiniLM's, the tokenizer a run uses when ``model.pretrained`` is '' or 'random').

  ``tokenizer.json`` is required, and its ids must fit the embeddings (``vocab_size``).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  if tokenizer_dir is None:
    from peftjax.data import minilm_dir  # pylint: disable=g-import-not-at-top
    tokenizer_dir = minilm_dir()
  src = pathlib.Path(tokenizer_dir)
  if not (src / 'tokenizer.json').is_file():
    raise ExportError(f'the tokenizer directory {str(src)!r} has no tokenizer.json; an export '
                      'ships the tokenizer the model was trained with (valid: a directory with '
                      'tokenizer.json)')
  files = {name: (src / name).read_bytes() for name in TOKENIZER_FILES if (src / name).is_file()}
  try:
    n = tokenizers.Tokenizer.from_str(files['tokenizer.json'].decode()).get_vocab_size(
        with_added_tokens=True)
  except Exception as e:  # pylint: disable=broad-except  (corrupt JSON or an unknown model)
    raise ExportError(f'cannot read {src / "tokenizer.json"}: {" ".join(str(e).split())}') from None
  if n > vocab_size:
    raise ExportError(f'{src / "tokenizer.json"} has {n} token ids but the model embeds '
                      f'{vocab_size} (vocab_size); export with the tokenizer it was trained with')
  return files


def export_bert(out_dir: str | os.PathLike, bert_cfg: BertConfig, params: dict, *,
                pooling: str, class_names=None, source: str = '', base_model: str = '',
                tokenizer_dir: str | os.PathLike | None = None,
                overwrite: bool = False) -> pathlib.Path:
  """Writes ``params`` (``{'encoder': ..., 'classifier': {kernel, bias}}`` and, for
  ``pooling='cls_pooler'``, ``'pooler'``; e.g. a model with LoRA merged in) as an HF BERT
  directory with its tokenizer; returns its path.

  ``classifier`` may be absent (an encoder-only export). ``pooler`` is required with
  ``'cls_pooler'`` and optional otherwise (the base's pooler, written so ``BertModel`` loads
  complete). ``class_names`` label the head's outputs (default ``LABEL_i``); ``source`` and
  ``base_model`` (a hub id) record where the weights came from; ``tokenizer_dir`` holds the
  tokenizer files (default: the bundled MiniLM's). Everything is checked before anything is
  written.

  >>> export_bert('/tmp/m', cfg, method.merge(params, lora), pooling='mean')  # doctest: +SKIP
  PosixPath('/tmp/m')
  """
  if pooling not in POOLINGS:
    raise ExportError(f'pooling={pooling!r}; valid: {list(POOLINGS)}')
  if not isinstance(params, dict) or 'encoder' not in params:
    got = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ExportError(f"params must be a dict with 'encoder' (and optionally 'pooler', "
                      f"'classifier'); got {got}")
  extra = sorted(set(params) - {'encoder', 'pooler', 'classifier'})
  if extra:
    raise ExportError(f"params has unexpected top-level entries {extra}; valid: 'encoder', "
                      "'pooler', 'classifier' (merge PEFT parameters into the base first)")
  if pooling == 'cls_pooler' and 'pooler' not in params:
    raise ExportError("pooling='cls_pooler' but params has no 'pooler' (BERT's pooler dense "
                      "layer that the head reads); valid: params with 'pooler', or another pooling")
  tensors = to_hf_tensors(bert_cfg, params['encoder'])
  d = bert_cfg.hidden_size
  if 'pooler' in params:
    kernel, bias = _dense(params, 'pooler', (d, d))
    tensors['pooler.dense.weight'] = np.ascontiguousarray(kernel.T)
    tensors['pooler.dense.bias'] = bias
  num_labels = None
  if 'classifier' in params:
    kernel, bias = _dense(params, 'classifier', (d, None))
    num_labels = kernel.shape[1]
    if class_names is not None and len(class_names) != num_labels:
      raise ExportError(f'class_names has {len(class_names)} names but the classifier has '
                        f'{num_labels} outputs')
  elif class_names is not None:
    raise ExportError("class_names given but params has no 'classifier'")
  if pooling == 'cls_pooler' and num_labels is not None:
    # BertForSequenceClassification's own names: the encoder under 'bert.', the head beside it.
    tensors = {f'bert.{k}': v for k, v in tensors.items()}
  if num_labels is not None:
    tensors['classifier.weight'] = np.ascontiguousarray(kernel.T)
    tensors['classifier.bias'] = bias
  config = hf_config(bert_cfg, num_labels=num_labels, class_names=class_names, pooling=pooling,
                     source=source, base_model=base_model)
  files = tokenizer_files(tokenizer_dir, bert_cfg.vocab_size)
  files.update({'config.json': json.dumps(config, indent=2, sort_keys=True).encode() + b'\n',
                'model.safetensors': _safetensors_bytes(tensors)})
  return write_dir_atomic(out_dir, files, overwrite=overwrite)


def load_bert_classifier(model_dir: str | os.PathLike, **overrides
                         ) -> tuple[BertConfig, dict, str, list[str]]:
  """Reads an :func:`export_bert` directory, or a Hugging Face ``BertForSequenceClassification``
  directory: ``(BertConfig, params, pooling, class_names)``.

  ``params`` is ``{'encoder': ..., 'classifier': {'kernel': (D, C), 'bias': (C,)}}``, with
  ``'pooler'`` for ``'cls_pooler'``; pooling comes from the ``"peftjax"`` block, else
  ``'cls_pooler'`` for ``BertForSequenceClassification`` (``'mean'`` otherwise);
  ``class_names`` from ``id2label`` in id order. ``overrides`` replace BertConfig fields (as in
  ``load_bert``).

  >>> cfg, params, pooling, names = load_bert_classifier('/tmp/m')  # doctest: +SKIP
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  model_dir = pathlib.Path(model_dir)
  cfg, encoder = load_bert(model_dir, **overrides)
  hf = json.loads((model_dir / 'config.json').read_text())
  block = hf.get('peftjax') or {}
  seq_cls = 'BertForSequenceClassification' in (hf.get('architectures') or [])
  pooling = block.get('pooling', 'cls_pooler' if seq_cls else 'mean')
  if pooling not in POOLINGS:
    raise CheckpointError(f'{model_dir / "config.json"}: peftjax.pooling={pooling!r}; valid: '
                          f'{list(POOLINGS)}')
  st = model_dir / 'model.safetensors'
  keys = tensor_names(st)
  missing = [k for k in ('classifier.weight', 'classifier.bias') if k not in keys]
  if missing:
    raise CheckpointError(f'{st} has no {missing} tensors: it is an encoder-only checkpoint; '
                          'use peftjax.models.load_bert for it, or export with a classifier')
  with safe_open(str(st), 'np') as f:
    weight = np.asarray(f.get_tensor('classifier.weight'), np.float32)
    bias = np.asarray(f.get_tensor('classifier.bias'), np.float32)
  if weight.ndim != 2 or weight.shape[1] != cfg.hidden_size or bias.shape != weight.shape[:1]:
    raise CheckpointError(f"{st}: 'classifier.weight' {weight.shape} / 'classifier.bias' "
                          f'{bias.shape}; expected (C, {cfg.hidden_size}) and (C,)')
  n = weight.shape[0]
  id2label = hf.get('id2label') or {}
  names = [str(id2label.get(str(i), f'LABEL_{i}')) for i in range(n)]
  params = {'encoder': encoder,
            'classifier': {'kernel': np.ascontiguousarray(weight.T), 'bias': bias}}
  if pooling == 'cls_pooler':
    params['pooler'] = load_pooler(model_dir, cfg)
  return cfg, params, pooling, names
