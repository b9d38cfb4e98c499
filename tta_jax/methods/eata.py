"""EATA and ETA: efficient, anti-forgetting entropy minimisation."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tta_jax import models
from tta_jax._src import base, grad_step, losses, params as params_lib


class EataState(NamedTuple):
  probs: jax.Array  # [K] moving average m of the selected predictions
  initialised: jax.Array  # bool scalar: m has been set by a selection
  fisher: Any  # diagonal Fisher F over the adapted leaves ({} for ETA)
  anchor: Any  # theta*: the adapted leaves when F was computed ({} for ETA)


def eata(
  apply_fn,
  optimizer: optax.GradientTransformation,
  *,
  adapt: params_lib.MaskFn = params_lib.bn_affine,
  margin_e0: float = 0.4,
  d_margin: float = 0.05,
  fisher_alpha: float = 2000.0,
  source_images=None,
  fisher_batch_size: int = 64,
  num_classes: int | None = None,
  mixed_bn_alpha: float | None = None,
) -> base.Adapter:
  """EATA (Niu et al., ICML 2022): filtered, reweighted entropy minimisation.

  Each step normalises with the test batch's statistics and keeps the
  reliable samples (entropy E < E0 = `margin_e0` ln K) that are not
  redundant (|cos(m, p)| < `d_margin`, m a moving average of the selected
  predictions). Until m exists, as in `eata.py`, every reliable sample is
  selected and m starts as their mean; afterwards m <- 0.9 m + 0.1 mean of
  the selected p. The loss is the mean over the selected samples of
  exp(E0 - E) E, with the weight detached, plus `fisher_alpha` sum F
  (theta - theta*)^2. The optimizer steps (and m moves) only if a sample
  survives both filters. As in the official "version 1", the gradient is
  taken through the whole batch with the loss masked (no compute is saved).
  Padding rows (`batch['mask']`) are never selected. A reset (the runner's
  `state0`) also clears m, as in MD (Marsden & Doebler's
  test-time-adaptation benchmark code).

  F is the empirical diagonal Fisher of the adapted parameters on clean
  `source_images`, computed in `init` as in EATA's `main.py`: batches of
  `fisher_batch_size` with train-mode BN, argmax pseudo-labels, the
  batch-mean cross-entropy, squared gradients summed over batches and
  divided by the number of batches (not TTAB's unnormalised variant).

  Args:
    apply_fn: the model's `ApplyFn`.
    optimizer: the paper's default is `optax.sgd(2.5e-4, momentum=0.9)`
      (ImageNet, batch 64).
    adapt: mask of the adapted parameters (BN scale and bias).
    margin_e0: E0 as a fraction of ln K (K read from the logits).
    d_margin: epsilon of the redundancy filter: 0.05 on ImageNet; MD's CIFAR
      configs use 0.4.
    fisher_alpha: beta of the anti-forgetting term (2000 on ImageNet; MD's
      CIFAR configs use 1). 0 is ETA: no Fisher, `source_images` unused.
    source_images: `[N, H, W, C]` clean in-distribution images for F (the
      paper uses N = 2000); required when `fisher_alpha > 0`.
    fisher_batch_size: batch size of the Fisher pass (EATA's 64).
    num_classes: K, the size of m; None reads `apply_fn.num_classes` (a
      `models.wrap` model) or the classifier `head` (`kernel` [D, K]).
      Give it when `apply_fn` restricts the logits to a subset of the
      head's classes (ImageNet-R/A).
    mixed_bn_alpha: None normalises with the test batch; a weight in [0, 1]
      on the source statistics uses Meta-TTT's mixed BN instead.

  Returns:
    An `Adapter`; metrics `loss`, `n_reliable`, `n_selected`.

  References:
    Niu et al., Efficient Test-Time Model Adaptation without Forgetting,
    ICML 2022.
  """
  if fisher_alpha < 0:
    raise ValueError(f'eata: fisher_alpha must be >= 0, got {fisher_alpha}')
  use_fisher = fisher_alpha > 0
  # A wrapped model (`models.wrap`) knows K from its logits.
  num_classes = num_classes or getattr(apply_fn, 'num_classes', None)
  apply_fn = models.with_mixed_bn(apply_fn, mixed_bn_alpha)
  if use_fisher:
    if source_images is None:
      raise ValueError(
        'eata: fisher_alpha > 0 needs `source_images` (clean in-distribution '
        'images for the Fisher); use eta(...) or fisher_alpha=0 for ETA.'
      )
    source_images = np.asarray(source_images, np.float32)
    if source_images.ndim != 4 or not len(source_images):
      raise ValueError(
        'eata: source_images must be a non-empty [N, H, W, C] array, got '
        f'shape {source_images.shape}'
      )
    if fisher_batch_size < 1:
      raise ValueError('eata: fisher_batch_size must be >= 1')

  @jax.jit
  def squared_grad(trainable, frozen, batch_stats, images, mask):
    def xent(trainable):
      out = apply_fn(
        params_lib.merge(trainable, frozen),
        batch_stats,
        images,
        use_batch_stats=True,
        mask=mask,
      )
      labels = jnp.argmax(out.logits, axis=-1)
      return losses.masked_mean(losses.cross_entropy(out.logits, labels), mask)

    return jax.tree.map(jnp.square, jax.grad(xent)(trainable))

  def fisher_of(trainable, frozen, batch_stats):
    # A Python loop over host batches: each batch goes to the device on its
    # own, and the loop still traces under an outer `jit` (small N only).
    n = len(source_images)
    size = min(fisher_batch_size, n)
    num_batches = -(-n // size)
    total = jax.tree.map(jnp.zeros_like, trainable)
    for i in range(num_batches):
      images = source_images[i * size : (i + 1) * size]
      mask = np.arange(size) < len(images)
      images = np.pad(images, [(0, size - len(images))] + [(0, 0)] * 3)
      g2 = squared_grad(trainable, frozen, batch_stats, images, mask)
      total = jax.tree.map(jnp.add, total, g2)
    return jax.tree.map(lambda t: t / num_batches, total)

  def init_fn(variables, rng):
    state = grad_step.init_state(
      variables, rng, adapt=adapt, optimizer=optimizer, who='eata'
    )
    parts = grad_step.split(state, adapt)
    fisher = (
      fisher_of(parts.trainable, parts.frozen, state.batch_stats)
      if use_fisher
      else {}
    )
    k = num_classes or _num_classes(state.params)
    return state._replace(
      extra=EataState(
        probs=jnp.zeros([k], jnp.float32),
        initialised=jnp.zeros([], bool),
        fisher=fisher,
        anchor=parts.trainable if use_fisher else {},
      )
    )

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del extra_args
    valid = losses.batch_mask(batch)
    parts = grad_step.split(state, adapt, meta)
    ex = state.extra

    def loss_fn(params):
      out = grad_step.batch_forward(apply_fn, params, state, batch)
      if out.logits.shape[-1] != ex.probs.shape[-1]:
        raise ValueError(
          f'eata: the logits have {out.logits.shape[-1]} classes but m has '
          f'{ex.probs.shape[-1]}: pass num_classes=K to eata/eta.'
        )
      e0 = losses.entropy_margin(margin_e0, out.logits.shape[-1])
      entropy = losses.softmax_entropy(out.logits)  # [B]
      probs = jax.lax.stop_gradient(jax.nn.softmax(out.logits))  # [B, K]
      reliable = valid & (entropy < e0)
      norms = jnp.linalg.norm(probs, axis=-1) * jnp.linalg.norm(ex.probs)
      cos = probs @ ex.probs / jnp.maximum(norms, 1e-8)  # [B]
      novel = jnp.abs(cos) < d_margin
      selected = reliable & (novel | ~ex.initialised)
      weight = 1.0 / jnp.exp(jax.lax.stop_gradient(entropy) - e0)
      loss = losses.masked_mean(weight * entropy, selected)
      if use_fisher:
        trainable = params_lib.split(params, adapt(params, state.batch_stats))
        loss += fisher_alpha * sum(
          jnp.sum(f * jnp.square(p - a))
          for f, p, a in zip(
            jax.tree.leaves(ex.fisher),
            jax.tree.leaves(trainable[0]),
            jax.tree.leaves(ex.anchor),
            strict=True,
          )
        )
      return loss, (out.logits, probs, reliable, selected)

    step = grad_step.masked_grad_step(
      loss_fn, parts, optimizer, has_aux=True, first_order=first_order
    )
    loss, (logits, probs, reliable, selected) = step.value
    n_selected = jnp.sum(selected)
    update = n_selected > 0
    mean_p = losses.masked_mean(probs, selected[:, None], axis=0)  # [K]
    new_probs = jnp.where(ex.initialised, 0.9 * ex.probs + 0.1 * mean_p, mean_p)
    new_state = grad_step.commit(
      state,
      parts,
      step.trainable,
      step.opt_state,
      keep=update,
      extra=ex._replace(
        probs=jnp.where(update, new_probs, ex.probs),
        initialised=ex.initialised | update,
      ),
    )
    metrics = {
      'loss': loss,
      'n_reliable': jnp.sum(reliable).astype(jnp.float32),
      'n_selected': n_selected.astype(jnp.float32),
    }
    return new_state, base.StepOutput(logits, metrics)

  return base.adapter(init_fn, step_fn, adapt)


def eta(
  apply_fn,
  optimizer: optax.GradientTransformation,
  *,
  adapt: params_lib.MaskFn = params_lib.bn_affine,
  margin_e0: float = 0.4,
  d_margin: float = 0.05,
  num_classes: int | None = None,
  mixed_bn_alpha: float | None = None,
) -> base.Adapter:
  """ETA (Niu et al., ICML 2022): EATA without the Fisher term.

  `eata(apply_fn, optimizer, fisher_alpha=0.0, ...)`; see `eata` for the
  arguments. Needs no source data.
  """
  return eata(
    apply_fn,
    optimizer,
    adapt=adapt,
    margin_e0=margin_e0,
    d_margin=d_margin,
    fisher_alpha=0.0,
    num_classes=num_classes,
    mixed_bn_alpha=mixed_bn_alpha,
  )


def _num_classes(params) -> int:
  """K from the classifier `head` of the model contract (for m's shape)."""
  try:
    return int(params['head']['kernel'].shape[-1])
  except (KeyError, TypeError) as e:
    raise ValueError(
      'eata: pass num_classes, or give the model its classifier as the '
      f'top-level module `head` with a `kernel` [D, K]: {e!r}'
    ) from None
