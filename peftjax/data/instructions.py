"""Instruction and plain-text records: reading, validation, chat rendering, tokenization.

Three record shapes, from JSONL lines or TFDS features:

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``; the last
  message must be the assistant's and is the completion, everything before it the prompt;
* pair: ``{"prompt": str, "completion": str}``; with the chat template it is one user turn
  and the assistant's answer;
* text: ``{"text": str}``: plain text, every token scored (language modelling).

A chat (or templated pair) is rendered with the tokenizer's chat template: the prompt is the
conversation before the answer with ``add_generation_prompt=True``; the completion is what the
template writes after it for the answer (the content and the end-of-turn), cut just after the
first end-of-turn token (the tokenizer's eos, e.g. ``<|im_end|>`` for ChatML, or the first other
special token, e.g. Llama 3's ``<|eot_id|>``), so the model learns to stop; a template that
writes none gets eos appended. Without a template a pair is ``encode(prompt)`` (BOS first if the
tokenizer's ``add_bos_token``) then ``encode(completion) + [eos]``.

Each example becomes ``Encoded(prompt_ids, completion_ids, reference)``: the loss is on the
completion ids only (see :mod:`peftjax.data.packing`). Plain text is cut into pieces of at most
``max_length`` tokens, each ``prompt = its first token`` (context only: BOS when the tokenizer's
``add_bos_token`` asks for it, so every text token is scored; else the first text token, which has
no left context) and ``completion = the rest``.

Too long: a prompt + completion over ``max_length`` is an error naming the example, unless
``truncation='left'``, which drops the prompt's leftmost tokens (its first turns, where the
system prompt sits) until the example fits; the error remains when even the completion (plus one
prompt token) does not fit.

>>> records = read_jsonl('train.jsonl')                          # doctest: +SKIP
>>> enc = encode_record(records[0], tokenizer, max_length=128)   # doctest: +SKIP
>>> enc.completion_ids[-1] == tokenizer.eos_id                   # doctest: +SKIP
True
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from peftjax.data.pipeline import DataError

ROLES = ('system', 'user', 'assistant')
TRUNCATIONS = ('error', 'left')
_SHAPES = ('{"prompt": str, "completion": str}, {"messages": [{"role", "content"}, ...]} '
           'or {"text": str}')


class InstructionError(DataError):
  """A record that cannot become a training example (names file:line, the field, what is valid)."""


@dataclasses.dataclass(frozen=True)
class Record:
  """One validated record. ``kind`` is 'chat', 'pair' or 'text'; ``where`` locates it."""
  kind: str
  where: str
  messages: tuple[tuple[str, str], ...] = ()  # chat: (role, content), the last the assistant's
  prompt: str = ''  # pair
  completion: str = ''  # pair
  text: str = ''  # text

  @property
  def reference(self) -> str:
    """The answer a generation is compared with ('' for plain text)."""
    if self.kind == 'chat':
      return self.messages[-1][1]
    return self.completion


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Token ids of one example: the loss is on ``completion_ids`` (which end with end-of-turn)."""
  prompt_ids: np.ndarray  # int32 (p,), p >= 1
  completion_ids: np.ndarray  # int32 (c,), c >= 1
  reference: str  # the answer text for exact match ('' for plain text)

  def __len__(self) -> int:
    return len(self.prompt_ids) + len(self.completion_ids)


# ---------------------------------------------------------------------------- validation


def _is_text(value) -> bool:
  return isinstance(value, str)


def parse_record(obj: Any, where: str) -> Record:
  """Validates one decoded JSON object (or TFDS example) and returns its :class:`Record`.

  Raises :class:`InstructionError` naming ``where``, the field, the bad value and what is valid.

  >>> parse_record({'prompt': 'Hi', 'completion': 'Hello'}, 'a.jsonl:1').kind
  'pair'
  """
  if not isinstance(obj, dict):
    raise InstructionError(f'{where}: a record must be a JSON object, got {type(obj).__name__}; '
                           f'valid: {_SHAPES}')
  shapes = [k for k in ('messages', 'prompt', 'text') if k in obj]
  if 'completion' in obj and 'prompt' not in obj:
    shapes.append('completion')
  if len(shapes) != 1:
    found = 'none of them' if not shapes else ' and '.join(map(repr, shapes))
    raise InstructionError(f'{where}: a record needs exactly one of "messages", '
                           f'"prompt"+"completion" or "text" (found {found} among keys '
                           f'{sorted(obj)}); valid: {_SHAPES}')
  shape = shapes[0]
  if shape == 'messages':
    return _parse_chat(obj['messages'], where)
  if shape == 'text':
    text = obj['text']
    if not _is_text(text) or not text.strip():
      raise InstructionError(f'{where}: "text"={_short(text)} is invalid; valid: a non-empty '
                             'string')
    return Record('text', where, text=text)
  for field in ('prompt', 'completion'):
    if field not in obj:
      raise InstructionError(f'{where}: "{field}" is missing; valid: {_SHAPES}')
    value = obj[field]
    if not _is_text(value) or not value.strip():
      raise InstructionError(f'{where}: "{field}"={_short(value)} is invalid; valid: a non-empty '
                             'string')
  return Record('pair', where, prompt=obj['prompt'], completion=obj['completion'])


def _parse_chat(messages, where: str) -> Record:
  if not isinstance(messages, list) or not messages:
    raise InstructionError(f'{where}: "messages"={_short(messages)} is invalid; valid: a '
                           'non-empty list of {"role", "content"} objects ending with the '
                           "assistant's answer")
  turns = []
  for i, m in enumerate(messages):
    field = f'messages[{i}]'
    if not isinstance(m, dict):
      raise InstructionError(f'{where}: {field}={_short(m)} is invalid; valid: an object with '
                             '"role" and "content"')
    if 'role' not in m:
      raise InstructionError(f'{where}: {field} has no "role" (keys {sorted(m)}); valid: one '
                             f'of {", ".join(map(repr, ROLES))}')
    if m['role'] not in ROLES:
      raise InstructionError(f'{where}: {field}.role={_short(m["role"])} is invalid; valid: one '
                             f'of {", ".join(map(repr, ROLES))}')
    if 'content' not in m:
      raise InstructionError(f'{where}: {field} has no "content"; valid: a string')
    if not _is_text(m['content']):
      raise InstructionError(f'{where}: {field}.content={_short(m["content"])} is invalid; '
                             'valid: a string')
    turns.append((m['role'], m['content']))
  last = len(turns) - 1
  if turns[-1][0] != 'assistant':
    raise InstructionError(f'{where}: messages[{last}].role={turns[-1][0]!r} is invalid: the '
                           "last message is the completion; valid: 'assistant'")
  if not turns[-1][1].strip():
    raise InstructionError(f'{where}: messages[{last}].content (the completion) is empty; '
                           'valid: a non-empty string')
  if len(turns) == 1:
    raise InstructionError(f'{where}: "messages" holds only the answer; valid: at least one '
                           'message (the prompt) before the last, assistant, message')
  return Record('chat', where, messages=tuple(turns))


def _short(value, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + '...'


def read_jsonl(path: str | pathlib.Path) -> list[Record]:
  """Every record of a JSONL file, validated; blank lines are skipped.

  A line that is not JSON, or a record that fails :func:`parse_record`, raises one
  :class:`InstructionError` naming ``file:line``.

  >>> read_jsonl('train.jsonl')[0].where  # doctest: +SKIP
  'train.jsonl:1'
  """
  path = pathlib.Path(path)
  records = []
  with open(path, encoding='utf-8') as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise InstructionError(f'{where}: not valid JSON ({e.msg} at column {e.colno}); valid: '
                               f'one JSON object per line, {_SHAPES}') from None
      records.append(parse_record(obj, where))
  if not records:
    raise InstructionError(f'{path}: no records (the file is empty); valid: one JSON object per '
                           f'line, {_SHAPES}')
  return records


def from_features(example: dict, where: str, *, prompt_key: str = 'prompt',
                  completion_key: str = 'completion', text_key: str = 'text') -> Record:
  """A :class:`Record` from a TFDS example (bytes or str features ``prompt_key`` and
  ``completion_key``, or ``text_key`` for plain text).

  >>> from_features({'prompt': b'Hi', 'completion': b'Hello'}, 'ds/train[0]').completion
  'Hello'
  """
  decode = lambda v: v.decode('utf-8') if isinstance(v, bytes) else v
  if prompt_key in example and completion_key in example:
    obj = {'prompt': decode(example[prompt_key]), 'completion': decode(example[completion_key])}
  else:
    obj = {'text': decode(example[text_key])}
  return parse_record(obj, where)


# ---------------------------------------------------------------------------- tokenization


def _auto_bos(tokenizer) -> bool:
  """Whether ``encode`` itself prepends BOS (then only the first piece of an example keeps it)."""
  bos = getattr(tokenizer, 'bos_id', None)
  return bos is not None and list(tokenizer.encode(''))[:1] == [bos]


def _encode(tokenizer, text: str, *, first: bool, templated: bool = False,
            encode=None) -> list[int]:
  """``tokenizer.encode(text)`` (no special tokens added), for one piece of an example.

  The first piece of raw (untemplated) text gets BOS when the tokenizer says its model wants one
  (``add_bos_token``); a rendered chat carries its own BOS in the template text, as transformers
  has it. A later piece never starts with BOS. ``encode`` replaces ``tokenizer.encode`` (a table
  of batch-encoded texts).
  """
  ids = list((encode or tokenizer.encode)(text))
  bos = getattr(tokenizer, 'bos_id', None)
  if not first and ids and bos is not None and ids[0] == bos and _auto_bos(tokenizer):
    ids = ids[1:]  # a completion continues the prompt: no second BOS
  if (first and not templated and getattr(tokenizer, 'add_bos_token', False) and bos is not None
      and ids[:1] != [bos]):
    ids = [int(bos)] + ids
  return ids


def _stop_ids(tokenizer) -> set[int]:
  """End-of-turn ids: eos, the tokenizer's ``stop_ids`` and its special (control) tokens, so a
  template that ends a turn with its own token (``<|eot_id|>``, ``<end_of_turn>``) is cut there."""
  stops = {int(tokenizer.eos_id)}
  for attr in ('stop_ids', 'special_ids'):
    stops.update(int(i) for i in getattr(tokenizer, attr, ()) or ())
  return stops


def render_chat(tokenizer, messages: Sequence[tuple[str, str]]) -> tuple[str, str]:
  """(prompt text, answer text) of a conversation under the tokenizer's chat template.

  The prompt is ``messages[:-1]`` rendered with ``add_generation_prompt=True``; the answer is the
  rest of the full rendering (the assistant's content and the template's end-of-turn). A
  template whose full rendering does not start with the prompt gives the bare content instead
  (the caller then appends eos).

  >>> render_chat(tok, [('user', 'Hi'), ('assistant', 'Hello')])[1]  # doctest: +SKIP
  'Hello<|im_end|>\\n'
  """
  as_dicts = [{'role': r, 'content': c} for r, c in messages]
  prompt = tokenizer.apply_chat_template(as_dicts[:-1], add_generation_prompt=True)
  full = tokenizer.apply_chat_template(as_dicts, add_generation_prompt=False)
  if full.startswith(prompt) and len(full) > len(prompt):
    return prompt, full[len(prompt):]
  return prompt, messages[-1][1]


def _answer_ids(tokenizer, answer: str, encode=None) -> list[int]:
  """The answer's ids cut just after its first end-of-turn (or other special) token; eos
  appended if it has none."""
  ids = _encode(tokenizer, answer, first=False, encode=encode)
  stops = _stop_ids(tokenizer)
  for i, t in enumerate(ids):
    if t in stops:
      return ids[:i + 1]
  return ids + [int(tokenizer.eos_id)]


def _texts(record: Record, tokenizer, chat_template: bool) -> tuple[str, str | None, bool]:
  """(first text, second text or None, rendered by the template) of a record: what is encoded."""
  if record.kind == 'text':
    return record.text, None, False
  if record.kind == 'chat' or chat_template:
    messages = record.messages or (('user', record.prompt), ('assistant', record.completion))
    return (*render_chat(tokenizer, messages), True)
  return record.prompt, record.completion, False


def _check_truncation(truncation: str) -> None:
  if truncation not in TRUNCATIONS:
    raise InstructionError(f'data.truncation={truncation!r} is invalid; valid: '
                           + ' or '.join(map(repr, TRUNCATIONS)))


def encode_record(record: Record, tokenizer, *, max_length: int, chat_template: bool = True,
                  truncation: str = 'error') -> list[Encoded]:
  """The :class:`Encoded` examples of one record: one for instructions, one or more (pieces of at
  most ``max_length`` tokens) for plain text.

  >>> [len(e) for e in encode_record(rec, tok, max_length=128)]  # doctest: +SKIP
  [41]
  """
  _check_truncation(truncation)
  return _assemble(record, tokenizer, _texts(record, tokenizer, chat_template), max_length,
                   truncation, None)


def _assemble(record: Record, tokenizer, texts, max_length: int, truncation: str,
              encode) -> list[Encoded]:
  first, second, templated = texts
  if record.kind == 'text':
    return _encode_text(record, tokenizer, max_length, encode)
  prompt = _encode(tokenizer, first, first=True, templated=templated, encode=encode)
  if templated:
    completion = _answer_ids(tokenizer, second, encode)
  else:
    completion = _encode(tokenizer, second, first=False, encode=encode) + [int(tokenizer.eos_id)]
  if not prompt:
    raise InstructionError(f'{record.where}: the prompt encodes to no tokens; valid: a prompt '
                           'with text (the first answer token is predicted from it)')
  prompt = _fit(prompt, completion, max_length, truncation, record.where)
  return [Encoded(np.asarray(prompt, np.int32), np.asarray(completion, np.int32),
                  record.reference)]


def _fit(prompt: list[int], completion: list[int], max_length: int, truncation: str,
         where: str) -> list[int]:
  total = len(prompt) + len(completion)
  if total <= max_length:
    return prompt
  if truncation == 'left' and len(completion) < max_length:
    return prompt[total - max_length:]  # keeps the end: the question and the generation prompt
  if truncation == 'left':
    raise InstructionError(
        f'{where}: the completion alone is {len(completion)} tokens, and with at least one '
        f'prompt token does not fit data.max_length={max_length}; valid: data.max_length >= '
        f'{len(completion) + 1}, or a shorter completion')
  raise InstructionError(
      f'{where}: prompt ({len(prompt)} tokens) + completion ({len(completion)} tokens) = {total} '
      f'tokens is longer than data.max_length={max_length}; valid: data.max_length >= {total}, '
      "or data.truncation='left' (drops the prompt's leftmost tokens)")


def _encode_text(record: Record, tokenizer, max_length: int, encode=None) -> list[Encoded]:
  ids = _encode(tokenizer, record.text, first=True, encode=encode)
  if len(ids) < 2:
    raise InstructionError(f'{record.where}: the text encodes to {len(ids)} token(s); valid: at '
                           'least 2 (the first is context for the next)')
  if max_length < 2:
    raise InstructionError(f'data.max_length={max_length} is invalid; valid: an integer >= 2')
  pieces = []
  for start in range(0, len(ids), max_length):
    piece = ids[start:start + max_length]
    if len(piece) < 2:  # a one-token tail scores nothing
      break
    pieces.append(Encoded(np.asarray(piece[:1], np.int32), np.asarray(piece[1:], np.int32), ''))
  return pieces


def encode_records(records: Iterable[Record], tokenizer, *, max_length: int,
                   chat_template: bool = True, truncation: str = 'error') -> list[Encoded]:
  """:func:`encode_record` over ``records``, concatenated (plain text may give several each).

  The distinct texts are encoded in one ``encode_batch`` call when the tokenizer has one
  (parallel in ``tokenizers``; answers such as 'positive<|im_end|>' repeat), same ids.

  >>> sum(map(len, encode_records(records, tok, max_length=128)))  # doctest: +SKIP
  40231
  """
  _check_truncation(truncation)
  records = list(records)
  texts = [_texts(r, tokenizer, chat_template) for r in records]
  distinct = list(dict.fromkeys(t for first, second, _ in texts for t in (first, second)
                                if t is not None))
  batch = getattr(tokenizer, 'encode_batch', None)
  table = dict(zip(distinct, batch(distinct) if batch is not None and distinct else
                   [tokenizer.encode(t) for t in distinct]))
  table.setdefault('', list(tokenizer.encode('')))
  out = []
  for r, t in zip(records, texts):
    out.extend(_assemble(r, tokenizer, t, max_length, truncation, table.__getitem__))
  return out
