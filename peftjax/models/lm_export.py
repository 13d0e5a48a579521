"""A trained causal-LM run as a Hugging Face ``LlamaForCausalLM`` directory.

The run's method is merged into its base (``Method.merge``: LoRA, DoRA and PiSSA folded into
the kernels they adapt, IA3's scales into the layers they scale; full fine-tuning is its own
weights), converted to HF names (:func:`peftjax.models.llama_convert.hf_from_params`) and written
with the run's tokenizer and chat template by :func:`peftjax.models.hf_llama.export_hf_dir`
(atomically: the directory appears whole or not at all). The result loads with
``transformers.AutoModelForCausalLM`` and as ``--config.model.pretrained`` of a later run.

Two inputs, both checked before any model is built:

* :func:`export_workdir` — a finished run's directory: its config (``summary.json``) and final
  checkpoint. Every run has these; nothing else is needed.
* :func:`export_adapter` — the delta checkpoint a run writes with ``train.save_adapter=True``.
  The base is rebuilt from the adapter's manifest (``model.pretrained``, or ``base`` for another
  copy of the same file) and must hash to the manifest's base; a random base
  (``model.pretrained='random'``) is rebuilt from the ``seed`` of the run config beside the file.

Methods that are not a change of weights (prompt and prefix tuning, bottleneck adapters) cannot
be merged and are refused by name.

A LoRA run (rsLoRA included) can also be written as a Hugging Face PEFT adapter directory for
``LlamaForCausalLM`` (:func:`export_peft_workdir`, :func:`export_peft_adapter`; the format and
the tied-embedding form: :mod:`peftjax.hf.peft_llama`). Refused by name, before anything is
written: other methods (DoRA, PiSSA, IA3, ...), an int8 (QAT/QLoRA) or compressed base, trained
base leaves, and a checkpoint cut to fewer layers, none of which a plain LoRA adapter on the
published checkpoint reproduces.

>>> export_workdir('/tmp/lm_run', '/tmp/lm_hf')                             # doctest: +SKIP
PosixPath('/tmp/lm_hf')
>>> export_adapter('/tmp/lm_run/adapter.safetensors', '/tmp/lm_hf2')         # doctest: +SKIP
PosixPath('/tmp/lm_hf2')
>>> export_peft_workdir('/tmp/lm_run', '/tmp/lm_peft')                      # doctest: +SKIP
PosixPath('/tmp/lm_peft')
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from peftjax.errors import UserInputError

LM_MODEL = 'llama'  # config.model.name of a causal LM
LM_TASK = 'causal_lm'


class LMExportError(UserInputError):
  """A run or adapter that cannot be exported as an HF causal LM; the message says why."""


def is_lm_manifest(manifest: dict) -> bool:
  """Whether a delta checkpoint's manifest is of a causal LM (``model.name='llama'``)."""
  return ((manifest.get('base') or {}).get('model_config') or {}).get('name') == LM_MODEL


def run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config of the finished causal-LM run in ``workdir`` (its ``summary.json``), read
  without building anything; an :class:`LMExportError` for a missing directory, an unfinished
  run, or a run of another task.

  >>> run_config('/tmp/lm_run').task  # doctest: +SKIP
  'causal_lm'
  """
  from peftjax import validate  # pylint: disable=g-import-not-at-top
  d = pathlib.Path(workdir).expanduser()
  if not d.is_dir():
    state = 'is a file' if d.exists() else 'does not exist'
    raise LMExportError(f'--workdir={str(workdir)!r} {state}; valid: the directory of a finished '
                        'causal-LM run (python -m peftjax.main --config=configs/lm_tiny.py '
                        '--workdir=...)')
  summary = d / 'summary.json'
  if not summary.is_file():
    raise LMExportError(f'--workdir={str(workdir)!r} has no summary.json: not a finished run '
                        '(train it to the end first: rerunning python -m peftjax.main with its '
                        'config and --workdir resumes it)')
  try:
    config = json.loads(summary.read_text())['config']
  except (ValueError, KeyError, TypeError) as e:
    raise LMExportError(f'{summary} is damaged ({type(e).__name__}: {e}); retrain the run') \
        from None
  config = ml_collections.ConfigDict(validate.upgrade(config))
  task, model = config.get('task'), config.model.get('name')
  if task != LM_TASK or model != LM_MODEL:
    raise LMExportError(
        f'--workdir={str(workdir)!r} is a run of task={task!r}, model.name={model!r}; '
        f"--workdir exports causal-LM runs (task='{LM_TASK}', model.name='{LM_MODEL}'); export "
        'another run from its adapter file: --adapter=<run>/adapter.safetensors (written with '
        '--config.train.save_adapter=True)')
  return config


def _parts(method) -> list:
  """The single methods of ``method``: inside a composition (``'lora+ia3'``) or QAT/QLoRA."""
  if getattr(method, 'methods', None):
    return [p for m in method.methods for p in _parts(m)]
  inner = getattr(method, 'inner', None)
  return _parts(inner) if inner is not None else [method]


def check_mergeable(method, where: str) -> None:
  """Refuses a method whose parameters are not a change of weights (prompt, prefix, bottleneck
  adapters): their ``merge`` raises before it reads its arguments, so this costs nothing."""
  for m in _parts(method):
    try:
      m.merge({}, {})
    except NotImplementedError as e:
      raise LMExportError(f'{where}: its method {m.name!r} cannot be merged into plain weights, '
                          f'so it has no LlamaForCausalLM form ({" ".join(str(e).split())}); '
                          "valid: a run of a mergeable method ('lora', 'ia3', 'full', 'dora', "
                          "'pissa', 'bitfit')") from None
    except Exception:  # pylint: disable=broad-except  (a real merge wants real trees)
      pass


def merged_from_workdir(workdir: str | os.PathLike):
  """``(LlamaConfig, merged params, tokenizer)`` of the finished causal-LM run in ``workdir``.

  >>> cfg, params, tok = merged_from_workdir('/tmp/lm_run')  # doctest: +SKIP
  """
  from peftjax import peft  # pylint: disable=g-import-not-at-top
  from peftjax import run as run_lib  # pylint: disable=g-import-not-at-top
  from peftjax.models.lm_build import load_lm_tokenizer  # pylint: disable=g-import-not-at-top
  config = run_config(workdir)
  check_mergeable(peft.build(config.peft), f'--workdir={str(workdir)!r}')
  _, built = run_lib.load_finished(str(workdir))
  return built.module.cfg, built.params, load_lm_tokenizer(config.model)


def _run_config_beside(adapter: pathlib.Path, model_config: dict) -> dict | None:
  """The config of the run whose workdir holds ``adapter``, if it built the same model."""
  from peftjax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  try:
    config = ckpt_lib.saved_config(adapter.parent)
  except Exception:  # pylint: disable=broad-except  (no run there, or not one we can read)
    return None
  if not isinstance(config, dict):
    return None
  same = json.dumps(config.get('model'), sort_keys=True, default=str) == json.dumps(
      model_config, sort_keys=True, default=str)
  return config if same else None


def _rebuilt_base(adapter: str | os.PathLike, *, base: str = '', check=None):
  """``(where, manifest, run config or {}, method, Built, trainable, base params)`` of a
  causal-LM delta checkpoint: its base rebuilt from the manifest (``base`` replaces its
  ``model.pretrained``) and checked against the manifest's hash; the trained base leaves
  combined in. ``check(method, where, manifest, run)`` runs before anything is built."""
  from peftjax import delta  # pylint: disable=g-import-not-at-top
  from peftjax import peft  # pylint: disable=g-import-not-at-top
  from peftjax import quant  # pylint: disable=g-import-not-at-top
  from peftjax import tree as tree_lib  # pylint: disable=g-import-not-at-top
  from peftjax.models.lm_build import build_lm  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(adapter).expanduser()
  manifest = delta.read_manifest(path)
  where = f'--adapter={str(adapter)!r}'
  if not is_lm_manifest(manifest):
    name = ((manifest.get('base') or {}).get('model_config') or {}).get('name')
    raise LMExportError(f"{where} is an adapter of model.name={name!r}, not a causal LM "
                        f"(model.name='{LM_MODEL}')")
  model_cfg = ml_collections.ConfigDict(manifest['base']['model_config'])
  if base:
    if not pathlib.Path(base).expanduser().exists():
      raise LMExportError(f'--base={base!r} does not exist; valid: the .gguf file or HF '
                          f'directory the adapter was trained on ({model_cfg.pretrained!r})')
    model_cfg.pretrained = base
  run = _run_config_beside(path, manifest['base']['model_config']) or {}
  method = peft.build(ml_collections.ConfigDict(manifest['peft_config']))
  if run.get('quant'):  # QAT/QLoRA: the manifest does not say; the run's config does
    method = quant.wrap(method, ml_collections.ConfigDict(run['quant']))
  if check is not None:
    check(method, where, manifest, run)
  seed = int(run.get('seed', 0))
  built, tokenizer = build_lm(model_cfg, seed=seed)
  trainable, _ = delta.load_delta(path)
  # The base the method trained against (PiSSA keeps a residual there, QLoRA int8), made as the
  # run made it (build_setup): from the method's step-0 parameters.
  length = int((manifest.get('dataset') or {}).get('max_length') or 8)
  ids = jnp.ones((1, length), jnp.int32)
  inputs = {'input_ids': ids, 'attention_mask': ids,
            'positions': jnp.arange(length, dtype=jnp.int32)[None]}
  step0 = method.init(jax.random.key(seed + 1), built.module, built.params, inputs)
  prepared = method.prepare_base(built.params, step0, module=built.module, inputs=inputs)
  trained = set(tree_lib.flatten(trainable.get('base', {})))
  flat = tree_lib.flatten(prepared)
  unknown = sorted(trained - set(flat))
  if unknown:
    raise LMExportError(f'{where}: it trains base leaves {unknown[:3]} that the rebuilt model '
                        'does not have; it is not an adapter of this model')
  frozen = {p: v for p, v in flat.items() if p not in trained}
  try:
    delta.check_base(manifest, tree_lib.unflatten(frozen), path)
  except delta.DeltaError as e:
    if model_cfg.pretrained != 'random':
      hint = ' (pass --base=<the .gguf file or HF directory it was trained on>)'
    else:
      how = 'from the run config beside the adapter' if run else (
          'for want of a run config beside the adapter naming it')
      hint = (f' (the random base was rebuilt with seed {seed} {how}; export the run itself '
              'with --workdir=<run dir>)')
    raise LMExportError(f'{e}{hint}') from None
  params = tree_lib.combine(tree_lib.unflatten(frozen), trainable.get('base', {}))
  return where, manifest, run, method, built, tokenizer, trainable, params, model_cfg


def merged_from_adapter(adapter: str | os.PathLike, *, base: str = ''):
  """``(LlamaConfig, merged params, tokenizer, manifest)`` of a causal-LM delta checkpoint.

  ``base`` replaces the manifest's ``model.pretrained`` (another copy of the same GGUF file or
  HF directory); either way the rebuilt base must hash to the manifest's.

  >>> cfg, params, tok, _ = merged_from_adapter('/tmp/run/adapter.safetensors')  # doctest: +SKIP
  """
  where, manifest, _, method, built, tokenizer, trainable, params, _ = _rebuilt_base(
      adapter, base=base, check=lambda method, where, *_: check_mergeable(method, where))
  try:
    merged = method.merge(params, trainable.get('peft', {}))
  except NotImplementedError as e:
    raise LMExportError(f'{where}: its {method.name} model cannot be merged into plain weights '
                        f'({e})') from None
  return built.module.cfg, merged, tokenizer, manifest


def write_hf(out: str | os.PathLike, cfg, params, tokenizer, *, overwrite: bool = False):
  """Writes merged ``params`` of a :class:`~peftjax.models.llama.LlamaForCausalLM` of ``cfg``
  as an HF ``LlamaForCausalLM`` directory with ``tokenizer``; returns its path.

  An existing empty ``out`` is filled; a non-empty one is replaced only with ``overwrite``.

  >>> write_hf('/tmp/lm_hf', built.module.cfg, merged, tokenizer)  # doctest: +SKIP
  """
  from peftjax.models import hf_llama  # pylint: disable=g-import-not-at-top
  from peftjax.models import llama_convert  # pylint: disable=g-import-not-at-top
  state = llama_convert.hf_from_params(cfg, jax.device_get(params))
  path = pathlib.Path(out).expanduser()
  empty = path.is_dir() and not any(path.iterdir())
  return hf_llama.export_hf_dir(path, cfg.to_hf(), state, tokenizer,
                                overwrite=overwrite or empty)


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike, *,
                   overwrite: bool = False) -> pathlib.Path:
  """The finished causal-LM run in ``workdir``, merged, as an HF directory at ``out``.

  >>> export_workdir('/tmp/lm_run', '/tmp/lm_hf')  # doctest: +SKIP
  PosixPath('/tmp/lm_hf')
  """
  cfg, params, tokenizer = merged_from_workdir(workdir)
  return write_hf(out, cfg, params, tokenizer, overwrite=overwrite)


def export_adapter(adapter: str | os.PathLike, out: str | os.PathLike, *, base: str = '',
                   overwrite: bool = False) -> pathlib.Path:
  """A causal-LM delta checkpoint merged into its base, as an HF directory at ``out``.

  >>> export_adapter('/tmp/lm_run/adapter.safetensors', '/tmp/lm_hf')  # doctest: +SKIP
  PosixPath('/tmp/lm_hf')
  """
  cfg, params, tokenizer, _ = merged_from_adapter(adapter, base=base)
  return write_hf(out, cfg, params, tokenizer, overwrite=overwrite)


def merged_from_peft_dir(adapter_dir: str | os.PathLike, *, base: str = ''):
  """``(LlamaConfig, merged params, tokenizer, info)`` of an HF PEFT LoRA adapter of a
  ``LlamaForCausalLM`` (:func:`peftjax.hf.peft_llama_import.load_peft_llama`) merged into
  ``base`` (a ``.gguf`` file or HF directory; default: the bundled SmolLM2-135M-Instruct,
  whatever the adapter's ``base_model_name_or_path`` says): PEFT's ``merge_and_unload``.

  >>> cfg, params, tok, info = merged_from_peft_dir('/tmp/lm_peft', base='')  # doctest: +SKIP
  """
  from peftjax.hf import peft_llama_import  # pylint: disable=g-import-not-at-top
  from peftjax.models.lm_build import build_lm  # pylint: disable=g-import-not-at-top
  if base and not pathlib.Path(base).expanduser().exists():
    raise LMExportError(f'--base={base!r} does not exist; valid: the .gguf file or HF '
                        'directory the PEFT adapter was trained on')
  model_cfg = ml_collections.ConfigDict(dict(name=LM_MODEL, pretrained=base, num_layers=0,
                                             scan_layers=True, remat='none', grad_barrier=True))
  built, tokenizer = build_lm(model_cfg)
  cfg = built.module.cfg
  trainable, info = peft_llama_import.load_peft_llama(adapter_dir, cfg)
  params = peft_llama_import.with_tables(jax.device_get(built.params), trainable['base'])
  method = peft_llama_import.lora_method(info)
  return cfg, method.merge(params, trainable['peft']), tokenizer, info


# Methods of a causal-LM run that have no plain PEFT LoRA form, and why.
_NO_PEFT_FORM = {
    'dora': "DoRA's magnitude vector rescales each column of the merged weight, which a plain "
            'LoRA adapter cannot express',
    'pissa': "PiSSA's factors are relative to a residual base (the base minus its top singular "
             'directions), not to the published model PEFT would apply them to',
}


def check_peft_export(peft_cfg, run: dict, where: str) -> None:
  """Refuses, before anything is built, a run whose adapter the PEFT LoRA format cannot hold
  exactly: a method other than (rs)LoRA, an int8 (QAT/QLoRA) base, a compressed base.

  >>> check_peft_export(config.peft, config.to_dict(), '--workdir=...')  # doctest: +SKIP
  """
  method = peft_cfg.get('method')
  if method != 'lora':
    why = _NO_PEFT_FORM.get(method, f'{method!r} is not a LoRA')
    raise LMExportError(f"{where}: --format=peft writes plain LoRA adapters; its method "
                        f"{method!r} has none ({why}); valid: a peft.method='lora' run "
                        '(rsLoRA: peft.lora.rslora=True), or --format=merged')
  quant = run.get('quant') or {}
  if quant.get('qat') or quant.get('qlora'):
    flag = 'quant.qat' if quant.get('qat') else 'quant.qlora'
    raise LMExportError(f'{where}: {flag}=True: the adapter was trained on an int8-quantized '
                        'base, and PEFT applies a LoRA to the float base, which is another '
                        'model; valid: --format=merged')
  cc = run.get('compress') or {}
  active = [(f, v) for f, v in (
      ('compress.init_from', cc.get('init_from')),
      ('compress.distill.teacher', (cc.get('distill') or {}).get('teacher')),
      ('compress.prune.kind', (cc.get('prune') or {}).get('kind', 'none')),
      ('compress.lowrank.targets', (cc.get('lowrank') or {}).get('targets')))
      if v and v != 'none']
  if active:
    raise LMExportError(f'{where}: {active[0][0]}={active[0][1]!r}: the adapter was trained on '
                        'a changed base, not the published checkpoint a PEFT adapter names; '
                        'valid: --format=merged')


def _check_peft_model(model_cfg, cfg, trained_base: dict, where: str) -> None:
  """Refuses trained base leaves and a checkpoint cut to fewer layers (``model.num_layers``):
  a PEFT adapter holds LoRA factors only, and applies to the whole published checkpoint."""
  from peftjax import tree as tree_lib  # pylint: disable=g-import-not-at-top
  from peftjax.models.lm_build import lm_config  # pylint: disable=g-import-not-at-top
  leaves = sorted(tree_lib.flatten(trained_base or {}))
  if leaves:
    raise LMExportError(f'{where}: it also trains base leaves {leaves[:3]}, which a PEFT LoRA '
                        'adapter cannot hold; valid: --format=merged')
  n = int(model_cfg.get('num_layers') or 0)
  if n and model_cfg.get('pretrained') != 'random':
    full, _, _ = lm_config(ml_collections.ConfigDict({**model_cfg.to_dict(), 'num_layers': 0}))
    if n < full.num_layers:
      raise LMExportError(f'{where}: model.num_layers={n} keeps {n} of the checkpoint\'s '
                          f'{full.num_layers} layers; a PEFT adapter applies to the whole '
                          'checkpoint and would give other logits there; valid: --format=merged '
                          f'(an exact LlamaForCausalLM of these {cfg.num_layers} layers)')


def _write_peft(out, lora, cfg, lora_cfg, pretrained: str, *, overwrite: bool) -> pathlib.Path:
  from peftjax.hf import peft_llama  # pylint: disable=g-import-not-at-top
  return peft_llama.save_peft_llama(
      pathlib.Path(out).expanduser(), jax.device_get(lora), cfg, rank=int(lora_cfg['rank']),
      alpha=float(lora_cfg['alpha']), rslora=bool(lora_cfg.get('rslora', False)),
      base_model_name_or_path=peft_llama.base_name(pretrained),
      dropout=float(lora_cfg.get('dropout', 0.0) or 0.0), overwrite=overwrite)


def export_peft_workdir(workdir: str | os.PathLike, out: str | os.PathLike, *,
                        overwrite: bool = False) -> pathlib.Path:
  """The LoRA of the finished causal-LM run in ``workdir`` as an HF PEFT adapter directory
  (``LlamaForCausalLM``, :mod:`peftjax.hf.peft_llama`) at ``out``.

  >>> export_peft_workdir('/tmp/lm_run', '/tmp/lm_peft')  # doctest: +SKIP
  PosixPath('/tmp/lm_peft')
  """
  from peftjax import run as run_lib  # pylint: disable=g-import-not-at-top
  config = run_config(workdir)
  where = f'--workdir={str(workdir)!r}'
  check_peft_export(config.peft, config.to_dict(), where)
  setup, params = run_lib.restore_trained(config, str(workdir))
  cfg = setup.built.module.cfg
  _check_peft_model(config.model, cfg, setup.trainable['base'], where)
  return _write_peft(out, params['peft'], cfg, config.peft.lora, config.model.pretrained,
                     overwrite=overwrite)


def export_peft_adapter(adapter: str | os.PathLike, out: str | os.PathLike, *, base: str = '',
                        overwrite: bool = False) -> pathlib.Path:
  """A causal-LM delta checkpoint's LoRA as an HF PEFT adapter directory at ``out``; its base
  is rebuilt and checked against the manifest's hash first (``base``: another copy of it).

  >>> export_peft_adapter('/tmp/lm_run/adapter.safetensors', '/tmp/lm_peft')  # doctest: +SKIP
  PosixPath('/tmp/lm_peft')
  """
  check = lambda method, where, manifest, run: check_peft_export(manifest['peft_config'], run,
                                                                 where)
  where, manifest, _, _, built, _, trainable, _, model_cfg = _rebuilt_base(adapter, base=base,
                                                                          check=check)
  cfg = built.module.cfg
  _check_peft_model(model_cfg, cfg, trainable.get('base'), where)
  return _write_peft(out, trainable.get('peft', {}), cfg, manifest['peft_config']['lora'],
                     model_cfg.pretrained, overwrite=overwrite)


__all__ = ['LMExportError', 'is_lm_manifest', 'run_config', 'check_mergeable',
           'merged_from_workdir', 'merged_from_adapter', 'write_hf', 'export_workdir',
           'export_adapter', 'merged_from_peft_dir', 'check_peft_export', 'export_peft_workdir',
           'export_peft_adapter']
