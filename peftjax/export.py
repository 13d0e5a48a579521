r"""Export an adapter to Hugging Face formats.

  # the adapter merged into the base: an HF BERT directory (config.json + model.safetensors)
  python -m peftjax.export --adapter=/tmp/run/adapter.safetensors --format=merged --out=/tmp/m
  # a LoRA adapter in the HF PEFT format (adapter_config.json + adapter_model.safetensors)
  python -m peftjax.export --adapter=/tmp/run/adapter.safetensors --format=peft --out=/tmp/p

The base is rebuilt from the adapter's manifest (``--base`` points at another copy of the same
HF directory) and must match the adapter's base hash. The output directory is written
atomically; an existing non-empty one is refused unless ``--overwrite``.
"""
from __future__ import annotations

from absl import app
from absl import flags

from peftjax import cli

FORMATS = ('merged', 'peft')


def define_flags():
  """The command-line flags (defined only when run as a program; see peftjax.predict)."""
  flags.DEFINE_string('adapter', None, 'Delta checkpoint (adapter.safetensors).')
  flags.DEFINE_enum('format', 'merged', FORMATS, 'merged: HF BERT directory; peft: HF PEFT LoRA '
                    'adapter directory.')
  flags.DEFINE_string('out', None, 'Output directory.')
  flags.DEFINE_string('base', '', 'HF BERT directory of the base model; default: the adapter '
                      "manifest's source.")
  flags.DEFINE_bool('overwrite', False, 'Replace an existing output directory.')
  flags.mark_flags_as_required(['adapter', 'out'])


def run(adapter: str, out: str, *, fmt: str = 'merged', base: str = '',
        overwrite: bool = False):
  """Exports ``adapter`` to ``out`` in format ``fmt``; returns the output path."""
  from peftjax.serving import hf  # pylint: disable=g-import-not-at-top
  from peftjax.serving.files import library_from_files  # pylint: disable=g-import-not-at-top
  lib, _, _ = library_from_files({'adapter': adapter}, base=base)
  export = hf.export_merged if fmt == 'merged' else hf.export_peft
  return export(lib, 'adapter', out, overwrite=overwrite)


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
