"""Losses shared by the methods. Each lives here once.

Per-example losses return shape `[B]`; reduce them with `masked_mean` so that
padding rows of a last partial batch, or rows a method filters out, never
count and an empty selection gives 0 rather than NaN.
"""

import math

import jax
import jax.numpy as jnp


def softmax_entropy(logits: jax.Array) -> jax.Array:
  """H(softmax(z)) = -sum_k p_k log p_k per row. [..., K] -> [...]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def marginal_entropy(logits: jax.Array, axis: int = 0) -> jax.Array:
  """Entropy of the mean prediction over `axis` (MEMO, TPT).

  Args:
    logits: e.g. `[N_views, K]`.
    axis: the axis averaged over.

  Returns:
    H(mean_n softmax(z_n)), computed in log space (a class no view gives
    any probability contributes 0, not NaN).
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  n = logits.shape[axis]
  avg_logp = jax.nn.logsumexp(logp, axis=axis) - jnp.log(n)
  avg_logp = jnp.maximum(avg_logp, jnp.finfo(avg_logp.dtype).min)
  return -jnp.sum(jnp.exp(avg_logp) * avg_logp, axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """-log softmax(z)[y] per row. logits [B, K], labels int [B] -> [B]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def soft_cross_entropy(logits: jax.Array, target_logits: jax.Array):
  """-sum_k softmax(t)_k log softmax(z)_k per row (CoTTA's consistency)."""
  target = jax.nn.softmax(target_logits, axis=-1)
  return -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def gem_t(
  logits: jax.Array, mask: jax.Array | None = None, *, scale: float = 1.0
) -> jax.Array:
  """Generalised entropy with a batch temperature (GEM-T, DomainAdaptor).

  Each row is centred, `T = scale * mean_k std_i(z_ik)` (unbiased std over
  the selected rows, held constant: no gradient flows through it) and the
  result is the mean entropy of `softmax(z / T)` over the selected rows.
  With fewer than two selected rows `T = 1` (plain entropy), and with none
  the loss is 0. logits [B, K], mask [B] bool -> scalar.

  References:
    Zhang et al., DomainAdaptor: A Novel Approach to Test-time Adaptation,
    ICCV 2023 (`AdaptorHeads.Losses.GEM_T`).
  """
  if mask is None:
    mask = jnp.ones(logits.shape[:1], bool)
  w = mask.astype(logits.dtype)[:, None]
  z = logits - jax.lax.stop_gradient(jnp.mean(logits, -1, keepdims=True))
  n = jnp.sum(w)
  mean = jnp.sum(z * w, 0) / jnp.maximum(n, 1.0)
  var = jnp.sum(jnp.square(z - mean) * w, 0) / jnp.maximum(n - 1.0, 1.0)
  t = jax.lax.stop_gradient(scale * jnp.mean(jnp.sqrt(var)))
  t = jnp.where(n > 1, jnp.maximum(t, 1e-8), 1.0)
  return masked_mean(softmax_entropy(z / t), mask)


def masked_mean(
  values: jax.Array, mask: jax.Array | None = None, axis=None
) -> jax.Array:
  """Mean of `values` where `mask` is true; 0 when nothing is selected."""
  if mask is None:
    return jnp.mean(values, axis=axis)
  mask = jnp.broadcast_to(mask, values.shape).astype(values.dtype)
  total = jnp.sum(values * mask, axis=axis)
  return total / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def batch_mask(batch, size: int | None = None) -> jax.Array:
  """The batch's validity mask: `batch['mask']`, or all-true. [B] bool."""
  if 'mask' in batch:
    return batch['mask'].astype(bool)
  n = batch['image'].shape[0] if size is None else size
  return jnp.ones((n,), bool)


def entropy_margin(margin: float, num_classes: int) -> float:
  """E0 = `margin` ln K: the reliability threshold of EATA, ETA and SAR
  (samples with a lower prediction entropy are reliable)."""
  return margin * math.log(num_classes)


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt with a zero (not NaN) gradient where x == 0 (dead features)."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def feature_statistics(
  features: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """Per-dimension mean and unbiased std over the selected rows.

  `torch.std_mean` over the batch (FOA, MGTTA): the std divides by n - 1
  (by 1 when a single row is selected, giving 0). features [B, D], mask [B]
  -> (mean [D], std [D]).
  """
  if mask is None:
    mask = jnp.ones(features.shape[:1], bool)
  w = mask.astype(features.dtype)[:, None]
  n = jnp.sum(w)
  mean = jnp.sum(features * w, 0) / jnp.maximum(n, 1.0)
  var = jnp.sum(jnp.square(features - mean) * w, 0) / jnp.maximum(n - 1.0, 1.0)
  return mean, _safe_sqrt(var)


def foa_discrepancy(
  features: jax.Array,
  source_mean: jax.Array,
  source_std: jax.Array,
  mask: jax.Array | None = None,
  *,
  divisor: float = 64.0,
) -> jax.Array:
  """FOA's activation discrepancy against source statistics (scalar).

  (||std_b(F) - sigma_s||^2 + ||mean_b(F) - mu_s||^2) / divisor, with the
  unbiased batch std of `feature_statistics`. FOA and MGTTA divide by a
  constant 64 whatever the batch size; multiply by lambda (0.4) yourself.

  References:
    Niu et al., Test-Time Model Adaptation with Only Forward Passes, ICML
    2024 (FOA); Deng et al., AAAI 2025 (MGTTA) reuse it.
  """
  if features.shape[-1:] != source_mean.shape or (
    source_mean.shape != source_std.shape
  ):
    raise ValueError(
      f'features {features.shape} do not match source statistics '
      f'{source_mean.shape} / {source_std.shape}'
    )
  mean, std = feature_statistics(features, mask)
  return (
    jnp.sum(jnp.square(std - source_std))
    + jnp.sum(jnp.square(mean - source_mean))
  ) / divisor
