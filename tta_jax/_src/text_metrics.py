"""Scoring generated text and held-out likelihood.

`exact_match` and `token_f1` follow the official SQuAD v1.1 evaluation
script: lower-case, drop punctuation and the articles a/an/the, collapse
whitespace; F1 is over the bag of remaining words. With several reference
answers the best score counts.
"""

import collections
import math
import re
import string
from collections.abc import Sequence

import numpy as np

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r'\b(a|an|the)\b')


def normalize_answer(text: str) -> str:
  """SQuAD normalisation: lower, no punctuation/articles, single spaces."""
  text = text.lower()
  text = ''.join(ch for ch in text if ch not in _PUNCT)
  text = _ARTICLES.sub(' ', text)
  return ' '.join(text.split())


def _refs(references: str | Sequence[str]) -> list[str]:
  refs = [references] if isinstance(references, str) else list(references)
  if not refs:
    raise ValueError('no reference answers')
  return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
  """1.0 if the normalised prediction equals a normalised reference."""
  p = normalize_answer(prediction)
  return float(any(p == normalize_answer(r) for r in _refs(references)))


def _f1(prediction: str, reference: str) -> float:
  p, r = (
    normalize_answer(prediction).split(),
    normalize_answer(reference).split(),
  )
  if not p or not r:
    return float(p == r)
  common = collections.Counter(p) & collections.Counter(r)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(r)
  return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
  """SQuAD token F1 against the best-matching reference."""
  return max(_f1(prediction, r) for r in _refs(references))


def qa_scores(
  predictions: Sequence[str], references: Sequence[str | Sequence[str]]
) -> dict[str, float]:
  """Mean exact match and F1 (fractions in [0, 1]) over examples."""
  if len(predictions) != len(references):
    raise ValueError(
      f'{len(predictions)} predictions for {len(references)} references'
    )
  if not predictions:
    raise ValueError('no predictions to score')
  em = [exact_match(p, r) for p, r in zip(predictions, references, strict=True)]
  f1 = [token_f1(p, r) for p, r in zip(predictions, references, strict=True)]
  return {'exact_match': float(np.mean(em)), 'f1': float(np.mean(f1))}


def perplexity(total_nll: float, num_tokens: int) -> float:
  """exp(mean negative log-likelihood per token)."""
  if num_tokens <= 0:
    raise ValueError('perplexity of zero tokens')
  return math.exp(total_nll / num_tokens)


def cut_at(text: str, stops: Sequence[str]) -> str:
  """`text` up to the first of `stops` (e.g. a newline), stripped."""
  cut = len(text)
  for s in stops:
    i = text.find(s)
    if i >= 0:
      cut = min(cut, i)
  return text[:cut].strip()


_SENTENCE_END = re.compile(r'\.(?:\s|$)')


def cut_answer(text: str) -> str:
  """A short answer from a generation: its first line, up to the first
  sentence end ('4821. The code of ...' -> '4821'), stripped."""
  line = text.strip().split('\n', 1)[0]
  m = _SENTENCE_END.search(line)
  return (line[: m.start()] if m else line).strip()
