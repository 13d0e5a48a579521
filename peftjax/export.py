r"""Export an adapter to Hugging Face formats.

  # the adapter merged into the base: an HF BERT directory (config.json, model.safetensors and
  # the tokenizer), usable as --config.model.pretrained and by transformers
  python -m peftjax.export --adapter=/tmp/run/adapter.safetensors --format=merged --out=/tmp/m
  # a LoRA adapter in the HF PEFT format (adapter_config.json + adapter_model.safetensors)
  python -m peftjax.export --adapter=/tmp/run/adapter.safetensors --format=peft --out=/tmp/p
  # an HF PEFT LoRA adapter (a directory) merged into its base: PEFT's merge_and_unload
  python -m peftjax.export --adapter=/path/to/peft_adapter --base=/path/to/bert --out=/tmp/m2

For a delta checkpoint the base is rebuilt from the adapter's manifest (``--base`` points at
another copy of the same HF directory) and must match the adapter's base hash. For an HF PEFT
adapter directory the base is ``--base`` (default: the bundled MiniLM), and the model pools as
the adapter's head needs (``'cls_pooler'`` for a ``BertForSequenceClassification`` head).
Everything is checked before anything is written; the output directory is written atomically,
and an existing non-empty one is refused unless ``--overwrite``.
"""
from __future__ import annotations

from absl import app
from absl import flags

from peftjax import cli

FORMATS = ('merged', 'peft')


def define_flags():
  """The command-line flags (defined only when run as a program; see peftjax.predict)."""
  flags.DEFINE_string('adapter', None, 'Delta checkpoint (adapter.safetensors), or an HF PEFT '
                      'LoRA adapter directory.')
  flags.DEFINE_enum('format', 'merged', FORMATS, 'merged: HF BERT directory; peft: HF PEFT LoRA '
                    'adapter directory.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_string('base', '', 'HF BERT directory of the base model; default: the adapter '
                      "manifest's source (the bundled MiniLM for an HF PEFT adapter).")
  flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory.')
  flags.mark_flags_as_required(['adapter', 'out'])


def run(adapter: str, out: str, *, fmt: str = 'merged', base: str = '',
        overwrite: bool = False):
  """Exports ``adapter`` (a delta checkpoint, or an HF PEFT adapter directory) to ``out`` in
  format ``fmt``; returns the output path."""
  import pathlib  # pylint: disable=g-import-not-at-top
  from peftjax.hf import ExportError  # pylint: disable=g-import-not-at-top
  from peftjax.serving import hf  # pylint: disable=g-import-not-at-top
  from peftjax.serving.files import library_from_files  # pylint: disable=g-import-not-at-top
  if fmt not in FORMATS:
    raise ExportError(f'--format={fmt!r}; valid: {", ".join(FORMATS)}')
  _check_out(out, overwrite, adapter=adapter, base=base)
  if pathlib.Path(adapter).is_dir():
    lib, _, _ = hf.library_from_peft(adapter, base=base)
  else:
    if fmt == 'peft':
      hf.check_peft_export(adapter, base=base)  # before the base is built
    lib, _, _ = library_from_files({'adapter': adapter}, base=base)
  export = hf.export_merged if fmt == 'merged' else hf.export_peft
  return export(lib, 'adapter', out, overwrite=overwrite)


def _check_out(out: str, overwrite: bool, *, adapter: str = '', base: str = '') -> None:
  """Refuses an output that cannot be written, before the (slow) model is built: an empty
  ``--out``, a file, a non-empty directory without ``--overwrite``, a directory that
  ``--overwrite`` would replace although it holds the ``--adapter`` or ``--base`` being read, a
  place that cannot be written; and an ``--adapter`` that does not exist."""
  import pathlib  # pylint: disable=g-import-not-at-top
  from peftjax import storage  # pylint: disable=g-import-not-at-top
  from peftjax.hf import ExportError  # pylint: disable=g-import-not-at-top
  if not adapter or not str(adapter).strip():
    raise ExportError("--adapter='' is empty; valid: a delta checkpoint (adapter.safetensors) "
                      'or an HF PEFT adapter directory')
  if not pathlib.Path(adapter).expanduser().exists():
    raise ExportError(f'--adapter={adapter!r} does not exist; valid: a delta checkpoint '
                      '(adapter.safetensors, written with train.save_adapter=True) or an HF PEFT '
                      'adapter directory')
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
    for flag, src in (('--adapter', adapter), ('--base', base)):
      if src and pathlib.Path(src).expanduser().exists():
        s = pathlib.Path(src).expanduser().resolve()
        if s == here or here in s.parents:
          raise ExportError(f'--out={out!r} holds the {flag}={src!r} being exported; replacing '
                            'it would delete the source; choose another directory')
  try:
    storage.probe_writable(path.parent if not path.exists() else path)
  except OSError as e:
    raise ExportError(f'--out={out!r} cannot be written: '
                      f'{e.strerror + " (" + str(path.parent) + ")" if e.strerror else e}') from None


def main(argv):
  cli.quiet(argv)
  from peftjax.data import AssetNotFoundError  # pylint: disable=g-import-not-at-top
  from peftjax.errors import UserInputError  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    path = run(f.adapter, f.out, fmt=f.format, base=f.base, overwrite=f.overwrite)
  except (UserInputError, AssetNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'exported {f.adapter} ({f.format}) -> {path}')


if __name__ == '__main__':
  define_flags()
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main)
