"""CoTTA: continual test-time adaptation with a mean teacher."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax import models
from tta_jax._src import augment, base, grad_step, losses, params as params_lib


class CottaState(NamedTuple):
  """CoTTA's extra state: two more full copies of the parameters (3x)."""

  teacher: Any  # full params: the EMA ("mean") teacher
  source: Any  # full params: the frozen anchor, also the restore target


def cotta(
  apply_fn,
  optimizer: optax.GradientTransformation,
  *,
  adapt: params_lib.MaskFn = params_lib.all_params,
  ema_momentum: float = 0.999,
  restore_prob: float = 0.01,
  ap_threshold: float = 0.92,
  num_augmentations: int = 32,
  symmetric_loss: bool = False,
  always_augment: bool = False,
  augment_strength: str = 'cifar',
  per_example_augment: bool = False,
  augmentations_per_call: int | None = None,
  mixed_bn_alpha: float | None = None,
) -> base.Adapter:
  """CoTTA (Wang et al., CVPR 2022): mean teacher, augmentation, restore.

  Per batch: the frozen source ("anchor") model gives a confidence c, the
  batch mean of its max softmax. If c < `ap_threshold` the teacher's target
  is the mean of its logits over `num_augmentations` augmented copies of the
  batch (`augment.cotta_augment`, one compiled call over a vmapped stack,
  taken only when needed through `lax.cond`); otherwise it is the teacher's
  logits on the batch. The student (`state.params`) takes one optimizer step
  on the soft cross-entropy to that target, the teacher follows it by an EMA
  over all parameters, and each adapted entry is reset to its source value
  with probability `restore_prob` (masks drawn on the device). The scored
  logits are the teacher's target, computed before the updates.

  All three networks normalise with the test batch's statistics, as in the
  official code (its anchor and teacher are deep copies of the student made
  after `configure_model` put BN in batch-statistics mode). Padding rows
  count in neither c, the loss nor any BN statistics.

  Args:
    apply_fn: the model's `ApplyFn`.
    optimizer: the paper's defaults are `optax.adam(1e-3)` (CIFAR, batch
      200) and `optax.sgd(0.01, momentum=0.9, nesterov=True)` (ImageNet,
      batch 64).
    adapt: mask of the student's trained (and restored) parameters; the
      official code trains every weight and bias.
    ema_momentum: teacher EMA momentum.
    restore_prob: the stochastic-restore probability (ImageNet: 0.001).
    ap_threshold: anchor-confidence threshold (CIFAR-10: 0.92, CIFAR-100:
      0.72, ImageNet: 0.1).
    num_augmentations: augmented teacher copies.
    symmetric_loss: the ImageNet loss, 0.5 CE(teacher -> student) + 0.5
      CE(student -> teacher); the default is the CIFAR loss, the first term.
    always_augment: compute the augmented forwards on every batch, as the
      official CIFAR code does (same results, more compute); the default
      computes them only when c < `ap_threshold` (official ImageNet code,
      and MD: Marsden & Doebler's test-time-adaptation benchmark code).
    augment_strength: see `augment.cotta_augment`.
    per_example_augment: one random transform per image, not per batch.
    augmentations_per_call: augmented copies per teacher forward (`lax.map`
      batch size) to bound memory; None: all in one call.

  Returns:
    An `Adapter` whose `extra` is a `CottaState`.

  References:
    Wang et al., Continual Test-Time Domain Adaptation, CVPR 2022.
  """
  if not 0.0 <= ema_momentum <= 1.0 or not 0.0 <= restore_prob <= 1.0:
    raise ValueError('cotta: ema_momentum and restore_prob must be in [0, 1]')
  if num_augmentations < 1:
    raise ValueError(
      f'cotta: num_augmentations must be >= 1, got {num_augmentations}'
    )

  apply_fn = models.with_mixed_bn(apply_fn, mixed_bn_alpha)

  def init_fn(variables, rng):
    params = variables['params']
    extra = CottaState(teacher=params, source=params)
    return grad_step.init_state(
      variables, rng, adapt=adapt, optimizer=optimizer, who='cotta', extra=extra
    )

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del extra_args
    images, mask = batch['image'], batch.get('mask')
    key_aug, key_restore = jax.random.split(
      jax.random.fold_in(state.rng, state.step)
    )
    teacher, source = state.extra.teacher, state.extra.source

    def forward(params, x):
      return apply_fn(
        params, state.batch_stats, x, use_batch_stats=True, mask=mask
      ).logits

    anchor_prob = jax.nn.softmax(forward(source, images), axis=-1)
    confidence = losses.masked_mean(jnp.max(anchor_prob, axis=-1), mask)

    def augmented_target():
      def one(key):
        return forward(
          teacher,
          augment.cotta_augment(
            key,
            images,
            strength=augment_strength,
            per_example=per_example_augment,
          ),
        )

      keys = jax.random.split(key_aug, num_augmentations)
      if augmentations_per_call is None:
        logits = jax.vmap(one)(keys)  # [N, B, K], one batched forward
      else:
        logits = jax.lax.map(one, keys, batch_size=augmentations_per_call)
      return jnp.mean(logits, axis=0)

    augmented = confidence < ap_threshold
    if always_augment:
      target = jnp.where(
        augmented, augmented_target(), forward(teacher, images)
      )
    else:
      target = jax.lax.cond(
        augmented, augmented_target, lambda: forward(teacher, images)
      )

    parts = grad_step.split(state, adapt, meta)

    def loss_fn(params):
      logits = forward(params, images)
      fixed = jax.lax.stop_gradient(target)
      loss = losses.soft_cross_entropy(logits, fixed)
      if symmetric_loss:
        loss = 0.5 * loss + 0.5 * losses.soft_cross_entropy(fixed, logits)
      return losses.masked_mean(loss, mask)

    step = grad_step.masked_grad_step(
      loss_fn, parts, optimizer, first_order=first_order
    )
    loss, trainable = step.value, step.trainable
    # The EMA runs over all parameters; frozen ones equal the source in both
    # networks, so only the adapted subset is computed (no rounding drift).
    teacher_trainable, teacher_frozen = params_lib.split(
      teacher, adapt(teacher, state.batch_stats)
    )
    teacher_trainable = jax.tree.map(
      lambda t, s: ema_momentum * t + (1.0 - ema_momentum) * s,
      teacher_trainable,
      trainable,
    )
    teacher = params_lib.merge(teacher_trainable, teacher_frozen)
    # Stochastic restore: entry-wise Bernoulli(p) masks, all from one draw.
    source_trainable, _ = params_lib.split(
      source, adapt(source, state.batch_stats)
    )
    leaves, treedef = jax.tree.flatten(trainable)
    u = jax.random.uniform(key_restore, (sum(x.size for x in leaves),))
    restored, offset = [], 0
    for leaf, src in zip(
      leaves, jax.tree.leaves(source_trainable), strict=True
    ):
      hit = u[offset : offset + leaf.size].reshape(leaf.shape) < restore_prob
      restored.append(jnp.where(hit, src, leaf))
      offset += leaf.size
    trainable = jax.tree.unflatten(treedef, restored)
    new_state = grad_step.commit(
      state,
      parts,
      trainable,
      step.opt_state,
      extra=CottaState(teacher=teacher, source=source),
    )
    metrics = {
      'loss': loss,
      'anchor_confidence': confidence,
      'augmented': augmented.astype(jnp.float32),
    }
    return new_state, base.StepOutput(target, metrics)

  return base.adapter(init_fn, step_fn, adapt)
