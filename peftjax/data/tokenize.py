"""A thin wrapper over a HF ``tokenizers`` tokenizer.json: batches of text -> int32 numpy arrays."""
from __future__ import annotations

import pathlib

import numpy as np
import tokenizers

PADDINGS = ('max_length', 'longest')
_LONGEST_MULTIPLE = 8  # 'longest' rounds up to this, so jit sees few distinct lengths


class Tokenizer:
  """Encodes text batches to ``input_ids``, ``attention_mask`` and ``token_type_ids``.

  ``padding='max_length'`` pads every batch to ``max_length`` (one static shape for jit);
  ``'longest'`` pads to the longest sequence in the batch rounded up to a multiple of 8 (never
  above ``max_length``). Sequences longer than ``max_length`` are truncated.

  >>> tok = Tokenizer(minilm_dir() / 'tokenizer.json', max_length=8)  # doctest: +SKIP
  >>> tok.encode(['hello world'])['input_ids']                         # doctest: +SKIP
  array([[ 101, 7592, 2088,  102,    0,    0,    0,    0]], dtype=int32)
  """

  def __init__(self, path: str | pathlib.Path, max_length: int = 64, padding: str = 'max_length'):
    if not isinstance(max_length, int) or max_length < 2:
      raise ValueError(f'max_length={max_length!r} is invalid; valid: an integer >= 2 '
                       '(room for [CLS] and [SEP])')
    if padding not in PADDINGS:
      raise ValueError(f'padding={padding!r} is invalid; valid: '
                       + ' or '.join(map(repr, PADDINGS)))
    self.path = pathlib.Path(path)
    self.max_length = max_length
    self.padding = padding
    self._tok = tokenizers.Tokenizer.from_file(str(self.path))
    pad_token, pad_id = _pad_token(self._tok)
    # The file's own settings (e.g. fixed padding to 128) are replaced, not trusted.
    self._tok.enable_truncation(max_length=max_length)
    if padding == 'max_length':
      self._tok.enable_padding(pad_id=pad_id, pad_token=pad_token, length=max_length)
    else:
      self._tok.enable_padding(pad_id=pad_id, pad_token=pad_token,
                               pad_to_multiple_of=_LONGEST_MULTIPLE)

  @property
  def vocab_size(self) -> int:
    """Number of token ids, including added special tokens."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
    """int32 ``input_ids``, ``attention_mask``, ``token_type_ids`` of shape (len(texts), L).

    >>> Tokenizer(path, max_length=16).encode(['a', 'b c'])['input_ids'].shape  # doctest: +SKIP
    (2, 16)
    """
    encodings = self._tok.encode_batch(list(texts))
    # Rounding 'longest' up to a multiple of 8 may pass max_length; the excess is padding only.
    out = {
        'input_ids': np.array([e.ids for e in encodings], np.int32),
        'attention_mask': np.array([e.attention_mask for e in encodings], np.int32),
        'token_type_ids': np.array([e.type_ids for e in encodings], np.int32),
    }
    return {k: v[:, :self.max_length] for k, v in out.items()}


def _pad_token(tok: tokenizers.Tokenizer) -> tuple[str, int]:
  """(pad token, pad id) as the tokenizer file defines them; else '[PAD]' and its id, or 0."""
  if tok.padding:
    return tok.padding['pad_token'], tok.padding['pad_id']
  return '[PAD]', tok.token_to_id('[PAD]') or 0
