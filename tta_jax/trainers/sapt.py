"""SAPT: sharpness-aware prompt tuning, the source stage of TLLA.

TLLA (Li et al. 2025; v2 "FGA") learns the prompt context as CoOp does,
on 16 labelled shots per class of the source with the encoders frozen, but
minimises the cross-entropy plus its sharpness around the context:

  l(p) + lambda * max_{||e|| <= rho} [l(p + e) - l(p)],

with SAM's first-order solution `e* = rho * grad l / ||grad l||` (the norm
over the whole context tensor, `e*` held constant), so the update follows
`(1 - lambda) grad l(p) + lambda grad l(p + e*)`; lambda = 1 is SAM on the
prompt. Everything else is CoOp's recipe and loop (`trainers.coop`, whose
`gradient` hook this fills): SGD 0.002, momentum 0.9, weight decay 5e-4,
one warmup epoch at 1e-5 then a per-epoch cosine, batch 32, 50 epochs.

The paper grid-searches rho over {0.05, 0.1, 0.3, 0.5, 0.7} without saying
on what; here `rho_grid` trains one prompt per value and keeps the best on
the held-out source split (`TrainContext.val_domains`: top-1 accuracy,
ties broken by the lower cross-entropy, then the smaller rho), so a config
can record the choice in `rho` and train only that one.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tta_jax._src import checkpoint, grad_step, losses, params as params_lib
from tta_jax.methods import stss
from tta_jax.models import vlm
from tta_jax.trainers import base, coop


def sam_gradient(rho: float, weight: float = 1.0) -> coop.GradientFn:
  """CoOp's `gradient` hook with SAPT's sharpness-aware gradient."""

  def gradient(loss_fn, trainable):
    return grad_step.sharpness_aware_value_and_grad(
      loss_fn, rho=rho, weight=weight
    )(trainable)

  return gradient


def evaluate(
  apply_fn, variables, source, batch_size: int = 500
) -> tuple[float, float]:
  """(top-1 accuracy, mean cross-entropy) of the classifier on `source`."""
  fn = jax.jit(lambda v, x: apply_fn(v['params'], v['batch_stats'], x).logits)
  correct, nll, n = 0, 0.0, len(source)
  for start in range(0, n, batch_size):
    batch = source[np.arange(start, min(start + batch_size, n))]
    logits = fn(variables, batch['image'])
    correct += int(np.sum(np.asarray(jnp.argmax(logits, -1)) == batch['label']))
    nll += float(jnp.sum(losses.cross_entropy(logits, batch['label'])))
  return correct / max(n, 1), nll / max(n, 1)


def random_sharpness(
  apply_fn,
  variables,
  images,
  labels,
  *,
  rho: float,
  n_directions: int,
  key: jax.Array,
) -> float:
  """`max_u l(p + rho u) - l(p)` over random unit directions `u` of the
  context (the flattened `[n_ctx, d]` tensor), `l` the mean cross-entropy
  on `images`: how sharp the minimum a prompt sits in is."""
  params, stats = variables['params'], variables['batch_stats']
  ctx, frozen = params_lib.split_by(vlm.context_mask, params, stats, who='sapt')

  def loss(c):
    logits = apply_fn(params_lib.merge(c, frozen), stats, images).logits
    return jnp.mean(losses.cross_entropy(logits, labels))

  perturbed = stss.perturb(key, ctx, n_directions, rho)
  # The unperturbed loss goes through the same compiled loop as the
  # perturbed ones, so rho = 0 gives exactly zero on any backend.
  points = jax.tree.map(
    lambda p, c: jnp.concatenate([c[None], p]), perturbed, ctx
  )
  values = jax.lax.map(loss, points)  # one compiled loop body
  return float(jnp.max(values[1:] - values[0]))


def _train_one(ctx: base.TrainContext, rho: float, weight: float):
  logging.info('sapt: rho %g, lambda %g', rho, weight)
  result = coop.train(ctx, gradient=sam_gradient(rho, weight))
  metrics = dict(result.metrics, rho=float(rho), sharpness_weight=weight)
  ctx_norm = float(jnp.linalg.norm(result.variables['params']['prompt']['ctx']))
  metrics['context_norm'] = ctx_norm
  return result._replace(metrics=metrics)


SETTINGS = coop.SETTINGS | {'rho', 'sharpness_weight', 'rho_grid'}


def train(ctx: base.TrainContext) -> base.TrainResult:
  """SAPT on `ctx.source_domains[0]`: only `prompt/ctx` changes.

  `ctx.hparams`: CoOp's (`trainers.coop.train`) plus `rho` (the SAM
  radius), `sharpness_weight` (lambda, 1) and `rho_grid` (values of rho
  to select among on the held-out source split; empty: `rho` alone).

  Returns:
    The variables with the learned context, and CoOp's metrics plus
    `rho`, the context's norm and, with a grid, every value's held-out
    accuracy and cross-entropy.
  """
  hp = ctx.hparams
  grid = tuple(float(r) for r in hp.rho_grid)
  if any(not math.isfinite(r) or r < 0 for r in (*grid, hp.rho)):
    raise ValueError(f'sapt: rho values must be >= 0: {hp.rho}, {grid}')
  if not grid:
    return _train_one(ctx, float(hp.rho), float(hp.sharpness_weight))
  if not ctx.val_domains:
    raise ValueError(
      'sapt: rho_grid selects on a held-out source split, and this '
      'benchmark has none (no source-val domain)'
    )
  held_out = ctx.val_domains[0].source
  runs, table = [], {}
  for rho in grid:
    # Each value resumes from its own checkpoints.
    sub = ctx._replace(
      checkpointer=checkpoint.StateCheckpointer(
        ctx.checkpointer.directory / f'rho_{rho:g}'
      )
    )
    result = _train_one(sub, rho, float(hp.sharpness_weight))
    sub.checkpointer.close()
    acc, nll = evaluate(ctx.apply_fn, result.variables, held_out)
    table[f'{rho:g}'] = {'accuracy': acc, 'cross_entropy': nll}
    logging.info('sapt: rho %g: held-out accuracy %.4f, CE %.4f', rho, acc, nll)
    runs.append(((acc, -nll, -rho), result))
  _, best = max(runs, key=lambda r: r[0])
  metrics = dict(best.metrics, rho_grid=table)
  logging.info('sapt: chose rho %g', metrics['rho'])
  return best._replace(metrics=metrics)
