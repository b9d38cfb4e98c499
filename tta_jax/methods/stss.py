"""STSS and ZERO: choose among a test image's views, no backprop (TLLA)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tta_jax._src import augment, base, losses, params as params_lib
from tta_jax.methods import tpt

VOTES = ('hard', 'soft')


class StssState(NamedTuple):
  """What STSS computes once per run (`AdaptState.extra`)."""

  # Class text features under p* and the R perturbed contexts, [R+1, K, E]
  # (R = 0: ZERO), and the logit scale (models with `apply_fn.class_head`);
  # else empty.
  head: Any
  scale: Any
  # The R perturbed parameter subsets ([R, ...] leaves) of models without
  # a class head, which then run the views through each; else empty.
  perturbed: Any


def perturb(key: jax.Array, tree: Any, n: int, rho: float) -> Any:
  """`n` copies of `tree` at distance `rho`: `p + rho * e / ||e||`.

  `e ~ N(0, I)` over every leaf, its norm global over the whole tree (for
  the prompt context: the flattened `[n_ctx, d]` tensor). Leaves get a
  leading axis of `n`.
  """
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  e = [
    jax.random.normal(k, (n, *x.shape), jnp.float32)
    for k, x in zip(keys, leaves, strict=True)
  ]
  norm = jnp.sqrt(sum(jnp.sum(x.reshape(n, -1) ** 2, axis=1) for x in e))
  out = [
    x[None] + rho * (d / norm.reshape((n,) + (1,) * x.ndim)).astype(x.dtype)
    for x, d in zip(leaves, e, strict=True)
  ]
  return jax.tree.unflatten(treedef, out)


def sharpness_scores(logits: jax.Array, weight: float = 1.0) -> jax.Array:
  """STSS's score of each view, `[V, R+1, K]` logits -> `[V]`.

  `H(p*) + weight * max_r [H(p_r) - H(p*)]`, `H` the prediction entropy
  under the unperturbed context (index 0) and the R perturbed ones: with
  `weight = 1` the worst-case entropy over the perturbations, with no
  perturbation (or `weight = 0`) the entropy alone (confidence selection).
  """
  entropy = losses.softmax_entropy(logits)  # [V, R+1]
  if logits.shape[1] == 1:
    return entropy[:, 0]
  rise = jnp.max(entropy[:, 1:] - entropy[:, :1], axis=1)
  return entropy[:, 0] + weight * rise


def select_flattest(scores: jax.Array, n: int) -> jax.Array:
  """Indices of the `n` lowest scores, lowest first (ties: lower index)."""
  return jax.lax.top_k(-scores, n)[1]


def vote_views(logits: jax.Array, selected: jax.Array, mode: str) -> jax.Array:
  """The prediction of views `selected` of `logits` [V, K], as logits [K].

  `'soft'`: log of their mean probabilities. `'hard'`: a majority vote of
  their argmax classes, ties broken by the summed probabilities, returned
  as `log((votes + mean probabilities) / (s + 1))`, a distribution whose
  argmax is the vote (a voted class's mean probability exceeds zero, so
  one vote more always wins) and whose log-likelihood stays finite.
  """
  logp = jax.nn.log_softmax(logits[selected], axis=-1)  # [s, K]
  s = selected.shape[0]
  log_mean = jax.nn.logsumexp(logp, axis=0) - jnp.log(s)
  if mode == 'soft':
    return log_mean
  votes = jnp.sum(jax.nn.one_hot(jnp.argmax(logp, -1), logits.shape[-1]), 0)
  log_votes = jnp.where(votes > 0, jnp.log(jnp.maximum(votes, 1.0)), -jnp.inf)
  return jnp.logaddexp(log_votes, log_mean) - jnp.log(s + 1.0)


def stss(
  apply_fn,
  *,
  n_views: int = 64,
  n_selected: int = 6,
  n_perturbations: int = 16,
  rho: float = 0.5,
  sharpness_weight: float = 1.0,
  vote: str = 'hard',
  perturb_mask: params_lib.MaskFn = tpt.PROMPT_CONTEXT,
  perturbation_seed: int = 0,
  crop_scale: tuple[float, float] = (0.08, 1.0),
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
  augmix: bool = False,
  samples_per_call: int | None = None,
) -> base.Adapter:
  """STSS (TLLA's test stage): vote over a test image's flattest views.

  Once per run, `init` draws R perturbed prompt contexts `p_r = p* + rho *
  e_r / ||e_r||` (`perturb`, from `perturbation_seed`) and encodes the
  class prompts under p* and each p_r (`apply_fn.class_head`): a cache of
  `[R+1, K, E]` text features. Per test image, its `n_views` views (TPT's:
  `augment.tpt_views`, keyed by the image's content as TPT's are) go once
  through the image tower; every view is scored by its entropy under p*
  plus `sharpness_weight` times the worst-case entropy increase over the
  perturbations (`sharpness_scores`); the `n_selected` lowest-scoring
  views vote with their predictions under p* (`vote_views`). Nothing is
  trained, no gradient is taken, and no parameter changes; the images of a
  batch are one vmapped program. `rho = 0` (or no perturbation) reduces it
  to ZERO (`zero`): the vote of the most confident views.

  Paper defaults (TLLA / FGA, Li et al. 2025): 64 views with TPT's
  augmentation, `rho` 0.5 in CLIP's token-embedding units (a model with
  other embedding norms needs its own, chosen on source data), lambda 1.
  The number of perturbations R and of kept views s are not in the paper's
  main text: R = 16 and s = 6 (TPT's 10 % of 64) are defaults to select on
  held-out source data.

  A model without a class head (any `ApplyFn`) is perturbed in the
  parameters `perturb_mask` selects, and its views go through the model
  once per perturbation: the same scores, R + 1 times the cost.

  Args:
    apply_fn: the model's `ApplyFn`; with `apply_fn.class_head(params) ->
      (text_features [K, E], scale)` (dual encoders, `models.vlm`), the
      logits are `scale * features['pre_logits'] @ text_features.T`.
    n_views: views per image, the image itself included (64).
    n_selected: views kept, s (6).
    n_perturbations: perturbed contexts, R (16); 0 scores by entropy.
    rho: the perturbations' radius rho' over the whole context tensor.
    sharpness_weight: lambda, the weight of the worst-case increase (1).
    vote: `'hard'` (majority, ties by summed probabilities) or
      `'soft'` (mean probabilities).
    perturb_mask: the perturbed parameters (the context `prompt/ctx`).
    perturbation_seed: the key the perturbations are drawn from.
    crop_scale, crop_ratio, flip, augmix: the views (see `tpt.tpt`).
    samples_per_call: images per vmapped call (`lax.map` batch size) to
      bound memory; None: the whole batch at once.

  Returns:
    An `Adapter` whose parameters never change.

  References:
    Li et al., Test-time Loss Landscape Adaptation for Zero-Shot
    Generalization in Vision-Language Models (TLLA, arXiv 2501.18864 v1;
    v2: "FGA"). Farina et al., Frustratingly Easy Test-Time Adaptation of
    Vision-Language Models, NeurIPS 2024 (ZERO).
  """
  if not 1 <= n_selected <= n_views:
    raise ValueError(
      f'stss: need 1 <= n_selected <= n_views, got {n_selected}, {n_views}'
    )
  if n_perturbations < 0 or rho < 0 or sharpness_weight < 0:
    raise ValueError(
      'stss: n_perturbations, rho and sharpness_weight must be >= 0, got '
      f'{n_perturbations}, {rho}, {sharpness_weight}'
    )
  if vote not in VOTES:
    raise ValueError(f'stss: vote must be one of {VOTES}, got {vote!r}')
  head_fn = getattr(apply_fn, 'class_head', None)

  def init_fn(variables, rng):
    params = variables['params']
    perturbed = ()
    if n_perturbations:
      ctx, frozen = params_lib.split_by(
        perturb_mask, params, variables['batch_stats'], who='stss'
      )
      key = jax.random.key(perturbation_seed)
      perturbed = perturb(key, ctx, n_perturbations, rho)
    if head_fn is None:
      extra = StssState((), (), perturbed)
      return base.init_state(variables, rng, extra=extra)
    # The class text features under p* (and every p_r), encoded once.
    text, scale = head_fn(params)
    heads = [text[None]]
    if n_perturbations:

      def encode(c):
        return head_fn(params_lib.merge(c, frozen))[0]

      heads.append(jax.lax.map(encode, perturbed))
    head = jnp.concatenate(heads, axis=0)
    return base.init_state(variables, rng, extra=StssState(head, scale, ()))

  def view_logits(state, views):
    """`[V, R+1, K]`: the views' logits under p* and every p_r."""
    params, stats, ex = state.params, state.batch_stats, state.extra
    out = apply_fn(params, stats, views)
    if head_fn is not None:
      feats = out.features['pre_logits']
      return ex.scale * jnp.einsum('ve,rke->vrk', feats, ex.head)
    if not n_perturbations:
      return out.logits[:, None]
    _, frozen = params_lib.split(params, perturb_mask(params, stats))
    others = jax.vmap(
      lambda c: apply_fn(params_lib.merge(c, frozen), stats, views).logits
    )(ex.perturbed)
    return jnp.concatenate([out.logits[:, None], others.swapaxes(0, 1)], 1)

  def step_fn(state, batch, *, meta=None, **extra_args):
    del meta, extra_args
    images = batch['image']
    if images.ndim != 4:
      raise ValueError(f'stss: images must be [B, H, W, C], got {images.shape}')

    def one(image):
      views = augment.tpt_views(
        tpt.image_key(state.rng, image),
        image,
        n_views=n_views,
        scale=tuple(crop_scale),
        ratio=tuple(crop_ratio),
        flip=flip,
        augmix_views=augmix,
      )
      logits = view_logits(state, views)
      scores = sharpness_scores(logits, sharpness_weight)
      selected = select_flattest(scores, n_selected)
      return vote_views(logits[:, 0], selected, vote), jnp.mean(
        scores[selected]
      )

    logits, score = tpt.map_images(one, images, samples_per_call)
    metrics = {'score': losses.masked_mean(score, batch.get('mask'))}
    return state._replace(step=state.step + 1), base.StepOutput(logits, metrics)

  return base.adapter(init_fn, step_fn, params_lib.no_params)


def zero(
  apply_fn,
  *,
  n_views: int = 64,
  n_selected: int = 6,
  vote: str = 'hard',
  crop_scale: tuple[float, float] = (0.08, 1.0),
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
  augmix: bool = False,
  samples_per_call: int | None = None,
) -> base.Adapter:
  """ZERO (Farina et al., NeurIPS 2024): the hard vote of the `n_selected`
  most confident (lowest-entropy) of TPT's views, no backprop; STSS with
  no perturbation (`rho' = 0`). Defaults: 64 views, the top 10 % (6)."""
  return stss(
    apply_fn,
    n_views=n_views,
    n_selected=n_selected,
    n_perturbations=0,
    rho=0.0,
    vote=vote,
    crop_scale=crop_scale,
    crop_ratio=crop_ratio,
    flip=flip,
    augmix=augmix,
    samples_per_call=samples_per_call,
  )
