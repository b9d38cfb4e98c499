"""RoTTA: robust test-time adaptation in changing environments.

Three parts (Yuan et al., CVPR 2023): robust BN (RBN) normalises with
statistics that an EMA of batch statistics keeps up to date; a category-
balanced memory bank with timeliness and uncertainty (CSTU) stores recent,
confident test samples per pseudo-class; a teacher (the EMA of a student)
predicts the stream, and every `update_frequency` samples the student takes
one step on the memory bank, matching the teacher's predictions on the stored
images with its own on strongly augmented copies, each sample weighted by
its age.
"""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax._src import (
  augment,
  base,
  losses,
  meta as meta_lib,
  params as params_lib,
)
from tta_jax.models.vision import layers


class MemoryBank(NamedTuple):
  """CSTU's fixed-size store (slot order carries no meaning)."""

  images: jax.Array  # [N, H, W, C] stored test images
  labels: jax.Array  # [N] int32 teacher pseudo-labels
  uncertainty: jax.Array  # [N] entropy of the teacher's prediction
  age: jax.Array  # [N] int32 samples seen since insertion (counting its own)
  valid: jax.Array  # [N] bool, False on empty slots


class RottaState(NamedTuple):
  student: Any  # the student's adapted parameters (the optimizer's subset)
  student_stats: Any  # the student's RBN statistics
  memory: MemoryBank
  seen: jax.Array  # int32: valid test samples seen so far


def rotta(
  apply_fn,
  optimizer: optax.GradientTransformation,
  *,
  input_shape: Sequence[int] | None = None,
  memory_size: int = 64,
  update_frequency: int = 64,
  nu: float = 0.001,
  alpha: float = 0.05,
  lambda_t: float = 1.0,
  lambda_u: float = 1.0,
  adapt: params_lib.MaskFn = params_lib.bn_affine,
  augment_strength: str = 'cifar',
) -> base.Adapter:
  """RoTTA (Yuan et al., CVPR 2023), following the official BIT-DA/RoTTA.

  The state's `params` and `batch_stats` are the teacher's: its prediction
  on the test batch (BN in eval mode: the teacher's RBN statistics, untouched
  by the test batch) is what is scored. The student lives in `extra`. Each
  valid test sample, in order, enters the memory bank with the teacher's
  pseudo-label and entropy; after every `update_frequency`-th sample (possibly
  mid-batch) one update runs on the memory bank, in train mode: the teacher's
  RBN statistics move towards the bank's (momentum `alpha`) and give the
  targets; the student's move towards the strongly augmented bank's
  (`augment.cotta_augment`, one draw per update); the student takes one
  optimizer step on the timeliness-weighted soft cross-entropy; the teacher
  becomes `(1 - nu) teacher + nu student` on the adapted leaves. RBN in train
  mode is `BNMode(source_weight=1 - alpha)` with the layer's running
  statistics as the EMA; padding rows never enter the bank, the counter or
  any statistic.

  Static shapes: the bank is `memory_size` slots of `input_shape` images.
  Its bookkeeping runs first, as a `lax.scan` over the batch that touches no
  image (admission depends only on the teacher's pre-batch predictions);
  each update then sees the bank as it was right after its firing sample
  (every slot holds its last writer's image). Updates run under `lax.cond`,
  at most ceil(B / update_frequency) per batch; under `vmap` (parallel
  streams) each stream pays for that many.

  Args:
    apply_fn: the model's `ApplyFn`.
    optimizer: the official one is `optax.adam(1e-3, b1=0.9, b2=0.999)`
      (weight decay 0).
    input_shape: `(H, W, C)` of the images the memory bank stores (required;
      runners pass it as context).
    memory_size: bank capacity N (64); also the time scale of the ages.
    update_frequency: samples between updates (64).
    nu: teacher EMA rate (0.001).
    alpha: RBN momentum (0.05).
    lambda_t: weight of the age term of the eviction score (1).
    lambda_u: weight of the uncertainty term (1).
    adapt: the student's adapted parameters (the RBN affine parameters).
    augment_strength: `cotta_augment` strength of the student's views.

  Returns:
    An `Adapter` whose `extra` is a `RottaState`.

  References:
    Yuan, Xie & Li, Robust Test-Time Adaptation in Dynamic Scenarios,
    CVPR 2023 (code: github.com/BIT-DA/RoTTA).
  """
  if input_shape is None or len(input_shape) != 3:
    raise ValueError(
      f'rotta: input_shape (H, W, C) is required for the memory bank, got '
      f'{input_shape}'
    )
  if memory_size < 1 or update_frequency < 1:
    raise ValueError('rotta: memory_size and update_frequency must be >= 1')
  rbn = layers.BNMode(source_weight=1.0 - alpha)

  def init_fn(variables, rng):
    params, stats = variables['params'], variables['batch_stats']
    student, _ = params_lib.split_by(adapt, params, stats, who='rotta')
    extra = RottaState(
      student=student,
      student_stats=stats,
      memory=memory_init(memory_size, input_shape),
      seen=jnp.zeros([], jnp.int32),
    )
    return base.AdaptState(
      params=params,
      batch_stats=stats,
      opt_state=optimizer.init(student),
      rng=rng,
      step=jnp.zeros([], jnp.int32),
      extra=extra,
    )

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del extra_args
    images = jnp.asarray(batch['image'])
    size = images.shape[0]
    valid = losses.batch_mask(batch)
    teacher, frozen = params_lib.split(
      state.params, adapt(state.params, state.batch_stats)
    )
    out = apply_fn(state.params, state.batch_stats, images)
    probs = jax.nn.softmax(out.logits, axis=-1)
    uncertainty = -jnp.sum(probs * jnp.log(probs + 1e-6), axis=-1)
    ex = state.extra

    # 1. The bank's bookkeeping, sample by sample; images are placed later.
    def admit(bank, row):
      label, unc, active = row
      bank, slot, accepted = _cstu_add(
        bank,
        None,
        label,
        unc,
        active=active,
        num_classes=out.logits.shape[-1],
        lambda_t=lambda_t,
        lambda_u=lambda_u,
      )
      return bank, (slot, accepted)

    rows = (jnp.argmax(out.logits, -1), uncertainty, valid)
    bank, (slots, accepted) = jax.lax.scan(
      admit, ex.memory._replace(images=None), rows
    )
    seen = ex.seen + jnp.cumsum(valid.astype(jnp.int32))  # [B]

    def bank_at(i):
      """The bank right after sample i: images of each slot's last writer."""
      hit = (accepted & (jnp.arange(size) <= i))[:, None] & (
        slots[:, None] == jnp.arange(memory_size)[None, :]
      )  # [B, N]
      last = jnp.max(jnp.where(hit, jnp.arange(size)[:, None], -1), axis=0)
      new = last >= 0
      age = jnp.where(
        new,
        seen[i] - seen[jnp.maximum(last, 0)] + 1,
        jnp.where(ex.memory.valid, ex.memory.age + seen[i] - ex.seen, 0),
      )
      return MemoryBank(
        images=jnp.where(
          new[:, None, None, None],
          images[jnp.maximum(last, 0)].astype(ex.memory.images.dtype),
          ex.memory.images,
        ),
        labels=None,
        uncertainty=None,
        age=age,
        valid=ex.memory.valid | new,
      )

    # 2. The updates, in order, at the samples where `seen` hits a multiple
    # of `update_frequency` (at most ceil(B / f) of them). Under vmap the
    # cond becomes a select, so every stream pays for that many updates.
    def update(models, memory, seen_then):
      teacher, t_stats, student, s_stats, opt_state = models
      key = jax.random.fold_in(state.rng, seen_then)
      target = apply_fn(
        params_lib.merge(teacher, frozen),
        t_stats,
        memory.images,
        bn_mode=rbn,
        mask=memory.valid,
      )
      strong = augment.cotta_augment(
        key, memory.images, strength=augment_strength
      )
      weights = timeliness_weights(memory.age, memory_size)

      def loss_fn(student):
        o = apply_fn(
          params_lib.merge(student, frozen),
          s_stats,
          strong,
          bn_mode=rbn,
          mask=memory.valid,
        )
        ce = losses.soft_cross_entropy(
          o.logits, jax.lax.stop_gradient(target.logits)
        )
        return losses.masked_mean(ce * weights, memory.valid), o.batch_stats

      grad_fn = meta_lib.inner_value_and_grad(
        loss_fn, has_aux=True, first_order=first_order
      )
      (loss, s_stats), grads = grad_fn(student)
      updates, opt_state = optimizer.update(grads, opt_state, student)
      student = optax.apply_updates(student, updates)
      teacher = jax.tree.map(
        lambda t, s: (1.0 - nu) * t + nu * s, teacher, student
      )
      return (teacher, target.batch_stats, student, s_stats, opt_state), loss

    fire = valid & (seen % update_frequency == 0)
    order = jnp.cumsum(fire.astype(jnp.int32))
    opt_state = meta_lib.inject_meta_hyperparams(state.opt_state, meta)
    models = (teacher, state.batch_stats, ex.student, ex.student_stats,
              opt_state)  # fmt: skip

    def maybe_update(u, carry):
      i = jnp.argmax(fire & (order == u + 1))  # the u-th firing sample
      return jax.lax.cond(
        u < order[-1],
        lambda m, _: update(m, bank_at(i), seen[i]),
        lambda m, prev: (m, prev),
        *carry,
      )

    models, loss = jax.lax.fori_loop(
      0, -(-size // update_frequency), maybe_update, (models, jnp.zeros([]))
    )
    teacher, t_stats, student, s_stats, opt_state = models
    last = bank_at(size - 1)
    memory = bank._replace(images=last.images)
    new_state = state._replace(
      params=params_lib.merge(teacher, frozen),
      batch_stats=t_stats,
      opt_state=opt_state,
      step=state.step + 1,
      extra=RottaState(student, s_stats, memory, seen[-1]),
    )
    metrics = {
      'loss': loss,
      'updates': order[-1].astype(jnp.float32),
      'memory_occupancy': jnp.sum(memory.valid).astype(jnp.float32),
    }
    return new_state, base.StepOutput(out.logits, metrics)

  return base.Adapter(init_fn, step_fn, adapt)


def timeliness_weights(age: jax.Array, capacity: int) -> jax.Array:
  """E(a) = exp(-a) / (1 + exp(-a)) with a = age / capacity."""
  return jax.nn.sigmoid(-age.astype(jnp.float32) / capacity)


def memory_init(
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


def memory_add(
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
  return _cstu_add(
    memory,
    image,
    label,
    uncertainty,
    active=active,
    num_classes=num_classes,
    lambda_t=lambda_t,
    lambda_u=lambda_u,
  )[0]


def _cstu_add(
  memory, image, label, uncertainty, *, active, num_classes, lambda_t, lambda_u
):
  """`memory_add` that also returns `(slot, accepted)`; `image` may be None."""
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
