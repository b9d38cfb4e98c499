"""Tent: fully test-time adaptation by entropy minimisation."""

import optax

from tta_jax import models
from tta_jax._src import base, grad_step, losses, params as params_lib


def tent(
  apply_fn,
  optimizer: optax.GradientTransformation,
  *,
  adapt: params_lib.MaskFn = params_lib.bn_affine,
  steps: int = 1,
  mixed_bn_alpha: float | None = None,
) -> base.Adapter:
  """Tent (Wang et al., ICLR 2021): minimise prediction entropy on BN affine.

  Every BN layer normalises with the test batch's statistics (train-mode BN,
  no running statistics kept); the selected parameters take `steps`
  optimizer steps on the batch-mean softmax entropy; the scored logits are
  those of the last forward, computed before its update (as in `tent.py`).
  Episodic resets are the runner's job (keep `state0`).

  Args:
    apply_fn: the model's `ApplyFn`.
    optimizer: the paper's defaults are `optax.adam(1e-3)` (CIFAR, batch 200)
      and `optax.sgd(2.5e-4, momentum=0.9)` (ImageNet, batch 64). Build it
      with `optax.inject_hyperparams` to meta-learn its learning rate through
      `meta={'log_learning_rate': ...}`.
    adapt: mask of the adapted parameters (BN scale and bias).
    steps: optimizer steps per batch.
    mixed_bn_alpha: None normalises with the test batch; a weight in [0, 1]
      on the source statistics uses Meta-TTT's mixed BN instead.

  Returns:
    An `Adapter`.

  References:
    Wang et al., Tent: Fully Test-Time Adaptation by Entropy Minimization,
    ICLR 2021.
  """
  if steps < 1:
    raise ValueError(f'tent: steps must be >= 1, got {steps}')
  apply_fn = models.with_mixed_bn(apply_fn, mixed_bn_alpha)

  def init_fn(variables, rng):
    return grad_step.init_state(
      variables, rng, adapt=adapt, optimizer=optimizer, who='tent'
    )

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del extra_args
    parts = grad_step.split(state, adapt, meta)

    def loss_fn(params):
      out = grad_step.batch_forward(apply_fn, params, state, batch)
      entropy = losses.softmax_entropy(out.logits)
      return losses.masked_mean(entropy, batch.get('mask')), out

    trainable, opt_state = parts.trainable, parts.opt_state
    for _ in range(steps):
      (loss, out), grads = grad_step.value_and_grad(
        loss_fn, parts, has_aux=True, first_order=first_order
      )(trainable)
      trainable, opt_state = grad_step.update(
        optimizer, grads, opt_state, trainable
      )
    new_state = grad_step.commit(state, parts, trainable, opt_state)
    return new_state, base.StepOutput(out.logits, {'entropy': loss})

  return base.adapter(init_fn, step_fn, adapt)
