"""TPT: test-time prompt tuning of a vision-language model, per image."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax._src import augment, base, grad_step, losses, params as params_lib

# The CoOp context of a `VLMClassifier` (`tta_jax.models.vlm`).
PROMPT_CONTEXT = params_lib.by_regex('^prompt/ctx$')


def select_confident(logits: jax.Array, ratio: float) -> jax.Array:
  """Indices of the `int(N * ratio)` lowest-entropy rows of `logits` [N, K].

  TPT's confidence selection (`select_confident_samples`): the floor of
  `N * ratio` (6 of 64 at 0.1), at least one, lowest entropy first.
  """
  k = max(1, int(logits.shape[0] * ratio))
  entropy = losses.softmax_entropy(jax.lax.stop_gradient(logits))
  return jax.lax.top_k(-entropy, k)[1]


def image_key(rng: jax.Array, image: jax.Array) -> jax.Array:
  """`fold_in(rng, hash(image))`: a key from the image's content, so its
  views depend on neither the stream's order nor its batching."""
  bits = jax.lax.bitcast_convert_type(image.astype(jnp.float32), jnp.uint32)
  bits = bits.ravel()
  weights = 2 * jnp.arange(bits.size, dtype=jnp.uint32) + 1
  return jax.random.fold_in(rng, jnp.sum(bits * weights, dtype=jnp.uint32))


class Episode(NamedTuple):
  """One image's episode (for tests and analyses)."""

  logits: jax.Array  # [K] the adapted model's logits on the original view
  trainable: base.Params  # the adapted parameters after the last step
  opt_state: optax.OptState  # the optimizer state after the last step
  selected: jax.Array  # [k] the views selected at step 0
  losses: jax.Array  # [steps] marginal entropy before each step


def map_images(fn, images: jax.Array, samples_per_call: int | None):
  """`fn` on every image of a batch: one vmapped program, or (with
  `samples_per_call`) a `lax.map` in chunks of that many to bound memory."""
  if samples_per_call is None:
    return jax.vmap(fn)(images)
  return jax.lax.map(fn, images, batch_size=samples_per_call)


def episode(
  apply_fn,
  optimizer: optax.GradientTransformation,
  params,
  batch_stats,
  opt_state,
  views: jax.Array,
  *,
  adapt: params_lib.MaskFn = PROMPT_CONTEXT,
  selection_ratio: float = 0.1,
  steps: int = 1,
) -> Episode:
  """TPT on one image's views `[N, H, W, C]` (view 0 the original).

  Step 0 selects the `int(N * selection_ratio)` most confident views; every
  step takes one optimizer step on the marginal entropy of the selected
  views (the same indices at every step), gradients flowing to the `adapt`
  parameters only; the adapted model then predicts view 0.
  """
  trainable, frozen = params_lib.split(params, adapt(params, batch_stats))

  def loss_fn(trainable, selected):
    logits = apply_fn(
      params_lib.merge(trainable, frozen), batch_stats, views
    ).logits
    if selected is None:
      selected = select_confident(logits, selection_ratio)
    return losses.marginal_entropy(logits[selected], axis=0), selected

  selected, history = None, []
  for _ in range(steps):
    (loss, selected), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      trainable, selected
    )
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    history.append(loss)
  if selected is None:  # no step: report what step 0 would select
    _, selected = loss_fn(trainable, None)
  logits = apply_fn(
    params_lib.merge(trainable, frozen), batch_stats, views[:1]
  ).logits[0]
  return Episode(
    logits,
    trainable,
    opt_state,
    selected,
    jnp.stack(history) if history else jnp.zeros((0,)),
  )


def tpt(
  apply_fn,
  optimizer: optax.GradientTransformation,
  *,
  adapt: params_lib.MaskFn = PROMPT_CONTEXT,
  n_views: int = 64,
  selection_ratio: float = 0.1,
  steps: int = 1,
  crop_scale: tuple[float, float] = (0.08, 1.0),
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
  augmix: bool = False,
  samples_per_call: int | None = None,
) -> base.Adapter:
  """TPT (Shu et al., NeurIPS 2022): tune the prompt on each test image.

  Every test image is its own episode, starting from the initial context
  and optimizer state: its `n_views` views (`augment.tpt_views`: the image
  itself, then random resized crops) go through the model; the
  `int(n_views * selection_ratio)` lowest-entropy views are kept (chosen
  once, at step 0); the context takes `steps` optimizer steps on their
  marginal entropy H(mean softmax), computed in log space; and the tuned
  model predicts the original view. Nothing carries over to the next image
  (the state keeps the initial context; the reset is implicit). The
  episodes of a batch are `vmap`ped, each with its own context and
  optimizer state, and equal the sequential loop. Views are keyed by the
  image's content (`image_key`), so results are independent of the order
  and batching of the stream.

  Paper defaults: 64 views, 10 % selected (6), one step of AdamW with
  lr 5e-3, betas (0.9, 0.999), eps 1e-8 and weight decay 0.01 (torch's
  AdamW; optax's default decay is 1e-4):
  `optax.adamw(5e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)`, whose
  decoupled decay acts on the pre-step context as torch's does. Crops use
  torchvision's scale (0.08, 1) and flips; AugMix only on TPT's
  fine-grained datasets. Deviations for 28-32 px digits (the small
  testbed's config): no horizontal flips (a flipped digit is another
  glyph) and a gentler crop scale (0.9, 1), chosen on held-out validation
  corruptions, as small crops of a small image cut the digit's strokes.

  Args:
    apply_fn: the model's `ApplyFn` (a `VLMClassifier`'s; any model whose
      `adapt` parameters exist works).
    optimizer: the per-image optimizer (see above).
    adapt: mask of the tuned parameters (the context `prompt/ctx`).
    n_views: views per image, the original included (64).
    selection_ratio: fraction of views kept by confidence selection (0.1).
    steps: optimizer steps per image (1); 0 gives the initial model's
      prediction on the original view (zero-shot).
    crop_scale, crop_ratio: the random resized crop's ranges.
    flip: random horizontal flips of the views.
    augmix: AugMix on the views.
    samples_per_call: images per vmapped call (`lax.map` batch size) to
      bound memory; None: the whole batch at once.

  Returns:
    An `Adapter` whose state never changes but for its step counter.

  References:
    Shu et al., Test-Time Prompt Tuning for Zero-Shot Generalization in
    Vision-Language Models, NeurIPS 2022 (`azshue/TPT`).
  """
  if steps < 0 or n_views < 1:
    raise ValueError(f'tpt: steps >= 0 and n_views >= 1: {steps}, {n_views}')
  if not 0.0 < selection_ratio <= 1.0:
    raise ValueError(f'tpt: selection_ratio in (0, 1]: {selection_ratio}')

  def views_of(key, image):
    return augment.tpt_views(
      key,
      image,
      n_views=n_views,
      scale=tuple(crop_scale),
      ratio=tuple(crop_ratio),
      flip=flip,
      augmix_views=augmix,
    )

  def init_fn(variables, rng):
    return grad_step.init_state(
      variables, rng, adapt=adapt, optimizer=optimizer, who='tpt'
    )

  def step_fn(state, batch, *, meta=None, **extra_args):
    del meta, extra_args
    images = batch['image']
    if images.ndim != 4:
      raise ValueError(f'tpt: images must be [B, H, W, C], got {images.shape}')

    def one(image):
      views = views_of(image_key(state.rng, image), image)
      ep = episode(
        apply_fn,
        optimizer,
        state.params,
        state.batch_stats,
        state.opt_state,
        views,
        adapt=adapt,
        selection_ratio=selection_ratio,
        steps=steps,
      )
      first = ep.losses[0] if steps else jnp.zeros([])
      return ep.logits, first

    logits, loss = map_images(one, images, samples_per_call)
    metrics = {'loss': losses.masked_mean(loss, batch.get('mask'))}
    return state._replace(step=state.step + 1), base.StepOutput(logits, metrics)

  # Episodic: the tuned contexts live only inside `step`.
  return base.adapter(init_fn, step_fn, params_lib.no_params)
