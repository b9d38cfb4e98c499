"""MEMO: test-time robustness via adaptation and augmentation."""

import functools

import jax
import jax.numpy as jnp
import optax

from tta_jax._src import augment, base, grad_step, losses, params as params_lib
from tta_jax.models.vision import layers


def _sample_fn(
  apply_fn,
  optimizer,
  *,
  adapt,
  num_augmentations,
  source_weight,
  steps,
  preaugment,
  severity,
  first_order=False,
):
  """MEMO on one test point: `fn(state, opt_state, image, key) -> (z, H)`.

  Adapts a private copy of the parameters on `num_augmentations` views of
  `image` [H, W, C] and returns the adapted model's logits [K] on `image`
  itself, with the marginal entropy of the first step.
  """
  # PyTorch's BN-alpha / MEMO's prior BN mix the source statistics with the
  # batch's *running* statistics, whose variance is the unbiased one.
  bn_mode = layers.BNMode(source_weight=source_weight, ddof=1)
  view_fn = functools.partial(
    augment.memo_augment, preaugment=preaugment, severity=severity
  )

  def fn(state, opt_state, image, key):
    parts = grad_step.split(state, adapt)
    trainable = parts.trainable

    def loss_fn(params, views):
      logits = apply_fn(params, state.batch_stats, views, bn_mode=bn_mode)
      return losses.marginal_entropy(logits.logits, axis=0)

    grad_fn = grad_step.value_and_grad(loss_fn, parts, first_order=first_order)
    first_loss = None
    for s in range(steps):
      keys = jax.random.split(jax.random.fold_in(key, s), num_augmentations)
      views = jax.vmap(view_fn, (0, None))(keys, image)  # [N, H, W, C]
      loss, grads = grad_fn(trainable, views)
      first_loss = loss if first_loss is None else first_loss
      trainable, opt_state = grad_step.update(
        optimizer, grads, opt_state, trainable
      )
    logits = apply_fn(
      parts.merge(trainable),
      state.batch_stats,
      image[None],
      bn_mode=bn_mode,
    ).logits[0]
    return logits, first_loss

  return fn


def memo(
  apply_fn,
  optimizer: optax.GradientTransformation,
  *,
  adapt: params_lib.MaskFn = params_lib.all_params,
  num_augmentations: int = 32,
  source_weight: float = 0.9,
  steps: int = 1,
  preaugment: str = 'crop',
  severity: float = 1.0,
  samples_per_call: int | None = None,
) -> base.Adapter:
  """MEMO (Zhang et al., NeurIPS 2022): marginal entropy over augmentations.

  Each test point is adapted on its own: `num_augmentations` AugMix views
  (`augment.memo_augment`) give the marginal entropy H(mean_n softmax(z_n)),
  the parameters take `steps` optimizer steps on it, and the adapted model
  predicts the original image. The method is episodic: every point starts
  from the source parameters and optimizer state, so `state` keeps them and
  only `state.step` advances. The samples of a batch are `vmap`ped, each
  with its own parameter and optimizer copy, so a batch of B points is one
  compiled call whose result equals running each point alone.

  BN layers use BN-alpha (Schneider et al. 2020), the weighted mix of the
  source statistics and those of the current forward (the views while
  adapting, the single test image when predicting), as MD (Marsden &
  Doebler's test-time-adaptation benchmark code) runs MEMO and as
  MEMO's own ImageNet code does with its "prior" BN; the batch variance is
  the unbiased one, as PyTorch's running variance is. (MEMO's CIFAR models
  use GroupNorm, where this choice does not arise.)

  Args:
    apply_fn: the model's `ApplyFn`.
    optimizer: the paper's defaults are `optax.sgd(0.005)` (CIFAR-10) and
      `optax.sgd(2.5e-4)` (ImageNet, ResNet-50).
    adapt: mask of the adapted parameters (MEMO updates all of them).
    num_augmentations: views per point (CIFAR: 32; the paper's ImageNet
      runs: 64).
    source_weight: weight of the source BN statistics: 0.9 is MD's BN-alpha
      with alpha = 0.1; MEMO's ImageNet code uses prior strength 16, i.e.
      16/17; 1.0 gives the source statistics alone.
    steps: optimizer steps per point.
    preaugment: `'crop'` (CIFAR) or `'resized_crop'` (ImageNet); see
      `augment.memo_augment`.
    severity: AugMix op level (MEMO's code: 1).
    samples_per_call: points adapted per vmapped call (`lax.map` batch size)
      to bound memory; None: the whole batch at once. Each point holds its
      own gradient and parameter copy and a forward-backward over its views,
      so at ImageNet scale (ResNet-50, 64 views) use a few points per call.

  Returns:
    An `Adapter`.

  References:
    Zhang, Levine and Finn, MEMO: Test Time Robustness via Adaptation and
    Augmentation, NeurIPS 2022.
  """
  if steps < 1 or num_augmentations < 1:
    raise ValueError('memo: steps and num_augmentations must be >= 1')
  if not 0.0 <= source_weight <= 1.0:
    raise ValueError(f'memo: source_weight must be in [0, 1]: {source_weight}')
  if preaugment not in augment.PREAUGMENTS:
    raise ValueError(
      f'memo: unknown preaugment {preaugment!r}; valid: {augment.PREAUGMENTS}'
    )
  hyper = dict(
    adapt=adapt,
    num_augmentations=num_augmentations,
    source_weight=source_weight,
    steps=steps,
    preaugment=preaugment,
    severity=severity,
  )

  def init_fn(variables, rng):
    return grad_step.init_state(
      variables, rng, adapt=adapt, optimizer=optimizer, who='memo'
    )

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del extra_args
    images = batch['image']
    opt_state = grad_step.inject_meta_hyperparams(state.opt_state, meta)
    one = _sample_fn(apply_fn, optimizer, first_order=first_order, **hyper)
    key = jax.random.fold_in(state.rng, state.step)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(
      key, jnp.arange(images.shape[0])
    )
    per_sample = lambda xk: one(state, opt_state, *xk)
    if samples_per_call is None:
      logits, loss = jax.vmap(per_sample)((images, keys))
    else:
      logits, loss = jax.lax.map(
        per_sample, (images, keys), batch_size=samples_per_call
      )
    metrics = {'loss': losses.masked_mean(loss, batch.get('mask'))}
    return state._replace(step=state.step + 1), base.StepOutput(logits, metrics)

  # Episodic: the adapted copies live only inside `step`; the state keeps
  # the source parameters.
  return base.adapter(init_fn, step_fn, params_lib.no_params)
