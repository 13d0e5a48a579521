r"""Export an adapter to Hugging Face formats.

  # the adapter merged into the base: an HF BERT directory (config.json, model.safetensors and
  # the tokenizer), usable as --config.model.pretrained and by transformers
  python -m peftjax.export --adapter=/tmp/run/adapter.safetensors --format=merged --out=/tmp/m
  # a LoRA adapter in the HF PEFT format (adapter_config.json + adapter_model.safetensors)
  python -m peftjax.export --adapter=/tmp/run/adapter.safetensors --format=peft --out=/tmp/p
  # an HF PEFT LoRA adapter (a directory) merged into its base: PEFT's merge_and_unload (a
  # CAUSAL_LM adapter of a Llama-type model: --base is its .gguf file or HF directory)
  python -m peftjax.export --adapter=/path/to/peft_adapter --base=/path/to/bert --out=/tmp/m2
  # a finished causal-LM run (configs/lm_tiny.py, lm_quickstart.py), merged: an HF
  # LlamaForCausalLM directory with its tokenizer and chat template
  python -m peftjax.export --workdir=/tmp/lm_run --format=merged --out=/tmp/lm_hf
  # the same from the run's adapter file (written with --config.train.save_adapter=True)
  python -m peftjax.export --adapter=/tmp/lm_run/adapter.safetensors --out=/tmp/lm_hf
  # a causal-LM LoRA run as an HF PEFT adapter for LlamaForCausalLM
  python -m peftjax.export --workdir=/tmp/lm_run --format=peft --out=/tmp/lm_peft

For a delta checkpoint the base is rebuilt from the adapter's manifest (``--base`` points at
another copy of the same HF directory) and must match the adapter's base hash. For an HF PEFT
adapter directory the base is ``--base`` (default: the bundled MiniLM), and the model pools as
the adapter's head needs (``'cls_pooler'`` for a ``BertForSequenceClassification`` head); a
``CAUSAL_LM`` adapter of a Llama-type model is merged into ``--base`` (a ``.gguf`` file or HF
directory; default: the bundled SmolLM2-135M-Instruct) and written as ``LlamaForCausalLM``.
A causal LM (``model.name='llama'``, a run's directory or its adapter file) is exported merged as
an HF ``LlamaForCausalLM`` directory (:mod:`peftjax.models.lm_export`); ``--base`` then names
another copy of its ``.gguf`` file or HF directory. ``--format=peft`` writes a LoRA run of
either as an HF PEFT adapter (for a causal LM: ``LlamaForCausalLM``, task ``CAUSAL_LM``, see
:mod:`peftjax.hf.peft_llama`).
Everything is checked before anything is written; the output directory is written atomically,
and an existing non-empty one is refused unless ``--overwrite``.
"""
from __future__ import annotations

from absl import flags

from peftjax import cli

FORMATS = ('merged', 'peft')


def define_flags():
  """The command-line flags (defined only when run as a program; see peftjax.predict)."""
  flags.DEFINE_string('adapter', None, 'Delta checkpoint (adapter.safetensors), or an HF PEFT '
                      'LoRA adapter directory.')
  flags.DEFINE_string('workdir', None, 'A finished causal-LM run directory (instead of '
                      '--adapter): exported as an HF LlamaForCausalLM directory (merged) or '
                      'PEFT adapter (peft).')
  flags.DEFINE_enum('format', 'merged', FORMATS, 'merged: HF BERT (or, for a causal LM, '
                    'LlamaForCausalLM) directory; peft: HF PEFT LoRA adapter directory.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_string('base', '', 'HF BERT directory of the base model (for a causal LM: its '
                      ".gguf file or HF directory); default: the adapter manifest's source (the "
                      'bundled MiniLM for an HF PEFT adapter).')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory.')
  flags.mark_flags_as_required(['out'])


def run(adapter: str | None, out: str, *, fmt: str = 'merged', base: str = '',
        overwrite: bool = False, workdir: str | None = None):
  """Exports ``adapter`` (a delta checkpoint, or an HF PEFT adapter directory) or the finished
  causal-LM run in ``workdir`` to ``out`` in format ``fmt``; returns the output path.

  >>> run(None, '/tmp/lm_hf', workdir='/tmp/lm_run')  # doctest: +SKIP
  PosixPath('/tmp/lm_hf')
  """
  import pathlib  # pylint: disable=g-import-not-at-top
  from peftjax import delta  # pylint: disable=g-import-not-at-top
  from peftjax.hf import ExportError  # pylint: disable=g-import-not-at-top
  from peftjax.hf import peft_llama_import  # pylint: disable=g-import-not-at-top
  from peftjax.models import lm_export  # pylint: disable=g-import-not-at-top
  from peftjax.serving import hf  # pylint: disable=g-import-not-at-top
  from peftjax.serving.files import library_from_files  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ExportError(f'--format={fmt!r}; valid: {", ".join(FORMATS)}')
  if adapter is not None and workdir is not None:
    raise ExportError(f'--adapter={adapter!r} and --workdir={workdir!r} are both given; valid: '
                      'one of them (--workdir: a finished causal-LM run; --adapter: a delta '
                      'checkpoint or an HF PEFT adapter directory)')
  if workdir is not None:
    _check_out(out, overwrite, source=workdir, flag='--workdir', base=base)
    if base:
      raise ExportError(f'--base={base!r} is for --adapter; a --workdir run is rebuilt from its '
                        "own config (its model.pretrained)")
    lm_export.run_config(workdir)  # a finished causal-LM run, before anything is built
    if fmt == 'peft':
      return lm_export.export_peft_workdir(workdir, out, overwrite=overwrite)
    return lm_export.export_workdir(workdir, out, overwrite=overwrite)
  _check_out(out, overwrite, source=adapter, base=base)
  if pathlib.Path(adapter).is_dir():
    if peft_llama_import.is_causal_lm_adapter(adapter):
      if fmt == 'peft':
        raise ExportError(f'--adapter={adapter!r} is already an HF PEFT adapter of a causal LM; '
                          'valid: --format=merged (merged into --base, default the bundled '
                          'SmolLM2-135M-Instruct)')
      cfg, params, tokenizer, _ = lm_export.merged_from_peft_dir(adapter, base=base)
      return lm_export.write_hf(out, cfg, params, tokenizer, overwrite=overwrite)
    lib, _, _ = hf.library_from_peft(adapter, base=base)
  else:
    if lm_export.is_lm_manifest(delta.read_manifest(adapter)):
      if fmt == 'peft':
        return lm_export.export_peft_adapter(adapter, out, base=base, overwrite=overwrite)
      return lm_export.export_adapter(adapter, out, base=base, overwrite=overwrite)
    if fmt == 'peft':
      hf.check_peft_export(adapter, base=base)  # before the base is built
    lib, _, _ = library_from_files({'adapter': adapter}, base=base)
  export = hf.export_merged if fmt == 'merged' else hf.export_peft
  return export(lib, 'adapter', out, overwrite=overwrite)


_VALID_SOURCE = {
    '--adapter': 'a delta checkpoint (adapter.safetensors, written with train.save_adapter=True) '
                 'or an HF PEFT adapter directory; or --workdir=<a finished causal-LM run>',
    '--workdir': 'the directory of a finished causal-LM run (python -m peftjax.main '
                 '--config=configs/lm_tiny.py --workdir=...)',
}


def _check_out(out: str, overwrite: bool, *, source: str | None = '', flag: str = '--adapter',
               base: str = '') -> None:
  """Refuses an output that cannot be written, before the (slow) model is built: an empty
  ``--out``, a file, a non-empty directory without ``--overwrite``, a directory that
  ``--overwrite`` would replace although it holds the ``source`` (``--adapter`` or
  ``--workdir``) or ``--base`` being read, a place that cannot be written; and a ``source``
  that does not exist."""
  import pathlib  # pylint: disable=g-import-not-at-top
  from peftjax import storage  # pylint: disable=g-import-not-at-top
  from peftjax.hf import ExportError  # pylint: disable=g-import-not-at-top
  if source is None:
    raise ExportError('neither --adapter nor --workdir is given; valid: --adapter='
                      f"<{_VALID_SOURCE['--adapter']}>")
  if not str(source).strip():
    raise ExportError(f"{flag}='' is empty; valid: {_VALID_SOURCE[flag]}")
  if not pathlib.Path(source).expanduser().exists():
    raise ExportError(f'{flag}={source!r} does not exist; valid: {_VALID_SOURCE[flag]}')
  if not out or not str(out).strip():
    raise ExportError("--out='' is empty; valid: a new or empty directory")
  path = pathlib.Path(out).expanduser()
  if path.exists() and not path.is_dir():
    raise ExportError(f'--out={out!r} exists and is not a directory; valid: a new or empty '
                      'directory (or an existing one with --overwrite)')
  if path.is_dir() and any(path.iterdir()) and not overwrite:
    raise ExportError(f'--out={out!r}: output directory exists and is not empty; pass '
                      '--overwrite to replace it, or choose a new directory')
  if path.is_dir():
    here = path.resolve()
    for name, src in ((flag, source), ('--base', base)):
      if src and pathlib.Path(src).expanduser().exists():
        s = pathlib.Path(src).expanduser().resolve()
        if s == here or here in s.parents:
          raise ExportError(f'--out={out!r} holds the {name}={src!r} being exported; replacing '
                            'it would delete the source; choose another directory')
  try:
    storage.probe_writable(path.parent if not path.exists() else path)
  except OSError as e:
    why = f'{e.strerror} ({path.parent})' if e.strerror else str(e)
    raise ExportError(f'--out={out!r} cannot be written: {why}') from None


def main(argv):
  cli.quiet(argv)
  from peftjax.data import AssetNotFoundError  # pylint: disable=g-import-not-at-top
  from peftjax.errors import UserInputError  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    path = run(f.adapter, f.out, fmt=f.format, base=f.base, overwrite=f.overwrite,
               workdir=f.workdir)
  except (UserInputError, AssetNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'exported {f.adapter if f.workdir is None else f.workdir} ({f.format}) -> {path}')


if __name__ == '__main__':
  define_flags()
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main)
