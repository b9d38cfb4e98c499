"""A Llama-family decoder (Llama-2/3, Mistral, SmolLM2) as pure functions.

The blocks are flax Linen modules; the layer stack is a `lax.scan` over
parameters stacked on a leading layer axis, so compile time does not grow
with depth and per-layer extras (a KV cache, low-rank updates, a generator's
per-layer weights) ride along the same axis.

    params = model.init(config, jax.random.key(0))
    out = model.apply(params, tokens, config=config, mask=mask,
                      return_hidden=True)
    out.logits   # [B, T, V]
    out.hidden   # [L + 1, B, T, D]: Hugging Face `hidden_states`

Parameter layout (flax kernels are [in, out]; every leaf under `layers` has
a leading [L] axis):

    embed_tokens/embedding                 [V, D]
    layers/input_layernorm/scale           [L, D]
    layers/self_attn/{q,k,v,o}_proj/kernel [L, D, H*Dh] ...
    layers/post_attention_layernorm/scale  [L, D]
    layers/mlp/{gate,up,down}_proj/kernel  [L, D, F] ...
    norm/scale                             [D]
    lm_head/kernel                         [D, V] (absent when tied)

Rotary embeddings use the Hugging Face (`rotate_half`) layout; the GGUF
importer undoes llama.cpp's interleaved permutation of q/k.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
LINEARS = (
  'q_proj',
  'k_proj',
  'v_proj',
  'o_proj',
  'gate_proj',
  'up_proj',
  'down_proj',
)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture hyperparameters (hashable: a static argument of `jit`).

  Attributes:
    vocab_size: V.
    hidden_size: D, the residual width.
    intermediate_size: F, the SwiGLU width.
    num_layers: L.
    num_heads: H, query heads.
    num_kv_heads: key/value heads (grouped-query attention; H % it == 0).
    head_dim: Dh; None means D // H.
    rope_theta: the rotary base of the checkpoint.
    rope_scaling: None, or a tuple of (key, value) pairs in Hugging Face's
      `rope_scaling` form: `rope_type` 'linear' (`factor`) or 'llama3'
      (`factor`, `low_freq_factor`, `high_freq_factor`,
      `original_max_position_embeddings`).
    rms_norm_eps: RMSNorm epsilon.
    tie_embeddings: the output projection is the embedding matrix.
    max_position_embeddings: the context the checkpoint was trained for.
    sliding_window: Mistral's attention window (None: full causal).
    attention_bias: biases on q/k/v/o (Hugging Face `attention_bias`).
    mlp_bias: biases on the MLP projections.
    dtype: compute dtype ('float32' or 'bfloat16'); norms, softmax and
      logits stay in float32.
    unroll: `lax.scan` unroll factor over layers (1 is fastest on CPU
      too: unrolling copies the stacked weights per layer).
    remat: rematerialise each block in the backward pass (memory for
      compute when differentiating through the LM, e.g. training a
      generator or a LoRA on long contexts).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  sliding_window: int | None = None
  attention_bias: bool = False
  mlp_bias: bool = False
  dtype: str = 'float32'
  unroll: int | bool = 1
  remat: bool = False

  def __post_init__(self):
    if (
      self.head_dim is None
    ):  # stored explicitly, so equal configs compare equal
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_heads)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f'num_heads={self.num_heads} is not a multiple of '
        f'num_kv_heads={self.num_kv_heads}'
      )
    if self.head_size % 2:
      raise ValueError(f'head_dim={self.head_size} must be even for RoPE')

  @property
  def head_size(self) -> int:
    return self.head_dim

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if d['rope_scaling'] is not None:
      d['rope_scaling'] = dict(d['rope_scaling'])
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'LlamaConfig':
    d = dict(d)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f'unknown LlamaConfig keys {unknown}')
    if d.get('rope_scaling') is not None:
      d['rope_scaling'] = tuple(sorted(dict(d['rope_scaling']).items()))
    return cls(**d)

  def kv_cache_bytes_per_token(self, dtype=None) -> int:
    """Bytes of K and V cached per token, summed over layers."""
    itemsize = jnp.dtype(dtype or self.dtype).itemsize
    return 2 * self.num_layers * self.num_kv_heads * self.head_size * itemsize


class LowRank(NamedTuple):
  """An additive low-rank update of one linear: y = x W + (x a) b.

  Shapes are per layer; `apply` takes them stacked on a leading [L] axis.
  An optional batch axis gives every sequence its own update.
  """

  a: jax.Array  # [D_in, r] or [B, D_in, r]
  b: jax.Array  # [r, D_out] or [B, r, D_out]


# Linear name -> its update, e.g. {'o_proj': LowRank(a, b)}.
LowRankMap = Mapping[str, LowRank]


@flax.struct.dataclass
class LayerHook:
  """Low-rank updates computed inside the forward pass, layer by layer.

  `fn(xs_l, h, mask) -> {linear: LowRank}` is called in every layer with
  that layer's slice of `xs` (a pytree stacked on a leading [L] axis, e.g.
  a generator's per-layer weights), the block input `h` [B, T, D] and the
  token mask [B, T], before the block runs. A Generative-Adapter-style
  generator builds a layer's update from that layer's hidden states here.
  `fn` is static under `jit` (hashed by identity): build it once.
  """

  fn: Callable[[Any, jax.Array, jax.Array], LowRankMap] = flax.struct.field(
    pytree_node=False
  )
  xs: Any = None


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far, in fixed-size slots.

  All sequences write their t-th new token into the same slot; `mask`
  marks the slots that hold real tokens, so left padding, right padding
  and holes (a padded context followed by a prompt) are all just masked
  slots. Rotary positions are kept per slot and per sequence.
  """

  k: jax.Array  # [L, B, S, Hkv, Dh]
  v: jax.Array  # [L, B, S, Hkv, Dh]
  mask: jax.Array  # [B, S] bool: the slot holds a real token
  positions: jax.Array  # [B, S] int32: rotary position of each slot
  index: jax.Array  # int32 scalar: the next slot to write

  @property
  def size(self) -> int:
    return self.k.shape[2]


class LMOutput(NamedTuple):
  logits: jax.Array | None  # [B, T, V] float32 (None if not requested)
  hidden: jax.Array | None  # [L + 1, B, T, D]: block inputs, then final norm
  cache: KVCache | None  # the updated cache, if one was given
  final: jax.Array  # [B, T, D]: the final normed states (input of the head)


def init_cache(
  config: LlamaConfig, batch: int, size: int, dtype=None
) -> KVCache:
  """An empty cache of `size` slots per sequence."""
  shape = (
    config.num_layers,
    batch,
    size,
    config.num_kv_heads,
    config.head_size,
  )
  dtype = dtype or config.dtype
  return KVCache(
    k=jnp.zeros(shape, dtype),
    v=jnp.zeros(shape, dtype),
    mask=jnp.zeros((batch, size), bool),
    positions=jnp.zeros((batch, size), jnp.int32),
    index=jnp.zeros([], jnp.int32),
  )


# ----------------------------------------------------------------------------
# Rotary embeddings.


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [Dh / 2], with the checkpoint's scaling rule."""
  dh = config.head_size
  inv = 1.0 / (config.rope_theta ** (np.arange(0, dh, 2) / dh))
  if config.rope_scaling is None:
    return inv
  s = dict(config.rope_scaling)
  kind = s.get('rope_type', s.get('type'))
  if kind in (None, 'default'):
    return inv
  if kind == 'linear':
    return inv / s['factor']
  if kind == 'llama3':
    factor, lo, hi = s['factor'], s['low_freq_factor'], s['high_freq_factor']
    old = s['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > old / lo, inv / factor, inv)
    mid = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(mid, scaled, out)
  raise ValueError(
    f'unsupported rope_scaling type {kind!r}; supported: linear, llama3'
  )


def _rope_tables(config, positions):
  """cos, sin [B, T, 1, Dh] for integer positions [B, T]."""
  inv = jnp.asarray(rope_frequencies(config), jnp.float32)
  ang = positions.astype(jnp.float32)[..., None] * inv  # [B, T, Dh/2]
  ang = jnp.concatenate([ang, ang], -1)[:, :, None, :]
  return jnp.cos(ang), jnp.sin(ang)


def _rotate(x, cos, sin):
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], -1)
  return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------
# Blocks.


def lowrank_delta(x: jax.Array, update: LowRank) -> jax.Array:
  """(x a) b for x [B, T, D_in], with a shared or a per-sequence update."""
  a, b = update.a.astype(x.dtype), update.b.astype(x.dtype)
  if a.ndim == 2:
    return (x @ a) @ b
  return jnp.einsum('btr,bro->bto', jnp.einsum('bti,bir->btr', x, a), b)


class RMSNorm(nn.Module):
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
    return (scale * y.astype(x.dtype)).astype(x.dtype)


class _Linears(nn.Module):
  """Dense layers with Hugging Face names, each with an optional update."""

  @nn.nowrap
  def dense(self, name, x, features, lowrank, *, bias):
    y = nn.Dense(
      features,
      use_bias=bias,
      dtype=x.dtype,
      kernel_init=nn.initializers.normal(0.02),
      name=name,
    )(x)
    if name in lowrank:
      y = y + lowrank_delta(x, lowrank[name])
    return y


class Attention(_Linears):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, cos, sin, allowed, kv, lowrank):
    c = self.config
    b, t, _ = x.shape
    dh, hkv = c.head_size, c.num_kv_heads
    groups = c.num_heads // hkv
    bias = c.attention_bias
    q = self.dense('q_proj', x, c.num_heads * dh, lowrank, bias=bias)
    k = self.dense('k_proj', x, hkv * dh, lowrank, bias=bias)
    v = self.dense('v_proj', x, hkv * dh, lowrank, bias=bias)
    q = _rotate(q.reshape(b, t, c.num_heads, dh), cos, sin)
    k = _rotate(k.reshape(b, t, hkv, dh), cos, sin)
    v = v.reshape(b, t, hkv, dh)
    if kv is not None:  # (cache_k, cache_v) [B, S, Hkv, Dh], write slot
      cache_k, cache_v, index = kv
      zero = jnp.zeros([], jnp.int32)
      k = jax.lax.dynamic_update_slice(
        cache_k, k.astype(cache_k.dtype), (zero, index, zero, zero)
      )
      v = jax.lax.dynamic_update_slice(
        cache_v, v.astype(cache_v.dtype), (zero, index, zero, zero)
      )
    q = q.reshape(b, t, hkv, groups, dh)
    scores = jnp.einsum('btkgd,bskd->bkgts', q, k.astype(q.dtype))
    scores = scores.astype(jnp.float32) / math.sqrt(dh)
    neg = jnp.finfo(jnp.float32).min
    scores = jnp.where(allowed[:, None, None], scores, neg)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum('bkgts,bskd->btkgd', probs, v.astype(x.dtype))
    out = out.reshape(b, t, c.num_heads * dh)
    out = self.dense('o_proj', out, c.hidden_size, lowrank, bias=bias)
    return out, (k, v)


class MLP(_Linears):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, lowrank):
    c = self.config
    f, bias = c.intermediate_size, c.mlp_bias
    gate = self.dense('gate_proj', x, f, lowrank, bias=bias)
    up = self.dense('up_proj', x, f, lowrank, bias=bias)
    return self.dense('down_proj', nn.silu(gate) * up, c.hidden_size, lowrank,
                      bias=bias)  # fmt: skip


class Block(nn.Module):
  """Pre-norm decoder block: h + attn(norm(h)), then + mlp(norm(.))."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, h, cos, sin, allowed, kv=None, lowrank=None):
    c = self.config
    lowrank = lowrank or {}
    a, kv = Attention(c, name='self_attn')(
      RMSNorm(c.rms_norm_eps, name='input_layernorm')(h),
      cos,
      sin,
      allowed,
      kv,
      lowrank,
    )
    h = h + a
    m = MLP(c, name='mlp')(
      RMSNorm(c.rms_norm_eps, name='post_attention_layernorm')(h), lowrank
    )
    return h + m, kv


# ----------------------------------------------------------------------------
# The model as pure functions over a parameter pytree.


def init(config: LlamaConfig, rng: jax.Array) -> Params:
  """Random parameters (normal(0.02) weights, unit norms), stacked layers."""
  k_embed, k_layers, k_head = jax.random.split(rng, 3)
  d = config.hidden_size
  x = jnp.zeros((1, 1, d), jnp.float32)
  cos = sin = jnp.zeros((1, 1, 1, config.head_size), jnp.float32)
  allowed = jnp.ones((1, 1, 1), bool)
  block = Block(config)
  layers = jax.vmap(lambda k: block.init(k, x, cos, sin, allowed)['params'])(
    jax.random.split(k_layers, config.num_layers)
  )
  params = {
    'embed_tokens': {
      'embedding': 0.02
      * jax.random.normal(k_embed, (config.vocab_size, d), jnp.float32)
    },
    'layers': layers,
    'norm': {'scale': jnp.ones((d,), jnp.float32)},
  }
  if not config.tie_embeddings:
    params['lm_head'] = {
      'kernel': 0.02
      * jax.random.normal(k_head, (d, config.vocab_size), jnp.float32)
    }
  return params


def default_positions(mask, segment_ids=None, offset=None):
  """Rotary positions that skip padding and restart at each segment.

  Args:
    mask: [B, T] bool, real tokens.
    segment_ids: [B, T] int, equal ids mark one packed sequence (chunk);
      positions restart at 0 where the id changes. None: one segment.
    offset: [B] int, real tokens already seen (a cache), added to all.

  Returns:
    [B, T] int32; a padding slot gets its neighbour's position (it is
    masked out of attention anyway).
  """
  m = mask.astype(jnp.int32)
  count = jnp.cumsum(m, axis=1)  # real tokens up to and including t
  if segment_ids is not None:
    before = count - m  # real tokens strictly before t
    start = jnp.concatenate(
      [
        jnp.ones_like(segment_ids[:, :1], bool),
        segment_ids[:, 1:] != segment_ids[:, :-1],
      ],
      axis=1,
    )
    count = count - jax.lax.cummax(jnp.where(start, before, 0), axis=1)
  pos = jnp.maximum(count - 1, 0)
  if offset is not None:
    pos = pos + offset[:, None]
  return pos.astype(jnp.int32)


def _attention_mask(config, q_slots, k_slots, q_pos, k_pos, k_mask, segs):
  """allowed [B, T, S]: causal in slot order, real keys, window, segment."""
  allowed = (k_slots[None, None, :] <= q_slots[None, :, None]) & k_mask[
    :, None, :
  ]
  if config.sliding_window is not None:
    allowed &= q_pos[:, :, None] - k_pos[:, None, :] < config.sliding_window
  if segs is not None:
    allowed &= segs[:, :, None] == segs[:, None, :]
  return allowed


def check_tokens(tokens, mask=None) -> None:
  """One-line errors for unusable inputs (only where values are concrete)."""
  if tokens.ndim != 2:
    raise ValueError(f'tokens must be [batch, time], got shape {tokens.shape}')
  if tokens.shape[1] == 0:
    raise ValueError('tokens are empty (time axis of length 0)')
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'tokens must be integers, got {tokens.dtype}')
  if mask is not None and mask.shape != tokens.shape:
    raise ValueError(
      f'mask shape {mask.shape} differs from tokens shape {tokens.shape}'
    )


@functools.partial(
  jax.jit, static_argnames=('config', 'return_hidden', 'return_logits')
)
def apply(
  params: Params,
  tokens: jax.Array,
  *,
  config: LlamaConfig,
  mask: jax.Array | None = None,
  positions: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  cache: KVCache | None = None,
  lowrank: LowRankMap | LayerHook | None = None,
  return_hidden: bool = False,
  return_logits: bool = True,
) -> LMOutput:
  """Runs the decoder on `tokens`.

  Args:
    params: the parameter pytree (see the module docstring).
    tokens: [B, T] int token ids.
    config: the architecture.
    mask: [B, T] bool, False on padding (default: all True). Padding may be
      anywhere (left, right, holes); it is never attended to.
    positions: [B, T] rotary positions. Default: real tokens are numbered
      from 0 (from the cache's count with a cache), restarting per segment.
    segment_ids: [B, T] ids of packed chunks: attention stays inside a
      chunk and positions restart (not with a cache).
    cache: a `KVCache` to read and extend: the tokens are written at slots
      `cache.index .. cache.index + T - 1` and attend to everything before.
    lowrank: per-layer additive low-rank updates of named linears, either
      `{linear: LowRank}` with every array stacked on a leading [L] axis,
      or a `LayerHook` computing them from each layer's block input. The
      parameters themselves are not touched.
    return_hidden: also return every block's input and the final normed
      state, [L + 1, B, T, D] (Hugging Face `hidden_states`).
    return_logits: compute the [B, T, V] logits (False: hidden/cache only).

  Returns:
    `LMOutput(logits, hidden, cache, final)`.
  """
  c = config
  check_tokens(tokens, mask)
  b, t = tokens.shape
  mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
  dtype = jnp.dtype(c.dtype)
  if segment_ids is not None and cache is not None:
    raise ValueError('segment_ids (packed chunks) cannot be used with a cache')
  if positions is None:
    offset = None if cache is None else jnp.sum(cache.mask, 1)
    positions = default_positions(mask, segment_ids, offset)
  if cache is None:
    slots = jnp.arange(t)
    allowed = _attention_mask(
      c, slots, slots, positions, positions, mask, segment_ids
    )
  else:
    q_slots = cache.index + jnp.arange(t)
    k_mask = jax.lax.dynamic_update_slice(cache.mask, mask, (0, cache.index))
    k_pos = jax.lax.dynamic_update_slice(
      cache.positions, positions.astype(jnp.int32), (0, cache.index)
    )
    allowed = _attention_mask(
      c, q_slots, jnp.arange(cache.size), positions, k_pos, k_mask, None
    )
  cos, sin = _rope_tables(c, positions)
  h = params['embed_tokens']['embedding'][tokens].astype(dtype)
  block = Block(c)
  hook = lowrank if isinstance(lowrank, LayerHook) else None
  static = None if hook is not None else lowrank
  layer_xs = (
    params['layers'],
    hook.xs if hook is not None else static,
    jnp.arange(c.num_layers),
  )

  def run_block(p, h, kv, lr):
    return block.apply({'params': p}, h, cos, sin, allowed, kv, lr)

  if c.remat:
    run_block = jax.checkpoint(run_block)

  def body(carry, xs):
    h, ck, cv = carry
    p, lr_xs, i = xs
    lr = hook.fn(lr_xs, h, mask) if hook is not None else lr_xs
    kv = None if cache is None else (ck[i], cv[i], cache.index)
    out, (k, v) = run_block(p, h, kv, lr)
    if cache is not None:
      ck = jax.lax.dynamic_update_index_in_dim(ck, k, i, 0)
      cv = jax.lax.dynamic_update_index_in_dim(cv, v, i, 0)
    return (out, ck, cv), (h if return_hidden else None)

  ck, cv = (None, None) if cache is None else (cache.k, cache.v)
  (h, ck, cv), hidden = jax.lax.scan(
    body, (h, ck, cv), layer_xs, unroll=c.unroll
  )
  h = RMSNorm(c.rms_norm_eps).apply({'params': params['norm']}, h)
  if return_hidden:
    hidden = jnp.concatenate([hidden, h[None]], 0)
  new_cache = None
  if cache is not None:
    new_cache = KVCache(ck, cv, k_mask, k_pos, cache.index + t)
  logits = head(params, h, config=c) if return_logits else None
  return LMOutput(logits, hidden, new_cache, h)


def head(params: Params, h: jax.Array, *, config: LlamaConfig) -> jax.Array:
  """Float32 logits [..., V] of final normed states [..., D]."""
  if config.tie_embeddings:
    w = params['embed_tokens']['embedding']
    return jnp.einsum('...d,vd->...v', h, w.astype(h.dtype)).astype(jnp.float32)
  return (h @ params['lm_head']['kernel'].astype(h.dtype)).astype(jnp.float32)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(tokens[:, t+1] | ..t) [B, T-1] from logits [B, T, V]."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  return jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]


def num_params(params: Params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
