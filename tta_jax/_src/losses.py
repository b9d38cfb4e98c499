"""Losses shared by the methods. Each lives here once.

Per-example losses return shape `[B]`; reduce them with `masked_mean` so that
padding rows of a last partial batch, or rows a method filters out, never
count and an empty selection gives 0 rather than NaN.
"""

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
    H(mean_n softmax(z_n)), computed in log space.
  """
  logp = jax.nn.log_softmax(logits, axis=-1)
  n = logits.shape[axis]
  avg_logp = jax.nn.logsumexp(logp, axis=axis) - jnp.log(n)
  return -jnp.sum(jnp.exp(avg_logp) * avg_logp, axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """-log softmax(z)[y] per row. logits [B, K], labels int [B] -> [B]."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def soft_cross_entropy(logits: jax.Array, target_logits: jax.Array):
  """-sum_k softmax(t)_k log softmax(z)_k per row (CoTTA's consistency)."""
  target = jax.nn.softmax(target_logits, axis=-1)
  return -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)


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
