r"""Label a JSONL file with several adapters over one base, in mixed batches.

  python -m peftjax.predict \
      --adapter sentiment=/tmp/run_a/adapter.safetensors \
      --adapter reviews=/tmp/run_b/adapter.safetensors \
      --input requests.jsonl --output predictions.jsonl

Each input line is a JSON object ``{"text": ..., "adapter": <name>}`` (``"adapter"`` may be left
out when ``--default_adapter`` is given or only one adapter is loaded; an ``"id"`` is copied
through). Lines naming different adapters share a batch: every batch is one forward pass with a
per-example adapter index (see :mod:`peftjax.serving`). Each output line is
``{"line", "id"?, "adapter", "label", "probs": {class: p}}``, in input order.

The base model is rebuilt from the first adapter's manifest (its model config and base
source; ``--base`` points at another copy of the same HF directory), and every adapter must
match its weights' hash. The whole input is validated before any compute: a malformed line or
an unknown adapter name fails with the line number, and the output file is written atomically,
so it is either complete or absent.
"""
from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

from peftjax import cli
from peftjax.errors import UserInputError


def define_flags():
  """The command-line flags (defined only when run as a program, so the module imports
  cleanly next to other entry points)."""
  flags.DEFINE_multi_string('adapter', [], 'name=path of a delta checkpoint '
                            '(adapter.safetensors); repeat for several adapters.')
  flags.DEFINE_string('input', None, 'JSONL file of {"text", "adapter"} records.')
  flags.DEFINE_string('output', None, 'JSONL file to write predictions to.')
  flags.DEFINE_string('base', '', 'HF BERT directory of the base model; default: the '
                      "first adapter manifest's source (the bundled MiniLM if it was).")
  flags.DEFINE_string('default_adapter', '', 'Adapter for lines without "adapter".')
  flags.DEFINE_integer('batch_size', 64, 'Examples per forward pass.')
  flags.DEFINE_integer('max_length', 0, 'Tokens per example; 0 = the max_length '
                       "of the first adapter's training data config (or 64).")
  flags.DEFINE_integer('max_rank', 0, 'Padded LoRA rank; 0 = the largest loaded.')
  flags.mark_flags_as_required(['input', 'output'])


class PredictError(UserInputError):
  """Bad serving input: the message names the flag or the input line."""


def parse_adapters(specs: list[str]) -> dict[str, str]:
  """``['a=x.safetensors', ...]`` -> ``{'a': 'x.safetensors'}``, with clear errors.

  Every path must be an existing file (a directory, such as the run that wrote the adapter, is
  refused naming the file it probably meant).

  >>> parse_adapters(['pos=/tmp/a.safetensors'])  # doctest: +SKIP
  {'pos': '/tmp/a.safetensors'}
  """
  if not specs:
    raise PredictError('no --adapter given; pass at least one as --adapter name=path')
  out = {}
  for spec in specs:
    name, sep, path = spec.partition('=')
    if not sep or not name.strip() or not path:
      raise PredictError(f'--adapter={spec!r} is invalid; valid: name=path/to/adapter.safetensors')
    if name in out:
      raise PredictError(f'--adapter name {name!r} is given twice')
    p = pathlib.Path(path).expanduser()
    if p.is_dir():
      hint = (f' (did you mean {str(p / "adapter.safetensors")!r}?)'
              if (p / 'adapter.safetensors').is_file() else '')
      raise PredictError(f'--adapter {name}={path!r} is a directory; valid: an adapter file '
                         f'(adapter.safetensors, written with train.save_adapter=True){hint}')
    if not p.exists():
      raise PredictError(f'--adapter {name}={path!r} does not exist; valid: an adapter file '
                         '(adapter.safetensors, written with train.save_adapter=True)')
    out[name] = path
  return out


def check_output(output_path: str, input_path: str, adapters: dict[str, str]) -> pathlib.Path:
  """The ``--output`` file as a path, refused (naming the flag) if it is empty, a directory, in a
  directory that is missing or not writable, or the input or an adapter file itself."""
  from peftjax import storage  # pylint: disable=g-import-not-at-top
  if not output_path or not output_path.strip():
    raise PredictError("--output='' is empty; valid: a file path, e.g. predictions.jsonl")
  out = pathlib.Path(output_path).expanduser().absolute()
  if out.is_dir():
    raise PredictError(f'--output={output_path!r} is a directory; valid: a file path, e.g. '
                       f'{str(out / "predictions.jsonl")!r}')
  if not out.parent.exists():
    raise PredictError(f'--output={output_path!r}: directory {str(out.parent)!r} does not exist')
  if not out.parent.is_dir():
    raise PredictError(f'--output={output_path!r}: {str(out.parent)!r} is not a directory')
  try:
    storage.probe_writable(out.parent)
  except OSError as e:
    raise PredictError(f'--output={output_path!r}: directory {str(out.parent)!r} is not '
                       f'writable ({e.strerror or e})') from None
  if out.exists():
    for flag, other in [('--input', input_path)] + [(f'--adapter {n}', p)
                                                    for n, p in adapters.items()]:
      if pathlib.Path(other).exists() and out.samefile(other):
        raise PredictError(f'--output={output_path!r} is the {flag} file; it would be '
                           'overwritten; choose another output path')
  return out


def read_requests(path: str, names: list[str], default: str = '') -> list[dict]:
  """Every line of a JSONL input, validated: ``[{'line', 'text', 'adapter', 'id'?}]``.

  Raises :class:`PredictError` naming the first bad line (1-based) and what is wrong with it.
  The file must be UTF-8 (a byte-order mark is allowed).
  """
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    raise PredictError(f'--input={path!r} is a directory; valid: a JSONL file of '
                       '{"text", "adapter"} records')
  if not p.is_file():
    raise PredictError(f'--input={path!r} does not exist')
  if not default and len(names) == 1:
    default = names[0]
  out = []
  with open(p, 'rb') as f:
    for n, raw_bytes in enumerate(f, start=1):
      where = f'{path}:{n}'
      try:
        raw = raw_bytes.decode('utf-8-sig' if n == 1 else 'utf-8')
      except UnicodeDecodeError as e:
        bad = raw_bytes[e.start:e.start + 1]
        raise PredictError(f'{where}: not UTF-8 text (byte {bad!r} at column {e.start + 1}); '
                           'valid: a UTF-8 JSONL file (convert it, e.g. iconv -t UTF-8)') from None
      if not raw.strip():
        continue  # blank lines (e.g. a trailing newline) are not records
      try:
        rec = json.loads(raw)
      except json.JSONDecodeError as e:
        raise PredictError(f'{where}: not valid JSON ({e.msg} at column {e.colno}); valid: one '
                           'JSON object per line, e.g. {"text": "...", "adapter": "..."}') from None
      if not isinstance(rec, dict):
        raise PredictError(f'{where}: a record must be a JSON object with "text", got '
                           f'{type(rec).__name__}')
      if 'text' not in rec:
        raise PredictError(f'{where}: the record has no "text" (keys: {sorted(rec)[:5]}); '
                           'valid: {"text": "...", "adapter": "..."}')
      text = rec['text']
      if not isinstance(text, str):
        raise PredictError(f'{where}: "text" must be a string, got {text!r}')
      adapter = rec.get('adapter', default)
      if not isinstance(adapter, str):
        raise PredictError(f'{where}: "adapter" must be a string naming a loaded adapter, got '
                           f'{adapter!r}; loaded: {names}')
      if adapter not in names:
        raise PredictError(f'{where}: unknown adapter {adapter!r}; loaded: {names}'
                           if adapter else f'{where}: no "adapter" and no --default_adapter')
      item = {'line': n, 'text': text, 'adapter': adapter}
      if 'id' in rec:
        item['id'] = rec['id']
      out.append(item)
  if not out:
    raise PredictError(f'--input={path!r} has no records (it is empty or only blank lines); '
                       'valid: one JSON object per line, e.g. {"text": "...", "adapter": "..."}')
  return out


def check_adapters(adapters: dict[str, str], manifests: dict[str, dict], *, base: str,
                   max_length: int, max_rank: int):
  """Checks against the adapter manifests and the base's config, before any model is built:
  BERT text classifiers only, LoRA ranks within ``--max_rank``, ``--max_length`` within the
  base's positions. Returns ``(base directory, tokens per example)``."""
  from peftjax.serving import files  # pylint: disable=g-import-not-at-top
  for name, m in manifests.items():
    model = (m['base'].get('model_config') or {}).get('name', 'bert')
    if model != 'bert':
      raise PredictError(f'--adapter {name}={adapters[name]!r} is for model.name={model!r}; '
                         'peftjax.predict labels text with BERT adapters')
    rank = int(m['peft_config'].get('lora', {}).get('rank', 1)) if 'lora' in m['method'] else 0
    if max_rank and rank > max_rank:
      raise PredictError(f'--max_rank={max_rank} is below the LoRA rank {rank} of --adapter '
                         f'{name}; valid: >= {rank}, or 0 (the largest loaded)')
  first = next(iter(manifests.values()))
  directory = files.base_dir(first['base']['model_config'], base)
  positions = files.max_positions(directory)
  trained = int((first.get('dataset') or {}).get('max_length') or 64)
  length = max_length or trained
  if positions is not None and length > positions:
    if max_length:
      raise PredictError(f'--max_length={max_length} exceeds the base model\'s {positions} '
                         f'positions; valid: 2..{positions} (0 = the training length, {trained})')
    length = positions
  return directory, length

def predict(lib, requests: list[dict], class_names: dict[str, list], tokenizer, *,
            batch_size: int = 64, progress: bool = True) -> list[dict]:
  """Predictions for validated ``requests``, in order: fixed-size mixed batches (the last one
  padded with copies of its first row, so every batch has the same shape and one program)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tqdm  # pylint: disable=g-import-not-at-top
  out = []
  bar = tqdm.tqdm(total=len(requests), desc='predict', unit='ex', file=sys.stderr,
                  disable=not progress)
  for start in range(0, len(requests), batch_size):
    chunk = requests[start:start + batch_size]
    pad = [chunk[0]] * (batch_size - len(chunk))
    rows = chunk + pad
    inputs = tokenizer.encode([r['text'] for r in rows])
    logits = lib.logits(inputs, adapters=[r['adapter'] for r in rows])
    probs = np.asarray(jax.nn.softmax(logits.astype(np.float32), axis=-1))[:len(chunk)]
    for r, p in zip(chunk, probs):
      names = class_names[r['adapter']]
      rec = {'line': r['line'], **({'id': r['id']} if 'id' in r else {}),
             'adapter': r['adapter'], 'label': names[int(np.argmax(p))],
             'probs': {c: round(float(q), 6) for c, q in zip(names, p)}}
      out.append(rec)
    bar.update(len(chunk))
  bar.close()
  return out


def run(adapter_specs: list[str], input_path: str, output_path: str, *, base: str = '',
        default_adapter: str = '', batch_size: int = 64, max_length: int = 0,
        max_rank: int = 0, progress: bool = True) -> dict:
  """The whole job (what ``main`` calls); returns a summary. Every flag, the whole input and
  the adapters' manifests are checked before a model is built, and the output is written
  atomically at the end: on any error it is absent (or the earlier file is intact)."""
  from peftjax import storage  # pylint: disable=g-import-not-at-top
  if not isinstance(batch_size, int) or batch_size < 1:
    raise PredictError(f'--batch_size={batch_size} is invalid; valid: a positive integer')
  if not isinstance(max_length, int) or max_length < 0 or max_length == 1:
    raise PredictError(f'--max_length={max_length} is invalid; valid: 0 (the training length) '
                       'or an integer >= 2 (room for [CLS] and [SEP])')
  if not isinstance(max_rank, int) or max_rank < 0:
    raise PredictError(f'--max_rank={max_rank} is invalid; valid: 0 (the largest loaded) or a '
                       'positive integer')
  adapters = parse_adapters(adapter_specs)
  if default_adapter and default_adapter not in adapters:
    raise PredictError(f'--default_adapter={default_adapter!r} is not among the loaded '
                       f'adapters {list(adapters)}')
  out_path = check_output(output_path, input_path, adapters)
  requests = read_requests(input_path, list(adapters), default_adapter)

  from peftjax.data.tokenize import Tokenizer  # pylint: disable=g-import-not-at-top
  from peftjax.serving import files  # pylint: disable=g-import-not-at-top
  manifests = files.read_manifests(adapters)
  directory, length = check_adapters(adapters, manifests, base=base, max_length=max_length,
                                     max_rank=max_rank)
  lib, class_names, _ = files.library_from_files(adapters, base=base, max_rank=max_rank,
                                                 manifests=manifests)
  tokenizer = Tokenizer(pathlib.Path(directory or lib.base_source) / 'tokenizer.json',
                        max_length=length)
  preds = predict(lib, requests, class_names, tokenizer, batch_size=batch_size,
                  progress=progress)
  storage.write_bytes_atomic(out_path, ''.join(json.dumps(p) + '\n' for p in preds).encode())
  counts = {n: sum(r['adapter'] == n for r in requests) for n in adapters}
  return {'records': len(preds), 'per_adapter': counts, 'output': str(out_path),
          'compiles': lib.compiles}


def main(argv):
  cli.quiet(argv)
  f = flags.FLAGS
  # Known failures (bad flags, input lines, adapter files) are one line via errors.run.
  s = run(f.adapter, f.input, f.output, base=f.base, default_adapter=f.default_adapter,
          batch_size=f.batch_size, max_length=f.max_length, max_rank=f.max_rank,
          progress=sys.stderr.isatty())
  print(f"labelled {s['records']} records with {len(s['per_adapter'])} adapters "
        f"({', '.join(f'{k}: {v}' for k, v in s['per_adapter'].items())}) -> {s['output']}")


if __name__ == '__main__':
  define_flags()
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main)
