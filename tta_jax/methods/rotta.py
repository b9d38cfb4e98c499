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

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax._src import (
  augment,
  base,
  grad_step,
  losses,
  memory_bank,
  params as params_lib,
)
from tta_jax.models.vision import layers


class RottaState(NamedTuple):
  student: Any  # the student's adapted parameters (the optimizer's subset)
  student_stats: Any  # the student's RBN statistics
  memory: memory_bank.MemoryBank
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
    state = grad_step.init_state(
      variables, rng, adapt=adapt, optimizer=optimizer, who='rotta'
    )
    extra = RottaState(
      student=grad_step.split(state, adapt).trainable,
      student_stats=state.batch_stats,
      memory=memory_bank.init(memory_size, input_shape),
      seen=jnp.zeros([], jnp.int32),
    )
    return state._replace(extra=extra)

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del extra_args
    images = jnp.asarray(batch['image'])
    size = images.shape[0]
    valid = losses.batch_mask(batch)
    parts = grad_step.split(state, adapt, meta)
    teacher, frozen = parts.trainable, parts.frozen
    out = apply_fn(state.params, state.batch_stats, images)
    probs = jax.nn.softmax(out.logits, axis=-1)
    uncertainty = -jnp.sum(probs * jnp.log(probs + 1e-6), axis=-1)
    ex = state.extra

    # 1. The bank's bookkeeping, sample by sample; images are placed later.
    def admit(bank, row):
      label, unc, active = row
      bank, slot, accepted = memory_bank.add_with_slot(
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
      return memory_bank.MemoryBank(
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
      weights = memory_bank.timeliness_weights(memory.age, memory_size)

      def loss_fn(params):
        o = apply_fn(
          params,
          s_stats,
          strong,
          bn_mode=rbn,
          mask=memory.valid,
        )
        ce = losses.soft_cross_entropy(
          o.logits, jax.lax.stop_gradient(target.logits)
        )
        return losses.masked_mean(ce * weights, memory.valid), o.batch_stats

      grad_fn = grad_step.value_and_grad(
        loss_fn, parts, has_aux=True, first_order=first_order
      )
      (loss, s_stats), grads = grad_fn(student)
      student, opt_state = grad_step.update(
        optimizer, grads, opt_state, student
      )
      teacher = jax.tree.map(
        lambda t, s: (1.0 - nu) * t + nu * s, teacher, student
      )
      return (teacher, target.batch_stats, student, s_stats, opt_state), loss

    fire = valid & (seen % update_frequency == 0)
    order = jnp.cumsum(fire.astype(jnp.int32))
    models = (teacher, state.batch_stats, ex.student, ex.student_stats,
              parts.opt_state)  # fmt: skip

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

  return base.adapter(init_fn, step_fn, adapt)
