"""Generative Adapter's generator: a context -> a low-rank update of an LM.

A frozen Llama-family LM reads a context chunk by chunk; per adapted layer
l, a small generator turns the layer's block inputs H (the residual stream
before the block's RMSNorm, Hugging Face `hidden_states[l]`) into an
additive update of one linear (`o_proj` by default, `down_proj` as the
FFN option):

    Ĥ   = RMSNorm_g(H)                      [T, D]   (own learnable gain)
    K   = Ĥ W_K,  V = Ĥ W_V                 [T, d_r] (padding rows zeroed)
    G_t = Kᵀ V                              [d_r, d_r] the chunk's Gram state
    S_t = S_{t-1} + G_t                     running sum over the chunks
    N_t = svdnorm_r(S_t)                    rank <= r, singular values 0 or 1
    Δy  = s · ((x W_Q) N_t) W_O             x: the linear's input

`W_O` starts at zero, so the adapted LM is the base LM at initialisation,
and s = alpha / d_r (1/16 for the paper's Mistral generator). The state S
has the same size whatever the context length. `N = U_r diag(w) V_rᵀ` is
a rank-r LoRA: `a = s · W_Q U_r diag(w)` [D_in, r], `b = V_rᵀ W_O`.

Two ways to compute the same numbers:

* streaming (`init_state`, `update`, `adapter`, `apply`): each chunk runs
  through the LM under the adapter of the chunks before it; its hidden
  states extend S. This is test time.
* parallel prefix (`prefix_forward`): all chunks of an example in one
  batch; inside every layer a 0/1 merge matrix M sums the chunks' Gram
  states (`S_i = Σ_j M_ij G_j`), so chunk i is run under the adapter of the
  chunks M selects. With M strictly lower-triangular this equals the
  streaming loop (layer l of chunk i only reads layer-l inputs of earlier
  chunks, computed under their own adapters); training uses it, with the
  gradient flowing through every earlier chunk.

svdnorm keeps the top r singular directions with weight 1, and gives
weight 0 to directions with σ_i <= tau·σ_1, so an empty context (S = 0)
gives exactly no adapter. Its gradient is the closed form of the
derivative of U g(Σ) Vᵀ, which is finite whenever kept and dropped
singular values differ (no 1/(σ_i² − σ_j²) among kept pairs, unlike a
plain SVD gradient). In training, as the official code does, a sample
whose top singular values have a (near-)zero gap is reset to N = 0. The
official code's randomised SVD (torch `svd_lowrank(q=r, niter=1)`) is
`svd='randomized'` with an explicit key.

Generator parameters, stacked on the LM's layer axis [L]:

    hidden_norm [L, D]         fastlora_hidden_state_norm (ones)
    w_k         [L, D, d_r]    fastlora_A2ᵀ   (Kaiming normal, a = √5)
    w_v         [L, D, d_r]    fastlora_A3ᵀ   (Kaiming normal, a = √5)
    w_q         [L, D_in, d_r] fastlora_A1ᵀ   (Kaiming normal, a = √5)
    w_o         [L, d_r, D_out] fastlora_Bᵀ   (zeros)
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax._src import context
from tta_jax.models.lm import model as lm_model

Params = Any
TARGETS = ('o_proj', 'down_proj')
NORMS = ('svd', 'frobenius')
SVDS = ('exact', 'randomized')
PARAM_NAMES = ('hidden_norm', 'w_k', 'w_v', 'w_q', 'w_o')


@dataclasses.dataclass(frozen=True)
class GAConfig:
  """Generator hyperparameters (hashable: a static argument of `jit`).

  Attributes:
    d_r: the generator's inner width (the paper's 1024).
    rank: r, the adapter rank (the paper's 128).
    alpha: the update is scaled by s = alpha / d_r (64 / 1024 = 1/16 for
      Mistral; 1/8 for Llama-2).
    target: the adapted linear of every layer: 'o_proj' or 'down_proj'.
    norm: 'svd' (the paper's) or 'frobenius' (S / ||S||_F, the ablation).
    svd: 'exact' (deterministic) or 'randomized' (the official code's
      `svd_lowrank(q=rank, niter)`, stochastic, needs a key).
    niter: power iterations of the randomised SVD.
    tau: directions with σ_i <= tau·σ_1 get weight 0 (S = 0 -> N = 0).
    reset_threshold: in training, N = 0 for a sample whose neighbouring
      top singular values differ by less than this (absolutely or
      relative to σ_1); 0 disables the reset.
    norm_eps: epsilon of the generator's RMSNorm.
    window: tokens per context chunk (balanced split) when streaming.
  """

  d_r: int = 1024
  rank: int = 128
  alpha: float = 64.0
  target: str = 'o_proj'
  norm: str = 'svd'
  svd: str = 'exact'
  niter: int = 1
  tau: float = 1e-6
  reset_threshold: float = 1e-7
  norm_eps: float = 1e-6
  window: int = 1024

  def __post_init__(self):
    if self.target not in TARGETS:
      raise ValueError(f'target must be one of {TARGETS}, got {self.target!r}')
    if self.norm not in NORMS:
      raise ValueError(f'norm must be one of {NORMS}, got {self.norm!r}')
    if self.svd not in SVDS:
      raise ValueError(f'svd must be one of {SVDS}, got {self.svd!r}')
    if not 1 <= self.rank <= self.d_r:
      raise ValueError(f'rank must be in [1, d_r={self.d_r}], got {self.rank}')
    if self.window < 1:
      raise ValueError(f'window must be >= 1, got {self.window}')

  @property
  def scale(self) -> float:
    return self.alpha / self.d_r

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'GAConfig':
    d = dict(d)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f'unknown generator config keys {unknown}')
    return cls(**d)


def target_dims(lm_config: lm_model.LlamaConfig, target: str):
  """(D_in, D_out) of the adapted linear."""
  if target == 'o_proj':
    return lm_config.num_heads * lm_config.head_size, lm_config.hidden_size
  if target == 'down_proj':
    return lm_config.intermediate_size, lm_config.hidden_size
  raise ValueError(f'target must be one of {TARGETS}, got {target!r}')


def param_shapes(config: GAConfig, lm_config) -> dict[str, tuple[int, ...]]:
  n, d, r = lm_config.num_layers, lm_config.hidden_size, config.d_r
  d_in, d_out = target_dims(lm_config, config.target)
  return {
    'hidden_norm': (n, d),
    'w_k': (n, d, r),
    'w_v': (n, d, r),
    'w_q': (n, d_in, r),
    'w_o': (n, r, d_out),
  }


def init(config: GAConfig, lm_config, rng: jax.Array) -> Params:
  """Generator parameters: the official code's initialisation.

  torch's `kaiming_normal_(w, a=√5, mode='fan_in')`: std = gain / √fan_in
  with gain = √(2 / (1 + a²)) = √(1/3); W_O = 0 and the norm gain = 1.
  """
  shapes = param_shapes(config, lm_config)
  keys = dict(zip(('w_k', 'w_v', 'w_q'), jax.random.split(rng, 3), strict=True))
  params = {'hidden_norm': jnp.ones(shapes['hidden_norm'], jnp.float32)}
  for name, key in keys.items():
    fan_in = shapes[name][1]
    std = (1.0 / 3.0) ** 0.5 / fan_in**0.5
    params[name] = std * jax.random.normal(key, shapes[name], jnp.float32)
  params['w_o'] = jnp.zeros(shapes['w_o'], jnp.float32)
  return params


def check_params(params: Params, config: GAConfig, lm_config, where='') -> None:
  """One-line errors for a generator that does not fit this LM/config."""
  want = param_shapes(config, lm_config)
  if not isinstance(params, Mapping) or set(params) != set(want):
    got = sorted(params) if isinstance(params, Mapping) else type(params)
    raise ValueError(
      f'generator parameters{where} have entries {got}; expected {sorted(want)}'
    )
  for name, shape in want.items():
    if tuple(np.shape(params[name])) != shape:
      raise ValueError(
        f'generator parameter {name!r}{where} has shape '
        f'{tuple(np.shape(params[name]))}, but this LM and generator config '
        f'(d_r={config.d_r}, target={config.target}) need {shape}'
      )


# ----------------------------------------------------------------------------
# The Gram state of a chunk.


def gram(layer: Params, h: jax.Array, mask: jax.Array, *, eps: float):
  """G = Kᵀ V [..., d_r, d_r] of block inputs h [..., T, D] (one layer).

  `layer` holds that layer's `hidden_norm` [D], `w_k`, `w_v` [D, d_r];
  padding tokens (mask False) contribute nothing.
  """
  h = h.astype(jnp.float32)
  hn = h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + eps)
  hn = layer['hidden_norm'] * hn * mask[..., None]
  k = hn @ layer['w_k']
  v = hn @ layer['w_v']
  return jnp.einsum('...tk,...tv->...kv', k, v)


def _gram_all(gen, hidden, mask, eps):
  """G [L, B, d_r, d_r] of every layer's block inputs [L, B, T, D]."""
  return jax.vmap(lambda p, h: gram(p, h, mask, eps=eps))(
    {k: gen[k] for k in ('hidden_norm', 'w_k', 'w_v')}, hidden
  )


# ----------------------------------------------------------------------------
# SVD normalisation.


def _keep(sigma, rank, tau):
  """Weights w in {0, 1}: the top `rank` directions above tau·σ_1."""
  n = sigma.shape[-1]
  top = jnp.arange(n) < rank
  s1 = sigma[..., :1]
  return (top & (sigma > tau * s1) & (s1 > 0)).astype(sigma.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _polar_topr(s, rank, tau):
  """(U_r diag(w) V_rᵀ, σ) of the exact SVD of s [..., n, n]; σ is
  returned for the training reset and carries no gradient."""
  return _polar_fwd(s, rank, tau)[0]


def _polar_fwd(s, rank, tau):
  u, sigma, vh = jnp.linalg.svd(s, full_matrices=False)
  w = _keep(sigma, rank, tau)
  return ((u * w[..., None, :]) @ vh, sigma), (u, sigma, vh, w)


def _polar_bwd(rank, tau, res, cts):
  """VJP of F(S) = U g(Σ) Vᵀ with g in {0, 1} (constant: g' = 0).

  With P = Uᵀ dS V, Uᵀ dF V = a ∘ (P + Pᵀ)/2 + b ∘ (P − Pᵀ)/2 where
  a_ij = (w_i − w_j) / (σ_i − σ_j) and b_ij = (w_i + w_j) / (σ_i + σ_j)
  (0 where the numerator is 0). The map is self-adjoint, so the gradient
  is U [a ∘ (C + Cᵀ)/2 + b ∘ (C − Cᵀ)/2] Vᵀ with C = Uᵀ ct V. It is
  finite unless a kept and a dropped singular value coincide (the
  training reset covers that); their gap is floored at float32 precision.
  """
  del rank, tau
  ct = cts[0]  # σ's cotangent is ignored (it feeds only the reset test)
  u, sigma, vh, w = res
  c = jnp.swapaxes(u, -1, -2) @ ct @ jnp.swapaxes(vh, -1, -2)
  si, sj = sigma[..., :, None], sigma[..., None, :]
  wi, wj = w[..., :, None], w[..., None, :]
  floor = 1e-7 * jnp.maximum(sigma[..., :1, None], 1e-30)
  diff = si - sj
  diff = jnp.where(jnp.abs(diff) < floor, jnp.where(diff < 0, -floor, floor),
                   diff)  # fmt: skip
  a = jnp.where(wi != wj, (wi - wj) / diff, 0.0)
  total = si + sj
  b = jnp.where(wi + wj > 0, (wi + wj) / jnp.where(total > 0, total, 1.0), 0.0)
  ct_t = jnp.swapaxes(c, -1, -2)
  g = a * (c + ct_t) / 2 + b * (c - ct_t) / 2
  return (u @ g @ vh,)


_polar_topr.defvjp(_polar_fwd, _polar_bwd)


def randomized_svd(s: jax.Array, rank: int, niter: int, key: jax.Array):
  """torch's `svd_lowrank(s, q=rank, niter)` for square s [..., n, n].

  Halko et al.'s range finder (one Gaussian test matrix [n, rank] shared
  by the batch, `niter` power iterations with QR re-orthonormalisation),
  then the exact SVD of the small projection. Returns (U [.., n, rank],
  σ [.., rank], Vh [.., rank, n]).
  """
  n = s.shape[-1]
  st = jnp.swapaxes(s, -1, -2)
  q = jnp.linalg.qr(s @ jax.random.normal(key, (n, rank), s.dtype))[0]
  for _ in range(niter):
    q = jnp.linalg.qr(st @ q)[0]
    q = jnp.linalg.qr(s @ q)[0]
  ub, sigma, vh = jnp.linalg.svd(
    jnp.swapaxes(q, -1, -2) @ s, full_matrices=False
  )
  return q @ ub, sigma, vh


def needs_reset(sigma: jax.Array, rank: int, threshold: float) -> jax.Array:
  """[...] bool: the training reset (near-degenerate top singular values).

  The official criterion: over neighbouring pairs of the top `rank`
  singular values, the smaller of the gap and the gap relative to σ_1 is
  below `threshold`. With an exact SVD the gap between the last kept and
  the first dropped value (what the gradient of the top-r projection
  divides by) is checked too.
  """
  k = min(rank + 1, sigma.shape[-1])
  top = jax.lax.stop_gradient(sigma[..., :k])
  if k < 2:
    return jnp.zeros(sigma.shape[:-1], bool)
  gaps = top[..., :-1] - top[..., 1:]
  rel = gaps / (top[..., :1] + 1e-6)
  return jnp.min(jnp.minimum(gaps, rel), -1) < threshold


def normalize(
  s: jax.Array,
  config: GAConfig,
  *,
  train: bool = False,
  key: jax.Array | None = None,
) -> jax.Array:
  """N = svdnorm_r(S) (or S / ||S||_F) for s [..., d_r, d_r], dense.

  Differentiable. `train` applies the degenerate-gap reset (N = 0 for
  those samples, with zero, finite gradients). `key` is needed by the
  randomised SVD.
  """
  s = s.astype(jnp.float32)
  if config.norm == 'frobenius':
    return s * jax.lax.rsqrt(jnp.sum(s * s, (-1, -2), keepdims=True) + 1e-6)
  if config.svd == 'exact':
    n, sigma = _polar_topr(s, config.rank, config.tau)
    if not train or config.reset_threshold <= 0:
      return n
    reset = needs_reset(sigma, config.rank, config.reset_threshold)
    return jnp.where(reset[..., None, None], 0.0, n)
  if key is None:
    raise ValueError("svd='randomized' needs an explicit PRNG key")

  def polar(x):
    u, sigma, vh = randomized_svd(x, config.rank, config.niter, key)
    w = _keep(sigma, config.rank, config.tau)
    return (u * w[..., None, :]) @ vh, sigma

  if not train or config.reset_threshold <= 0:
    return polar(s)[0]
  # Double `where`: reset samples run the decomposition on a harmless
  # matrix, so their (discarded) branch has no NaN gradient to leak.
  sigma = polar(jax.lax.stop_gradient(s))[1]
  reset = needs_reset(sigma, config.rank, config.reset_threshold)
  d = s.shape[-1]
  safe = jnp.diag(jnp.linspace(2.0, 1.0, d, dtype=s.dtype))
  n = polar(jnp.where(reset[..., None, None], safe, s))[0]
  return jnp.where(reset[..., None, None], 0.0, n)


def lowrank_factors(
  s: jax.Array, config: GAConfig, *, key: jax.Array | None = None
):
  """(u, v) with N = u vᵀ: u = U_r diag(w), v = V_r diag(w) [.., d_r, r].

  Inference only (no gradient needed); for Frobenius normalisation the
  update is not low rank: (N, I) of width d_r.
  """
  s = s.astype(jnp.float32)
  if config.norm == 'frobenius':
    n = normalize(s, config)
    eye = jnp.broadcast_to(jnp.eye(s.shape[-1], dtype=s.dtype), s.shape)
    return n, eye
  r = config.rank
  if config.svd == 'exact':
    u, sigma, vh = jnp.linalg.svd(s, full_matrices=False)
    u, sigma, vh = u[..., :r], sigma[..., :r], vh[..., :r, :]
  else:
    if key is None:
      raise ValueError("svd='randomized' needs an explicit PRNG key")
    u, sigma, vh = randomized_svd(s, r, config.niter, key)
  w = _keep(sigma, r, config.tau)[..., None, :]  # both factors masked
  return u * w, jnp.swapaxes(vh, -1, -2) * w


# ----------------------------------------------------------------------------
# Streaming: state, adapter, update, apply.


class State(NamedTuple):
  """The streaming state of a batch of contexts."""

  s: jax.Array  # [L, B, d_r, d_r]: Σ_t G_t per layer and context
  tokens: jax.Array  # [B] int32: real context tokens absorbed


def init_state(config: GAConfig, lm_config, batch_size: int) -> State:
  """The empty context: S = 0 (its adapter is exactly zero)."""
  n, d = lm_config.num_layers, config.d_r
  return State(
    jnp.zeros((n, batch_size, d, d), jnp.float32),
    jnp.zeros((batch_size,), jnp.int32),
  )


def adapter(
  gen: Params,
  state: State,
  config: GAConfig,
  *,
  key: jax.Array | None = None,
) -> dict[str, lm_model.LowRank]:
  """The low-rank update of the state: {target: LowRank(a, b)}.

  a = s · W_Q U_r diag(w) [L, B, D_in, r], b = V_rᵀ W_O [L, B, r, D_out]
  (r = d_r for Frobenius normalisation). The LoRA form of the paper; with
  S = 0 or W_O = 0 it is exactly zero.
  """
  u, v = lowrank_factors(state.s, config, key=key)
  a = config.scale * jnp.einsum('lid,lbdr->lbir', gen['w_q'], u)
  b = jnp.einsum('lbdr,ldo->lbro', v, gen['w_o'])
  return {config.target: lm_model.LowRank(a, b)}


def check_chunk(tokens, mask, lm_config) -> None:
  """One-line errors for a context chunk the LM cannot take."""
  lm_model.check_tokens(tokens, mask)
  if tokens.shape[1] > lm_config.max_position_embeddings:
    raise ValueError(
      f'a context chunk of {tokens.shape[1]} tokens is longer than the '
      f"LM's {lm_config.max_position_embeddings} positions; use a smaller "
      'window'
    )


def update(
  gen: Params,
  lm_params: Params,
  state: State,
  tokens: jax.Array,
  mask: jax.Array | None = None,
  *,
  config: GAConfig,
  lm_config,
  key: jax.Array | None = None,
) -> State:
  """Absorbs one chunk [B, T]: run it under the current adapter, add its G.

  Positions restart at 0 and attention stays inside the chunk; an
  all-padding row leaves its state unchanged.
  """
  check_chunk(tokens, mask, lm_config)
  if mask is None:
    mask = jnp.ones(tokens.shape, bool)
  out = lm_model.apply(
    lm_params,
    tokens,
    config=lm_config,
    mask=mask,
    lowrank=adapter(gen, state, config, key=key),
    return_hidden=True,
    return_logits=False,
  )
  g = _gram_all(gen, out.hidden[:-1], mask, config.norm_eps)
  return State(state.s + g, state.tokens + jnp.sum(mask, 1, dtype=jnp.int32))


def apply(
  lm_params: Params,
  adapter_: Mapping[str, lm_model.LowRank],
  tokens: jax.Array,
  mask: jax.Array | None = None,
  *,
  lm_config,
  **kwargs,
) -> lm_model.LMOutput:
  """The adapted LM on tokens [B, T] (the frozen parameters untouched)."""
  return lm_model.apply(
    lm_params, tokens, config=lm_config, mask=mask, lowrank=adapter_, **kwargs
  )


def contextualize(
  gen: Params,
  lm_params: Params,
  contexts: Sequence[Sequence[int]],
  *,
  config: GAConfig,
  lm_config,
  pad_id: int = 0,
  key: jax.Array | None = None,
) -> State:
  """The state of a batch of token contexts, streamed in balanced chunks
  of at most `config.window` tokens (1,500 tokens -> 750 + 750)."""
  if not contexts:
    raise ValueError('no contexts to absorb')
  empty = [i for i, c in enumerate(contexts) if not len(c)]
  if empty:
    raise ValueError(f'contexts {empty} are empty: there is nothing to absorb')
  tokens, mask = context.chunk_stream(contexts, config.window, pad_id=pad_id)
  state = init_state(config, lm_config, len(contexts))
  step = jax.jit(functools.partial(update, config=config, lm_config=lm_config))
  for c in range(tokens.shape[0]):
    k = None if key is None else jax.random.fold_in(key, c)
    state = step(gen, lm_params, state, tokens[c], mask[c], key=k)
  return state


def state_bytes(config: GAConfig, lm_config) -> int:
  """Bytes of one context's streaming state (float32 S per layer)."""
  return 4 * lm_config.num_layers * config.d_r**2


def adapter_floats(config: GAConfig, lm_config) -> int:
  """Floats of one context's LoRA factors, r (D_in + D_out) per layer."""
  d_in, d_out = target_dims(lm_config, config.target)
  r = config.d_r if config.norm == 'frobenius' else config.rank
  return lm_config.num_layers * r * (d_in + d_out)


# ----------------------------------------------------------------------------
# Parallel prefix (training).


def completion_merge(num_chunks: int) -> np.ndarray:
  """Strictly lower-triangular M: chunk i uses chunks < i (0: none)."""
  return np.tril(np.ones((num_chunks, num_chunks), np.int32), -1)


def pretrain_merge(num_chunks: int) -> np.ndarray:
  """The official 'abcdabcd' merge of T context chunks + T windows.

  Rows 0..T-1 (completion): chunk i uses chunks < i. Rows T + j
  (reconstruction window j): chunks 0..j. Windows never feed an adapter.
  """
  t = num_chunks
  m = np.zeros((2 * t, 2 * t), np.int32)
  m[:t, :t] = completion_merge(t)
  m[t:, :t] = np.tril(np.ones((t, t), np.int32))
  return m


def check_merge(merge: np.ndarray, num_segments: int) -> np.ndarray:
  merge = np.asarray(merge)
  if merge.shape != (num_segments, num_segments):
    raise ValueError(
      f'merge matrix has shape {merge.shape}; expected '
      f'({num_segments}, {num_segments}) for {num_segments} segments'
    )
  if not np.isin(merge, (0, 1)).all():
    raise ValueError('merge matrix entries must be 0 or 1')
  return merge.astype(np.int32)


@functools.lru_cache(maxsize=64)
def _prefix_hook_fn(config: GAConfig, merge: tuple, train: bool):
  """The per-layer function of `prefix_forward` (cached: `LayerHook.fn`
  is static and hashed by identity)."""
  m = np.asarray(merge, np.float32)
  rows, inverse = np.unique(m, axis=0, return_inverse=True)
  inverse = np.asarray(inverse).reshape(-1)
  n_seg = m.shape[0]

  def fn(xs, h, mask):
    layer, key = xs
    bs, w, _ = h.shape
    b = bs // n_seg
    g = gram(layer, h, mask, eps=config.norm_eps)  # [B*S, d_r, d_r]
    g = g.reshape(b, n_seg, *g.shape[1:])
    # Only the distinct rows of M are normalised (the pre-training merge
    # repeats every completion prefix as a reconstruction prefix).
    s_unique = jnp.einsum('uj,bjkv->bukv', jnp.asarray(rows), g)
    n = normalize(s_unique, config, train=train, key=key)[:, inverse]
    a = config.scale * jnp.einsum('id,bsdk->bsik', layer['w_q'], n)
    a = a.reshape(bs, *a.shape[2:])
    bb = jnp.broadcast_to(layer['w_o'], (bs, *layer['w_o'].shape))
    return {config.target: lm_model.LowRank(a, bb)}

  return fn


def prefix_forward(
  gen: Params,
  lm_params: Params,
  tokens: jax.Array,
  mask: jax.Array,
  merge: np.ndarray,
  *,
  config: GAConfig,
  lm_config,
  train: bool = False,
  key: jax.Array | None = None,
) -> lm_model.LMOutput:
  """All segments of a batch of examples in one pass, merged by M.

  Args:
    gen: the generator parameters.
    lm_params: the frozen LM.
    tokens, mask: [B, S, W] segments (each its own attention row, positions
      from 0).
    merge: [S, S] 0/1 numpy matrix: segment i is run under
      svdnorm(Σ_j M_ij G_j) (`completion_merge`, `pretrain_merge`).
    config, lm_config: the generator's and the LM's.
    train: apply the degenerate-gap reset.
    key: for the randomised SVD (one key per layer is folded from it).

  Returns:
    The LM output with logits [B * S, W, V] (rows segment-major per
    example).
  """
  b, s, w = tokens.shape
  merge = check_merge(merge, s)
  fn = _prefix_hook_fn(config, tuple(map(tuple, merge.tolist())), bool(train))
  keys = jax.random.split(
    jax.random.key(0) if key is None else key, lm_config.num_layers
  )
  hook = lm_model.LayerHook(fn, (gen, keys))
  return lm_model.apply(
    lm_params,
    tokens.reshape(b * s, w),
    config=lm_config,
    mask=mask.reshape(b * s, w),
    lowrank=hook,
  )
