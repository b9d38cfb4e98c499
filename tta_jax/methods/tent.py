"""Tent: fully test-time adaptation by entropy minimisation."""

import jax.numpy as jnp
import optax

from tta_jax._src import base, losses, meta as meta_lib, params as params_lib


def tent(
  apply_fn,
  optimizer: optax.GradientTransformation,
  *,
  adapt: params_lib.MaskFn = params_lib.bn_affine,
  steps: int = 1,
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

  Returns:
    An `Adapter`.

  References:
    Wang et al., Tent: Fully Test-Time Adaptation by Entropy Minimization,
    ICLR 2021.
  """
  if steps < 1:
    raise ValueError(f'tent: steps must be >= 1, got {steps}')

  def init_fn(variables, rng):
    trainable, _ = params_lib.split_by(
      adapt, variables['params'], variables['batch_stats'], who='tent'
    )
    return base.AdaptState(
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      opt_state=optimizer.init(trainable),
      rng=rng,
      step=jnp.zeros([], jnp.int32),
    )

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del extra_args
    mask = batch.get('mask')
    trainable, frozen = params_lib.split(
      state.params, adapt(state.params, state.batch_stats)
    )
    opt_state = meta_lib.inject_meta_hyperparams(state.opt_state, meta)

    def loss_fn(trainable):
      out = apply_fn(
        params_lib.merge(trainable, frozen),
        state.batch_stats,
        batch['image'],
        use_batch_stats=True,
        mask=mask,
      )
      return losses.masked_mean(losses.softmax_entropy(out.logits), mask), out

    grad_fn = meta_lib.inner_value_and_grad(
      loss_fn, has_aux=True, first_order=first_order
    )
    for _ in range(steps):
      (loss, out), grads = grad_fn(trainable)
      updates, opt_state = optimizer.update(grads, opt_state, trainable)
      trainable = optax.apply_updates(trainable, updates)
    new_state = state._replace(
      params=params_lib.merge(trainable, frozen),
      opt_state=opt_state,
      step=state.step + 1,
    )
    return new_state, base.StepOutput(out.logits, {'entropy': loss})

  return base.Adapter(init_fn, step_fn, adapt)
