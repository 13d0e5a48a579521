"""An LM adapter library from causal-LM runs' adapter files (``adapter.safetensors``).

:func:`read_manifests` reads only the files' headers and checks, before any weight is read,
that each is a servable causal-LM adapter and that all of them name the same base;
:func:`base_model` says which base that is (its ``model`` config section and seed, or another
copy of its checkpoint given as ``base``) and reads its config and tokenizer without weights;
:func:`library_from_files` builds the base (its content hash must be the manifests') and loads
every adapter.

>>> lib, tokenizer = library_from_files({'a': 'run_a/adapter.safetensors',
...                                      'b': 'run_b/adapter.safetensors'})  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import ml_collections

from peftjax import delta
from peftjax.serving.adapter import AdapterError

LM_MODEL = 'llama'  # config.model.name of a causal LM


def read_manifests(adapters: dict[str, str]) -> dict[str, dict]:
  """``name -> manifest`` of every adapter file (headers only), each a causal-LM adapter of a
  servable method, all on one base (same model config and base hash)."""
  from peftjax.serving.lm_library import check_servable  # pylint: disable=g-import-not-at-top
  if not adapters:
    raise AdapterError('no adapters given; pass at least one as --adapter name=path')
  manifests = {n: delta.read_manifest(p) for n, p in adapters.items()}
  first_name = next(iter(manifests))
  first = manifests[first_name]
  for name, m in manifests.items():
    where = f'--adapter {name}={str(adapters[name])!r}'
    model = (m['base'].get('model_config') or {}).get('name')
    if model != LM_MODEL:
      raise AdapterError(f'{where} is an adapter of model.name={model!r}; generation serves '
                         f"causal-LM adapters (model.name='{LM_MODEL}'; text classifiers: "
                         'python -m peftjax.predict)')
    check_servable(m['method'], where)
    if m['base']['sha256'] != first['base']['sha256']:
      raise AdapterError(
          f"{where} was trained on base {m['base']['sha256'][:16]}... "
          f"({m['base'].get('source') or 'unknown source'}), --adapter {first_name} on "
          f"{first['base']['sha256'][:16]}... ({first['base'].get('source') or 'unknown'}); "
          'the adapters of one library share one base')
  return manifests


@dataclasses.dataclass
class BaseModel:
  """The base the adapters were trained on: its ``model`` section, seed (a random base is
  rebuilt from it), architecture (a LlamaConfig) and tokenizer, read without the weights."""
  model_cfg: ml_collections.ConfigDict
  seed: int
  cfg: object
  tokenizer: object


def _run_seed(adapter: pathlib.Path, model_config: dict) -> int:
  """The seed of the run whose workdir holds ``adapter`` (0 without one): a random base is
  rebuilt from it. Only a run config of the same model counts."""
  from peftjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    config = ckpt_lib.saved_config(adapter.parent)
  except Exception:  # pylint: disable=broad-except  (no run there, or not one we can read)
    return 0
  if not isinstance(config, dict):
    return 0
  same = json.dumps(config.get('model'), sort_keys=True, default=str) == json.dumps(
      model_config, sort_keys=True, default=str)
  return int(config.get('seed', 0)) if same else 0


def base_model(adapters: dict[str, str], manifests: dict[str, dict], base: str = '',
               field: str = '--model') -> BaseModel:
  """The base of the first adapter (``base``, a ``.gguf`` file or HF directory, replaces its
  ``model.pretrained``: another copy of the same checkpoint), without its weights."""
  from peftjax.data.lm_tokenizer import LMTokenizer  # pylint: disable=g-import-not-at-top
  from peftjax.models.llama import LlamaConfig  # pylint: disable=g-import-not-at-top
  name, first = next(iter(manifests.items()))
  model_cfg = ml_collections.ConfigDict(first['base']['model_config'])
  if base:
    if not pathlib.Path(base).expanduser().exists():
      raise AdapterError(f'{field}={base!r} does not exist; valid: the .gguf file or HF '
                         f'directory the adapters were trained on ({model_cfg.pretrained!r})')
    model_cfg.pretrained = base
  seed = _run_seed(pathlib.Path(adapters[name]).expanduser(), first['base']['model_config'])
  over = dict(scan_layers=bool(model_cfg.get('scan_layers', True)),
              remat=model_cfg.get('remat', 'none'),
              grad_barrier=bool(model_cfg.get('grad_barrier', True)))
  if model_cfg.pretrained == 'random':
    cfg, tokenizer = LlamaConfig(**{**dict(model_cfg.llama), **over}), LMTokenizer.default()
  else:
    from peftjax import generate as generate_lib  # pylint: disable=g-import-not-at-top
    cfg, tokenizer, _ = generate_lib.open_model(generate_lib.resolve_model(model_cfg.pretrained))
    cfg = dataclasses.replace(cfg, **over)
  if model_cfg.get('num_layers'):
    cfg = dataclasses.replace(cfg, num_layers=int(model_cfg.num_layers))
  return BaseModel(model_cfg, seed, cfg, tokenizer)


def library_from_files(adapters: dict[str, str], *, base: str = '', max_rank: int = 0,
                       max_prefix: int | None = None, manifests: dict[str, dict] | None = None,
                       field: str = '--model'):
  """``(LMAdapterLibrary, tokenizer)`` serving every adapter file ``name -> path``.

  The base is rebuilt from the first manifest (``base`` replaces its checkpoint) and must hash
  to the manifests' base; ``max_rank`` 0 is the largest LoRA rank loaded.
  """
  from peftjax.models.lm_build import build_lm  # pylint: disable=g-import-not-at-top
  from peftjax.serving.lm_library import LMAdapterLibrary  # pylint: disable=g-import-not-at-top
  manifests = manifests or read_manifests(adapters)
  info = base_model(adapters, manifests, base, field)
  built, tokenizer = build_lm(info.model_cfg, seed=info.seed)
  ranks = [int((m['peft_config'].get('lora') or {}).get('rank', 1)) for m in manifests.values()
           if 'lora' in m['method']]
  lib = LMAdapterLibrary(built.module, built.params, max_rank=max_rank or max(ranks, default=1),
                         max_prefix=max_prefix, base_source=built.source)
  first = next(iter(manifests.values()))
  if lib.base_hash() != first['base']['sha256']:
    name = next(iter(adapters))
    if info.model_cfg.pretrained == 'random':
      hint = (f'the random base was rebuilt with seed {info.seed} (the seed of the run config '
              'beside the adapter, else 0)')
    else:
      hint = f'pass {field}=<the .gguf file or HF directory it was trained on>'
    raise delta.DeltaError(
        f"--adapter {name}={str(adapters[name])!r} was trained on base "
        f"{first['base']['sha256'][:16]}... ({first['base'].get('source') or 'unknown'}); "
        f'the rebuilt base {built.source!r} is {lib.base_hash()[:16]}...: refusing to serve it '
        f'on another base ({hint})')
  for name, path in adapters.items():
    lib.load(name, path)
  return lib, tokenizer
