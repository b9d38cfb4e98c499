"""Batch normalisation whose statistics are chosen at call time.

Test-time adaptation methods differ mostly in which statistics BN normalises
with: the source running statistics (`source`), the test batch's (`norm`,
Tent, EATA, SAR, CoTTA), a prior-weighted mix of both (Schneider et al. 2020,
MEMO's BN-alpha, RoTTA's robust BN), or a mix with a learnable per-channel
weight and the exact mixture variance (Meta-TTT). One layer covers them all:

  mu  = w * mu_s + (1 - w) * mu_b
  var = w * var_s + (1 - w) * var_b [+ w (1 - w) (mu_s - mu_b)^2]

where `w` is the weight on the source statistics. With a `BNMode`, the layer
writes the statistics it normalised with into the `batch_stats` collection;
with `w = 0` these are exactly the current batch's statistics, so a method
can keep, mix or discard them (source training keeps an EMA of them).
"""

import functools
from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class BNMode(NamedTuple):
  """How BN layers pick their statistics. `None` instead means source stats.

  Attributes:
    source_weight: weight `w` of the source statistics (scalar or traced
      array); 0 normalises with the test batch alone.
    ddof: delta degrees of freedom of the batch variance (PyTorch train-mode
      BN: 0; Meta-TTT's mixed BN: 1).
    mixture_variance: add `w (1 - w) (mu_s - mu_b)^2`, the exact variance of
      the two-component mixture (Meta-TTT).
    learned_weight: use each layer's per-channel parameter `alpha` as `w`
      (models built with `bn_alpha_init`).
  """

  source_weight: float | jax.Array = 0.0
  ddof: int = 0
  mixture_variance: bool = False
  learned_weight: bool = False


BATCH = BNMode()


def mixed_bn(alpha: float | None = None) -> BNMode:
  """Meta-TTT's BN: unbiased batch variance and the exact mixture variance.

  `alpha` is the weight of the source statistics: None uses each layer's
  learned per-channel `alpha` (a model built with `bn_alpha_init`); a float
  fixes it for every layer (1: source BN, 0: test-batch BN).
  """
  if alpha is None:
    return BNMode(ddof=1, mixture_variance=True, learned_weight=True)
  if not 0.0 <= alpha <= 1.0:  # outside, the mixed variance can be < 0
    raise ValueError(f'mixed BN: alpha must be in [0, 1], got {alpha}')
  return BNMode(source_weight=alpha, ddof=1, mixture_variance=True)


def masked_moments(x: jax.Array, mask: jax.Array | None, ddof: int = 0):
  """Per-channel mean and variance over all axes but the last.

  Args:
    x: `[B, ..., C]` activations.
    mask: optional `[B]` bool; rows with False (padding) are ignored.
    ddof: delta degrees of freedom.

  Returns:
    `(mean, var)`, each `[C]`. Two-pass, for float32 agreement with PyTorch.
    Padding rows are selected away (`where`) rather than multiplied by a
    0/1 weight: the same values, without a weight tensor the size of `x`
    that XLA's CPU backend would otherwise build for every BN layer.
  """
  axes = tuple(range(x.ndim - 1))
  per_row = 1
  for d in x.shape[1:-1]:
    per_row *= d
  if mask is None:
    mask = jnp.ones(x.shape[:1], bool)
  mask = mask.astype(bool)
  keep = mask.reshape((-1,) + (1,) * (x.ndim - 1))
  n = jnp.sum(mask.astype(x.dtype)) * per_row
  mean = jnp.sum(jnp.where(keep, x, 0), axis=axes) / jnp.maximum(n, 1.0)
  sq = jnp.sum(jnp.where(keep, jnp.square(x - mean), 0), axis=axes)
  return mean, sq / jnp.maximum(n - ddof, 1.0)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with call-time statistics (see module doc).

  Attributes:
    epsilon: added to the variance (PyTorch's 1e-5).
    alpha_init: if set, the layer owns a learnable per-channel source weight
      `alpha`, initialised N(alpha_init, 0.01^2) (Meta-TTT's mixed BN).
  """

  epsilon: float = 1e-5
  alpha_init: float | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    mode: BNMode | None = None,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    c = x.shape[-1]
    dtype = self.param_dtype
    scale = self.param('scale', nn.initializers.ones, (c,), dtype)
    bias = self.param('bias', nn.initializers.zeros, (c,), dtype)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), dtype)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (c,), dtype)
    alpha = None
    if self.alpha_init is not None:
      init = self.alpha_init

      def alpha_fn(key, shape, dtype):
        return (init + 0.01 * jax.random.normal(key, shape)).astype(dtype)

      alpha = self.param('alpha', alpha_fn, (c,), dtype)

    if mode is None:
      mean, var = ra_mean.value, ra_var.value
    else:
      b_mean, b_var = masked_moments(x, mask, mode.ddof)
      if mode.learned_weight:
        if alpha is None:
          raise ValueError(
            'BNMode(learned_weight=True) needs a model built with '
            'bn_alpha_init (a per-channel alpha in every BN layer).'
          )
        w = alpha
      else:
        w = jnp.asarray(mode.source_weight, x.dtype)
      mean = w * ra_mean.value + (1.0 - w) * b_mean
      var = w * ra_var.value + (1.0 - w) * b_var
      if mode.mixture_variance:
        var = var + w * (1.0 - w) * jnp.square(ra_mean.value - b_mean)
      if not self.is_initializing() and self.is_mutable_collection(
        'batch_stats'
      ):
        ra_mean.value, ra_var.value = mean, var
    inv = jax.lax.rsqrt(var + self.epsilon) * scale
    return (x - mean) * inv + bias


def apply_feature_shift(x: jax.Array, shift) -> jax.Array:
  """`x * w + b` per channel, for `shift = (w, b)` ([C] or [B, C] each).

  Every model applies it right after its stem convolution, before the stem
  BN: Meta-TTT's stochastic domain-shift synthesis draws random (w, b)
  there during meta-training. `None` (the default) is the identity.
  """
  if shift is None:
    return x
  w, b = shift
  w, b = jnp.asarray(w, x.dtype), jnp.asarray(b, x.dtype)
  if w.ndim == 2:  # per example: [B, C] -> [B, 1, 1, C]
    w, b = w[:, None, None, :], b[:, None, None, :]
  return x * w + b


def max_pool(
  x: jax.Array,
  window: Sequence[int],
  strides: Sequence[int],
  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0)),
) -> jax.Array:
  """`nn.max_pool` over H and W of NHWC `x`, with a scatter-free derivative.

  The values are `nn.max_pool`'s. Its derivative (select-and-scatter)
  becomes, on XLA's CPU backend, an index tensor per dimension and a
  scatter with one row per input element, which made the max-pool
  backward pass the costliest part of a Tent step on the digits CNN. Here
  the gradient is a sum over the window offsets of the output gradient,
  masked where that offset holds the window's first maximum (in row-major
  order, as select-and-scatter picks it) and spread back by padding: the
  same gradient, ties included. Reverse mode only (`jax.grad`, nested
  `jax.grad` for meta-learning); `jax.jvp` through it is not supported.
  """
  if len(window) != 2 or len(strides) != 2 or len(padding) != 2:
    raise ValueError(
      f'max_pool: 2-D window, strides and padding expected, got {window}, '
      f'{strides}, {padding}'
    )
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  with jax.named_scope('max_pool'):  # names its operations in profiles
    return _max_pool(x, tuple(window), tuple(strides), padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return nn.max_pool(x, window, strides, padding=padding)


def _max_pool_fwd(x, window, strides, padding):
  return _max_pool(x, window, strides, padding), x


@jax.named_scope('max_pool')
def _max_pool_bwd(window, strides, padding, x, g):
  config = [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)]
  xp = jax.lax.pad(x, jnp.array(-jnp.inf, x.dtype), config)
  (sh, sw), (kh, kw) = strides, window
  ho, wo = g.shape[1:3]
  offsets = [(i, j) for i in range(kh) for j in range(kw)]

  def window_slice(a, i, j):
    return a[:, i : i + sh * (ho - 1) + 1 : sh, j : j + sw * (wo - 1) + 1 : sw]

  # The maximum from the very slices it is compared with, so that each
  # window has exactly one hit (its first maximum in row-major order).
  y = functools.reduce(
    jnp.maximum, [window_slice(xp, i, j) for i, j in offsets]
  )
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, g.dtype)
  for i, j in offsets:
    hit = (window_slice(xp, i, j) == y) & ~taken
    taken = taken | hit
    spread = [
      (0, 0, 0),
      (i, xp.shape[1] - i - sh * (ho - 1) - 1, sh - 1),
      (j, xp.shape[2] - j - sw * (wo - 1) - 1, sw - 1),
      (0, 0, 0),
    ]
    dxp = dxp + jax.lax.pad(
      jnp.where(hit, g, 0), jnp.zeros((), g.dtype), spread
    )
  (top, _), (left, _) = padding
  return (dxp[:, top : top + x.shape[1], left : left + x.shape[2]],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
