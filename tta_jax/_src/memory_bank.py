"""RoTTA's category-balanced memory bank with timeliness and uncertainty.

CSTU (Yuan et al., CVPR 2023) keeps a fixed number of recent, confident test
samples per pseudo-class; a pure-data `MemoryBank` and pure functions to
create it, add a sample and weight its items by age, so a stream of
insertions is a `lax.scan`.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp


class MemoryBank(NamedTuple):
  """CSTU's fixed-size store (slot order carries no meaning)."""

  images: jax.Array  # [N, H, W, C] stored test images
  labels: jax.Array  # [N] int32 teacher pseudo-labels
  uncertainty: jax.Array  # [N] entropy of the teacher's prediction
  age: jax.Array  # [N] int32 samples seen since insertion (counting its own)
  valid: jax.Array  # [N] bool, False on empty slots


def timeliness_weights(age: jax.Array, capacity: int) -> jax.Array:
  """E(a) = exp(-a) / (1 + exp(-a)) with a = age / capacity."""
  return jax.nn.sigmoid(-age.astype(jnp.float32) / capacity)


def init(
  capacity: int, input_shape: Sequence[int], dtype=jnp.float32
) -> MemoryBank:
  """An empty bank of `capacity` slots for images of `input_shape`."""
  return MemoryBank(
    images=jnp.zeros((capacity, *input_shape), dtype),
    labels=jnp.zeros((capacity,), jnp.int32),
    uncertainty=jnp.zeros((capacity,), jnp.float32),
    age=jnp.zeros((capacity,), jnp.int32),
    valid=jnp.zeros((capacity,), bool),
  )


def add(
  memory: MemoryBank,
  image: jax.Array,
  label: jax.Array,
  uncertainty: jax.Array,
  *,
  num_classes: int,
  lambda_t: float = 1.0,
  lambda_u: float = 1.0,
  active: jax.Array | bool = True,
) -> MemoryBank:
  """CSTU's `add_instance`: insert, maybe evicting, then age every item.

  With N slots and K classes, the quota is N / K per class. A sample whose
  class is under quota goes into a free slot, or, in a full bank, replaces
  the highest-scoring item of the majority classes; a sample whose class is
  at quota replaces that class's highest-scoring item. Replacement happens
  only when that score beats the newcomer's; the score is
  `lambda_t / (1 + exp(-age / N)) + lambda_u * uncertainty / log K`, and
  ties go, as in the official list scan, to the highest class index, then
  the most recent item. Every stored item (the newcomer included) then ages
  by one, whether the newcomer was kept or not. With `active` False (a
  padding row) the bank is returned unchanged.
  """
  return add_with_slot(
    memory,
    image,
    label,
    uncertainty,
    active=active,
    num_classes=num_classes,
    lambda_t=lambda_t,
    lambda_u=lambda_u,
  )[0]


def add_with_slot(
  memory, image, label, uncertainty, *, active, num_classes, lambda_t, lambda_u
):
  """`add` that also returns `(slot, accepted)`; `image` may be None."""
  capacity = memory.valid.shape[0]
  per_class = capacity / num_classes
  log_k = math.log(num_classes)
  valid = memory.valid
  counts = jnp.sum(
    jax.nn.one_hot(memory.labels, num_classes, dtype=jnp.int32)
    * valid[:, None],
    axis=0,
  )  # [K]
  under_quota = counts[label] < per_class
  free = under_quota & (jnp.sum(valid) < capacity)
  majority = counts == jnp.max(counts)
  candidates = valid & jnp.where(
    under_quota, majority[memory.labels], memory.labels == label
  )
  score = (
    lambda_t * jax.nn.sigmoid(memory.age.astype(jnp.float32) / capacity)
    + lambda_u * memory.uncertainty / log_k
  )
  new_score = 0.5 * lambda_t + lambda_u * uncertainty / log_k
  best = jnp.max(jnp.where(candidates, score, -jnp.inf))
  tied = candidates & (score == best)
  top_class = jnp.max(jnp.where(tied, memory.labels, -1))
  tied = tied & (memory.labels == top_class)
  victim = jnp.argmin(jnp.where(tied, memory.age, jnp.iinfo(jnp.int32).max))
  evict = jnp.any(candidates) & (best > new_score)
  # (The official code also accepts when no candidate exists, which cannot
  # happen outside the free case.)
  active = jnp.asarray(active, bool)
  accept = (free | evict) & active
  slot = jnp.where(free, jnp.argmin(valid), victim)

  def put(field, value):
    if field is None:
      return None
    value = jnp.asarray(value, field.dtype)
    return field.at[slot].set(jnp.where(accept, value, field[slot]))

  added = MemoryBank(
    images=put(memory.images, image),
    labels=put(memory.labels, label),
    uncertainty=put(memory.uncertainty, uncertainty),
    age=put(memory.age, 0),
    valid=put(memory.valid, True),
  )
  aged = added.valid & active
  return (
    added._replace(age=added.age + aged.astype(jnp.int32)),
    slot,
    accept,
  )
