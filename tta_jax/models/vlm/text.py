"""Tokenizers of the text towers, as plain `[N, L]` int32 arrays.

A text tower reads token ids padded with its pad id to a common length; the
ids of a prompt start with the tower's start token (`[CLS]`, CLIP's
`<start_of_text>`), so CoOp's context vectors go at positions `1..n_ctx`.
The tokenizers are `tokenizers.Tokenizer` objects (Rust, no torch) built
from the files that ship with the weights.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

# The word a prompt holds in each context slot before the context vectors
# replace its embedding (CoOp writes "X X X X <class>.").
PLACEHOLDER = 'X'


class TextTokenizer(NamedTuple):
  """A tokenizer with the length limit and padding of its text tower.

  Attributes:
    tokenizer: a `tokenizers.Tokenizer` that adds the start and end tokens
      itself (its post-processor), with padding and truncation off.
    context_length: the longest sequence the tower reads (start and end
      tokens included).
    pad_id: the id that fills short sequences.
    name: the tower's name, for error messages.
  """

  tokenizer: Any
  context_length: int
  pad_id: int
  name: str

  def ids(self, text: str) -> list[int]:
    """The token ids of one text, start and end tokens included."""
    return list(self.tokenizer.encode(text).ids)

  def encode(
    self, texts: Sequence[str], length: int | None = None
  ) -> np.ndarray:
    """Token ids of `texts`, padded to `length` (default: the longest).

    Raises:
      ValueError: a text is longer than the tower reads, or `length` is.
    """
    rows = [self.ids(t) for t in texts]
    longest = max((len(r) for r in rows), default=0)
    for text, row in zip(texts, rows, strict=True):
      if len(row) > self.context_length:
        raise ValueError(
          f'{text!r} is {len(row)} tokens long; the {self.name} text tower '
          f'reads at most {self.context_length}'
        )
    length = longest if length is None else length
    if length < longest or length > self.context_length:
      raise ValueError(
        f'cannot pad to {length} tokens (longest text: {longest}, '
        f'{self.name} limit: {self.context_length})'
      )
    out = np.full((len(rows), length), self.pad_id, np.int32)
    for i, row in enumerate(rows):
      out[i, : len(row)] = row
    return out

  def words(self, text: str) -> list[int]:
    """The ids of `text` without the start and end tokens."""
    return self.ids(text)[1:-1]


def context_prompts(
  tok: TextTokenizer, classnames: Sequence[str], n_ctx: int
) -> np.ndarray:
  """CoOp's prompts `"X X X X <class>."`, tokenised: `[K, L]` int32.

  Positions `1..n_ctx` hold the placeholder, whose embeddings the context
  vectors replace; the class name, a full stop and the end token follow.

  Raises:
    ValueError: no class names, an empty name, or a prompt longer than the
      text tower reads.
  """
  classnames = list(classnames)
  if not classnames:
    raise ValueError('the class list is empty: a prompt needs class names')
  empty = [c for c in classnames if not str(c).strip()]
  if empty:
    raise ValueError(f'empty class name in {classnames}')
  prefix = ' '.join([PLACEHOLDER] * n_ctx)
  texts = [f'{prefix} {c}.'.strip() for c in classnames]
  ids = tok.encode(texts)
  slot = tok.words(PLACEHOLDER)
  if n_ctx and len(slot) != 1:
    raise ValueError(
      f'the placeholder {PLACEHOLDER!r} is not one {tok.name} token'
    )
  if n_ctx and not np.all(ids[:, 1 : 1 + n_ctx] == slot[0]):
    raise ValueError('context slots are not at positions 1..n_ctx')
  return ids


def template_prompts(
  tok: TextTokenizer, classnames: Sequence[str], templates: Sequence[str]
) -> np.ndarray:
  """Hand prompts `template.format(c)` for every template and class.

  Returns:
    `[T, K, L]` int32, padded to one length `L`.

  Raises:
    ValueError: no class names or templates, or a prompt that is too long.
  """
  classnames, templates = list(classnames), list(templates)
  if not classnames:
    raise ValueError('the class list is empty: a prompt needs class names')
  if not templates:
    raise ValueError('no prompt templates')
  texts = [t.format(c) for t in templates for c in classnames]
  ids = tok.encode(texts)
  return ids.reshape(len(templates), len(classnames), -1)


def context_init_ids(tok: TextTokenizer, text: str, n_ctx: int) -> list[int]:
  """The token ids of CoOp's initial context words ("a photo of a").

  Raises:
    ValueError: the words are not exactly `n_ctx` tokens.
  """
  ids = tok.words(text)
  if len(ids) != n_ctx:
    raise ValueError(
      f'the context init {text!r} is {len(ids)} {tok.name} tokens, not '
      f'n_ctx={n_ctx}'
    )
  return ids
