"""GeneralizeFormer's parameter generator: a transformer over layer tokens.

The generated parameters (BN scale/bias, classifier weights; any leaves) are
cut into tokens: a leaf is read as rows (a vector is one row; a kernel
`[..., out]` has one row per output unit, e.g. one per class for the
classifier), and every row is cut into `token_width`-wide chunks, the last
one zero-padded. Each token fuses three streams:

  token_j = W_in concat(p_j, g_j, z) + e_type(j) + e_pos(j)

p_j: the source parameter chunk; g_j: the same chunk of the layer-wise
gradient of the unsupervised loss; z: the batch's pooled feature vector
(shared by all tokens). A post-LN transformer encoder (PyTorch's
`TransformerEncoderLayer` layout) maps the tokens to residuals Delta_j
through a zero-initialised output layer, so that at initialisation
theta_t = theta_s exactly. The pads' outputs are discarded.

`ParamGenerator(...).apply({'params': phi}, theta_s, features, grads)`
returns theta_t with the structure of theta_s; `make_generate` wraps it into
the jitted pure function `generate(phi, theta_s, features, grads)`.
"""

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Token types (e_type): a leaf's kind, from its name and module.
TYPES = ('scale', 'bias', 'head_kernel', 'head_bias', 'kernel', 'other')
GRAD_NORMS = ('none', 'global_rms', 'token_rms')
FUSIONS = ('concat', 'sum')
# Token groups of `split_generators` (the official code's three generators).
GROUPS = ('last_stage', 'layers', 'classifier')


class LeafSpec(NamedTuple):
  """How one generated leaf becomes tokens (static, from shapes only)."""

  path: tuple[str, ...]
  shape: tuple[int, ...]
  rows: int  # R: 1 for vectors, the last axis for kernels
  width: int  # C: real entries per row
  chunks: int  # tokens per row: ceil(C / token_width)
  kind: int  # index into TYPES
  group: int  # index into GROUPS (0 unless split generators)

  @property
  def num_tokens(self) -> int:
    return self.rows * self.chunks


def leaf_specs(
  theta: Any,
  token_width: int,
  *,
  head: str = 'head',
  split_generators: bool = False,
  last_stage: str = r'^layer4',
) -> list[LeafSpec]:
  """The token layout of `theta` (sorted paths; shapes only)."""
  flat = traverse_util.flatten_dict(dict(theta)) if theta else {}
  if not flat:
    raise ValueError('generator: no parameters to generate')
  specs = []
  for path in sorted(flat):
    shape = tuple(np.shape(flat[path]))
    rows = shape[-1] if len(shape) >= 2 else 1
    width = int(np.prod(shape)) // rows
    name = path[-1]
    if path[0] == head:
      kind = 'head_kernel' if name == 'kernel' else 'head_bias'
    elif name in ('scale', 'bias', 'kernel'):
      kind = name
    else:
      kind = 'other'
    group = 0
    if split_generators:
      if path[0] == head:
        group = 2
      elif not re.search(last_stage, '/'.join(path)):
        group = 1
    specs.append(
      LeafSpec(
        path,
        shape,
        rows,
        width,
        -(-width // token_width),
        TYPES.index(kind),
        group,
      )
    )
  return specs


def _rows(leaf, spec: LeafSpec):
  """A leaf as its [R, C] row matrix."""
  if len(spec.shape) >= 2:
    return jnp.reshape(leaf, (-1, spec.rows)).T
  return jnp.reshape(leaf, (1, -1))


def to_tokens(theta, specs: Sequence[LeafSpec], token_width: int):
  """The [N, token_width] token matrix of a tree laid out by `specs`."""
  flat = traverse_util.flatten_dict(dict(theta))
  parts = []
  for s in specs:
    m = _rows(flat[s.path], s)
    m = jnp.pad(m, ((0, 0), (0, s.chunks * token_width - s.width)))
    parts.append(m.reshape(s.num_tokens, token_width))
  return jnp.concatenate(parts, axis=0)


def from_tokens(tokens, specs: Sequence[LeafSpec], token_width: int):
  """Inverse of `to_tokens` (pads dropped): a nested dict of leaves."""
  out, start = {}, 0
  for s in specs:
    m = tokens[start : start + s.num_tokens]
    start += s.num_tokens
    m = m.reshape(s.rows, s.chunks * token_width)[:, : s.width]
    out[s.path] = (
      m.T.reshape(s.shape) if len(s.shape) >= 2 else m.reshape(s.shape)
    )
  return traverse_util.unflatten_dict(out)


def normalize_grads(grads, specs, mode: str):
  """Rescales the gradient stream (see `ParamGenerator.grad_norm`)."""
  if mode == 'none':
    return grads
  if mode == 'global_rms':
    leaves = jax.tree.leaves(grads)
    n = sum(x.size for x in leaves)
    ms = sum(jnp.sum(jnp.square(x)) for x in leaves) / n
    return jax.tree.map(lambda x: x * jax.lax.rsqrt(ms + 1e-30), grads)
  if mode == 'token_rms':
    flat = traverse_util.flatten_dict(dict(grads))
    out = {}
    for s in specs:
      m = _rows(flat[s.path], s)  # [R, C]: one RMS per row
      m = m * jax.lax.rsqrt(jnp.mean(jnp.square(m), -1, keepdims=True) + 1e-30)
      out[s.path] = (
        m.T.reshape(s.shape) if len(s.shape) >= 2 else m.reshape(s.shape)
      )
    return traverse_util.unflatten_dict(out)
  raise ValueError(f'grad_norm must be one of {GRAD_NORMS}, got {mode!r}')


class EncoderLayer(nn.Module):
  """PyTorch's `TransformerEncoderLayer` defaults: post-LN, ReLU, dropout."""

  d_model: int
  num_heads: int
  ff_dim: int
  dropout: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    drop = nn.Dropout(self.dropout, deterministic=deterministic)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      qkv_features=self.d_model,
      out_features=self.d_model,
      dropout_rate=self.dropout,
      deterministic=deterministic,
    )(x, x)
    x = nn.LayerNorm(epsilon=1e-5)(x + drop(y))
    y = nn.Dense(self.d_model)(drop(nn.relu(nn.Dense(self.ff_dim)(x))))
    return nn.LayerNorm(epsilon=1e-5)(x + drop(y))


class TokenGenerator(nn.Module):
  """One encoder: fused tokens -> Delta per token (zero-initialised head)."""

  num_layers: int
  d_model: int
  num_heads: int
  ff_dim: int
  dropout: float
  token_width: int
  fusion: str

  @nn.compact
  def __call__(self, streams: Sequence[jax.Array], kinds, deterministic):
    n = streams[0].shape[0]
    if self.fusion == 'concat':
      x = nn.Dense(self.d_model, name='embed')(jnp.concatenate(streams, -1))
    else:
      x = sum(
        nn.Dense(self.d_model, name=f'embed_{i}')(s)
        for i, s in enumerate(streams)
      )
    x = x + nn.Embed(len(TYPES), self.d_model, name='type_embed')(kinds)
    x = x + self.param(
      'pos_embed', nn.initializers.normal(0.02), (n, self.d_model)
    )
    for i in range(self.num_layers):
      x = EncoderLayer(
        self.d_model,
        self.num_heads,
        self.ff_dim,
        self.dropout,
        name=f'layer_{i}',
      )(x, deterministic)
    return nn.Dense(
      self.token_width,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
      name='out',
    )(x)


class ParamGenerator(nn.Module):
  """theta_t = theta_s + Delta(theta_s, z, g): GeneralizeFormer's phi.

  Attributes:
    num_layers, d_model, num_heads, ff_dim, dropout: the encoder (official
      code: 8 layers, 512, 2 heads, FF 512, dropout 0.1).
    token_width: chunk width of a token (512; pads to it, chunks beyond).
    fusion: 'concat' (one input projection of the concatenated streams, the
      default: the streams interact from the first layer) or 'sum' (one
      projection per stream, summed).
    use_grads, use_features: include the gradient / feature stream (the
      paper's ablations drop them).
    grad_norm: 'none' (raw gradients, the official code), 'global_rms'
      (all gradients divided by their joint RMS over the batch's tree: keeps
      the layers' relative magnitudes) or 'token_rms' (each row by its own).
    split_generators: three encoders as in the official code: BN layers
      matching `last_stage`, the other BN layers, the classifier.
    last_stage: regex of the first split group.
    head: top-level module name of the classifier.
  """

  num_layers: int = 8
  d_model: int = 512
  num_heads: int = 2
  ff_dim: int = 512
  dropout: float = 0.1
  token_width: int = 512
  fusion: str = 'concat'
  use_grads: bool = True
  use_features: bool = True
  grad_norm: str = 'none'
  split_generators: bool = False
  last_stage: str = r'^layer4'
  head: str = 'head'

  def specs(self, theta) -> list[LeafSpec]:
    return leaf_specs(
      theta,
      self.token_width,
      head=self.head,
      split_generators=self.split_generators,
      last_stage=self.last_stage,
    )

  @nn.compact
  def __call__(self, theta_s, features, grads, *, deterministic=True):
    if self.fusion not in FUSIONS:
      raise ValueError(f'fusion must be one of {FUSIONS}: {self.fusion!r}')
    specs = self.specs(theta_s)
    w = self.token_width
    dtype = jax.tree.leaves(theta_s)[0].dtype
    streams = [to_tokens(theta_s, specs, w)]
    if self.use_grads:
      grads = normalize_grads(grads, specs, self.grad_norm)
      streams.append(to_tokens(grads, specs, w).astype(dtype))
    if self.use_features:
      z = jnp.broadcast_to(features, (streams[0].shape[0], features.shape[-1]))
      streams.append(z.astype(dtype))
    kinds = np.concatenate([np.full(s.num_tokens, s.kind) for s in specs])
    groups = np.concatenate([np.full(s.num_tokens, s.group) for s in specs])
    delta = jnp.zeros_like(streams[0])
    for g in np.unique(groups):
      idx = np.flatnonzero(groups == g)
      out = TokenGenerator(
        self.num_layers,
        self.d_model,
        self.num_heads,
        self.ff_dim,
        self.dropout,
        w,
        self.fusion,
        name=f'generator_{GROUPS[g]}' if self.split_generators else 'generator',
      )([s[idx] for s in streams], jnp.asarray(kinds[idx]), deterministic)
      delta = delta.at[idx].set(out.astype(delta.dtype))
    return jax.tree.map(jnp.add, theta_s, from_tokens(delta, specs, w))


def make_generate(module: ParamGenerator) -> Callable:
  """`generate(phi, theta_s, features, grads, rng=None) -> theta_t`, jitted.

  A pure function of its inputs; with `rng` the generator's dropout is on
  (meta-training), without it generation is deterministic (test time).
  """

  def generate(phi, theta_s, features, grads, rng=None):
    return module.apply(
      {'params': phi},
      theta_s,
      features,
      grads,
      deterministic=rng is None,
      rngs=None if rng is None else {'dropout': rng},
    )

  return jax.jit(generate)
