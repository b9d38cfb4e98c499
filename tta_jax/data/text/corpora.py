"""Real text that ships inside the `gensim` wheel, ready for an LM.

gensim's test data holds a shortened Wikipedia dump (206 pages, of which
about 100 are articles rather than redirects) and the Lee corpus (300 news
articles). The files are found through the installed distribution's file
list (`importlib.metadata`), without importing gensim.

    docs = wikipedia()                     # [Document(title, text)], cleaned
    train, held_out = split(docs, held_out_fraction=0.2)
    windows = chunk(held_out, tokenizer.encode, length=256)
"""

import bz2
import hashlib
import html
import importlib.metadata
import pathlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

WIKI_FILE = (
  'enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
)
LEE_FILE = 'lee_background.cor'


class Document(NamedTuple):
  title: str
  text: str


def gensim_file(name: str) -> pathlib.Path:
  """A file of gensim's `test/test_data`, from the installed wheel."""
  try:
    files = importlib.metadata.files('gensim') or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  for f in files:
    if f.name == name and 'test_data' in str(f):
      path = pathlib.Path(f.locate())
      if path.exists():
        return path
  raise FileNotFoundError(
    f'gensim test data {name!r} not found; install gensim (pip install gensim)'
  )


# ----------------------------------------------------------------------------
# Wiki markup.

_NESTED = (
  re.compile(r'\{\{[^{}]*\}\}'),  # templates (infoboxes, citations)
  re.compile(r'\{\|[^{}]*?\|\}', re.S),  # tables
  # File/image/category links (their captions may hold links).
  re.compile(
    r'\[\[(?:File|Image|Category|Media):(?:[^\[\]]|\[\[[^\[\]]*\]\])*\]\]',
    re.I,
  ),
)
_SUBS = (
  (re.compile(r'<!--.*?-->', re.S), ''),
  (re.compile(r'<ref[^>/]*/>', re.I), ''),
  (re.compile(r'<ref[^>]*>.*?</ref>', re.I | re.S), ''),
  (re.compile(r'<(math|gallery|timeline)[^>]*>.*?</\1>', re.I | re.S), ''),
  (re.compile(r'\[\[[a-z\-]{2,12}:[^\]]*\]\]'), ''),  # interlanguage links
  (re.compile(r'\[\[(?:[^\]|]*\|)?([^\]|]*)\]\]'), r'\1'),  # [[a|b]] -> b
  (re.compile(r'\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]'), r'\1'),
  (re.compile(r"'{2,}"), ''),  # bold, italics
  (re.compile(r'<[^>]+>'), ''),  # remaining html tags
  (re.compile(r'^=+\s*(.*?)\s*=+\s*$', re.M), r'\1'),  # headings
  (re.compile(r'^[*#:;]+\s*', re.M), ''),  # list markers
  (re.compile(r'^\s*\|.*$', re.M), ''),  # stray table/template rows
  (re.compile(r'[ \t]+'), ' '),
  (re.compile(r'\n\s*\n\s*(\n\s*)+'), '\n\n'),
)


def strip_markup(text: str) -> str:
  """Plain text of a MediaWiki page (a few regexes, good enough for LM)."""
  for pattern in _NESTED:  # innermost first, until nothing is left
    while True:
      text, n = pattern.subn('', text)
      if not n:
        break
  for pattern, repl in _SUBS:
    text = pattern.sub(repl, text)
  text = html.unescape(text)
  lines = [ln.strip() for ln in text.split('\n')]
  return '\n'.join(ln for ln in lines if ln != '}}').strip()


def wikipedia(min_chars: int = 500) -> list[Document]:
  """The articles of gensim's Wikipedia sample, markup stripped.

  Redirects, non-article namespaces and pages shorter than `min_chars`
  after cleaning are dropped. The order is the dump's.
  """
  docs = []
  with bz2.open(gensim_file(WIKI_FILE)) as f:
    for _, el in ET.iterparse(f):
      if not el.tag.endswith('}page'):
        continue
      title = el.findtext('{*}title') or ''
      ns = el.findtext('{*}ns')
      raw = el.findtext('.//{*}text') or ''
      el.clear()
      if ns != '0' or raw.lstrip().upper().startswith('#REDIRECT'):
        continue
      text = strip_markup(raw)
      if len(text) >= min_chars:
        docs.append(Document(title, text))
  return docs


def lee(min_chars: int = 200) -> list[Document]:
  """The Lee background corpus: 300 news articles, one per line."""
  text = gensim_file(LEE_FILE).read_text(encoding='utf-8', errors='replace')
  lines = [ln.strip() for ln in text.split('\n')]
  return [
    Document(f'lee-{i}', ln)
    for i, ln in enumerate(lines)
    if len(ln) >= min_chars
  ]


def split(
  docs: Sequence[Document], *, held_out_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Document], list[Document]]:
  """(train, held_out), by document, from a seeded hash of the title.

  A document's side depends only on its title and the seed, so adding or
  removing other documents never moves it.
  """
  if not 0.0 < held_out_fraction < 1.0:
    raise ValueError(
      f'held_out_fraction must be in (0, 1), got {held_out_fraction}'
    )
  train, held = [], []
  for d in docs:
    h = hashlib.sha256(f'{seed}:{d.title}'.encode()).digest()
    u = int.from_bytes(h[:8], 'little') / 2**64
    (held if u < held_out_fraction else train).append(d)
  if not held or not train:
    raise ValueError(
      f'split of {len(docs)} documents left one side empty; use more '
      'documents or another held_out_fraction'
    )
  return train, held


class Windows(NamedTuple):
  """Fixed-length token windows: right-padded, one document each."""

  tokens: np.ndarray  # [N, L] int32
  mask: np.ndarray  # [N, L] bool
  doc: np.ndarray  # [N] int32: index of the source document
  part: np.ndarray  # [N] int32: window index within its document


def chunk(
  docs: Sequence[Document],
  encode: Callable[[str], list[int]],
  *,
  length: int,
  max_windows_per_doc: int | None = None,
  min_tokens: int = 2,
  pad_id: int = 0,
) -> Windows:
  """Cuts each document's tokens into consecutive windows of `length`.

  The last window of a document is right-padded (mask False); windows with
  fewer than `min_tokens` real tokens are dropped. Windows never cross
  documents, so position restarts and per-document context are natural.
  """
  if length < 2:
    raise ValueError(f'window length must be >= 2, got {length}')
  rows, docs_idx, parts = [], [], []
  for i, d in enumerate(docs):
    ids = encode(d.text)
    for j, start in enumerate(range(0, len(ids), length)):
      if max_windows_per_doc is not None and j >= max_windows_per_doc:
        break
      piece = ids[start : start + length]
      if len(piece) < min_tokens:
        continue
      rows.append(piece)
      docs_idx.append(i)
      parts.append(j)
  if not rows:
    raise ValueError('no windows: the documents are empty or too short')
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for r, piece in enumerate(rows):
    tokens[r, : len(piece)] = piece
    mask[r, : len(piece)] = True
  return Windows(
    tokens, mask, np.asarray(docs_idx, np.int32), np.asarray(parts, np.int32)
  )


def pack(
  docs: Sequence[Document],
  encode: Callable[[str], list[int]],
  *,
  length: int,
  separator_id: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Documents joined by `separator_id` and cut into full rows [N, length].

  Returns (tokens [N, L] int32, segment_ids [N, L] int32): the segment id
  counts documents, so `model.apply(..., segment_ids=...)` keeps attention
  inside a document and restarts positions. The tail shorter than a row
  is dropped.
  """
  stream, segs = [], []
  for i, d in enumerate(docs):
    ids = encode(d.text) + [separator_id]
    stream.extend(ids)
    segs.extend([i] * len(ids))
  n = len(stream) // length
  if n == 0:
    raise ValueError(f'{len(stream)} tokens do not fill one row of {length}')
  tokens = np.asarray(stream[: n * length], np.int32).reshape(n, length)
  return tokens, np.asarray(segs[: n * length], np.int32).reshape(n, length)
