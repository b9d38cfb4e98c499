"""Test-time batch normalisation (BN adaptation).

Normalise with the test batch's statistics instead of the source ones
(Nado et al. 2020, "prediction-time BN"), optionally mixed with the source
statistics as a prior (Schneider et al. 2020: weight N/(N+n) on the source
for prior strength N and batch size n; or a fixed weight, the BN-alpha of
MD, Marsden & Doebler's test-time-adaptation benchmark code), or
tracked by an exponential moving average across the stream (BN-EMA).
"""

import jax
import jax.numpy as jnp

from tta_jax._src import base, losses, params as params_lib
from tta_jax.models.vision import layers


def norm(
  apply_fn,
  *,
  source_weight: float = 0.0,
  prior_strength: float | None = None,
  momentum: float | None = None,
) -> base.Adapter:
  """BN adaptation: no parameter changes, only normalisation statistics.

  Args:
    apply_fn: the model's `ApplyFn`.
    source_weight: fixed weight of the source statistics in every BN layer:
      0 (default) uses the test batch alone; MD's BN-alpha with alpha=0.1 is
      `source_weight=0.9`.
    prior_strength: Schneider et al.'s N: the source weight becomes
      N / (N + n) with n the number of (unpadded) examples in the batch.
      Excludes `source_weight`.
    momentum: BN-EMA: keep running statistics across the stream,
      `s <- (1 - momentum) s + momentum * s_batch`, where `s_batch` comes from
      a train-mode forward, then predict with the updated statistics.

  Returns:
    An `Adapter`; only `batch_stats` change, and only with `momentum`.

  References:
    Nado et al., Evaluating Prediction-Time Batch Normalization, 2020.
    Schneider et al., Improving robustness against common corruptions by
    covariate shift adaptation, NeurIPS 2020.
  """
  if prior_strength is not None and source_weight:
    raise ValueError('norm: give source_weight or prior_strength, not both.')
  if momentum is not None and not 0.0 < momentum <= 1.0:
    raise ValueError(f'norm: momentum must be in (0, 1], got {momentum}')
  if not 0.0 <= source_weight <= 1.0:
    raise ValueError(f'norm: source_weight must be in [0, 1]: {source_weight}')

  def init_fn(variables, rng):
    if not jax.tree.leaves(variables['batch_stats']):
      raise ValueError(
        'norm: the model has no BN statistics (a LayerNorm model such as a '
        'ViT), so it would only reproduce the source model'
      )
    return base.init_state(variables, rng)

  def step_fn(state, batch, *, meta=None, **extra_args):
    del meta, extra_args
    mask = batch.get('mask')
    images = batch['image']
    if momentum is not None:
      stats = apply_fn(
        state.params,
        state.batch_stats,
        images,
        use_batch_stats=True,
        mask=mask,
      ).batch_stats
      new_stats = jax.tree.map(
        lambda s, b: (1.0 - momentum) * s + momentum * b,
        state.batch_stats,
        stats,
      )
      out = apply_fn(state.params, new_stats, images)
      state = state._replace(batch_stats=new_stats)
      weight = jnp.zeros([])
    else:
      if prior_strength is not None:
        n = jnp.sum(losses.batch_mask(batch).astype(jnp.float32))
        weight = prior_strength / (prior_strength + n)
      else:
        weight = jnp.asarray(source_weight, jnp.float32)
      out = apply_fn(
        state.params,
        state.batch_stats,
        images,
        bn_mode=layers.BNMode(source_weight=weight),
        mask=mask,
      )
    metrics = {'source_weight': weight}
    return state._replace(step=state.step + 1), base.StepOutput(
      out.logits, metrics
    )

  return base.adapter(init_fn, step_fn, params_lib.no_params)
