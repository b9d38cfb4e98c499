"""Meta-TTT: meta-learned minimax entropy on mixed-BN layers.

Test time (`meta_ttt`): every test batch adapts a copy of the BN affine
parameters with one entropy-maximisation step and one minimisation step,
predicts the batch with the adapted copy and discards it (episodic). Every
BN layer mixes source and batch statistics with a per-channel weight alpha
(`models.mixed_bn`).

The inner procedure (`make_minimax`) is shared with meta-training
(`tta_jax.trainers.meta_ttt`), which runs the same steps differentiably on
labelled source batches.
"""

import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from tta_jax import models
from tta_jax._src import base, grad_step, losses, params as params_lib


def ssl_loss(
  logits: jax.Array,
  mask: jax.Array,
  *,
  threshold: float = 0.8,
  loss: str = 'gem_t',
  temperature_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The confidence-split self-supervised terms `(S_sup, S_unsup, n_conf)`.

  Rows with max-probability >= `threshold` are confident (C), the others
  unconfident (U); the split carries no gradient. `S_sup = 2|C|/B *
  mean_C CE(z, argmax z)` and `S_unsup = 2|U|/B * H(z_U)`, with `H` GEM-T or
  the Shannon entropy; absent terms are 0. `threshold <= 0` disables the
  split: `S_sup = 0`, `S_unsup = H(z)`. Padding rows (`mask` False) count
  nowhere, B included.
  """
  if loss not in ('gem_t', 'entropy'):
    raise ValueError(f"meta_ttt: loss must be 'gem_t' or 'entropy': {loss}")

  def unsup(z, m):
    if loss == 'gem_t':
      return losses.gem_t(z, m, scale=temperature_scale)
    return losses.masked_mean(losses.softmax_entropy(z), m)

  if threshold <= 0:
    return jnp.zeros([], logits.dtype), unsup(logits, mask), jnp.zeros([])
  conf = jax.lax.stop_gradient(jnp.max(jax.nn.softmax(logits), -1))
  confident = mask & (conf >= threshold)
  unconfident = mask & ~confident
  n = jnp.maximum(jnp.sum(mask), 1).astype(logits.dtype)
  n_conf = jnp.sum(confident).astype(logits.dtype)
  pseudo = jnp.argmax(logits, -1)
  ce = losses.masked_mean(losses.cross_entropy(logits, pseudo), confident)
  s_sup = 2.0 * n_conf / n * ce
  s_unsup = 2.0 * (n - n_conf) / n * unsup(logits, unconfident)
  return s_sup, s_unsup, n_conf


class Minimax(NamedTuple):
  """The inner procedure, shared by test-time adaptation and meta-training."""

  groups: Callable  # (params, batch_stats) -> {'max': mask, 'min': mask}
  adapt: Callable  # (params, batch_stats, images, mask, *, phases, ...)
  bn_mode: models.BNMode
  hparams: dict[str, Any]  # make_minimax's keywords, defaults filled in


def make_minimax(
  apply_fn,
  *,
  threshold: float = 0.8,
  loss: str = 'gem_t',
  temperature_scale: float = 1.0,
  max_lr: float = 1e-2,
  min_lr: float = 1e-2,
  steps: int = 1,
  minimax: bool = True,
  groups: str = 'code',
  max_layers: str = 'last',
  exclude: str = 'downsample',
  alpha: float | None = None,
  adapt_alpha: bool = False,
  alpha_lr: float = 0.1,
) -> Minimax:
  """Builds the parameter groups and the max/min SGD steps.

  These keywords are `meta_ttt`'s (documented there, which shares this
  signature).
  """
  hparams = {k: v for k, v in locals().items() if k != 'apply_fn'}
  if groups not in ('code', 'paper'):
    raise ValueError(f"meta_ttt: groups must be 'code' or 'paper': {groups}")
  if adapt_alpha and alpha is not None:
    raise ValueError('meta_ttt: adapt_alpha needs learned alpha (alpha=None)')
  if steps < 1:
    raise ValueError(f'meta_ttt: steps must be >= 1, got {steps}')
  bn_mode = models.mixed_bn(alpha)
  bn = params_lib.bn_affine
  if exclude:
    bn = params_lib.difference(bn, params_lib.by_regex(exclude))
  if groups == 'code':

    def max_fn(params, batch_stats):
      layers = max_layers
      if layers == 'last':
        layers = re.escape(models.last_bn(batch_stats))
      chosen = params_lib.by_regex(f'^(?:{layers})/bias$')
      return params_lib.intersection(bn, chosen)(params, batch_stats)

    min_fn = params_lib.difference(bn, max_fn)
  else:  # the paper's text: shifts maximise, scales minimise
    max_fn = params_lib.intersection(bn, params_lib.by_regex(r'(^|/)bias$'))
    min_fn = params_lib.intersection(bn, params_lib.by_regex(r'(^|/)scale$'))
  if not minimax:  # plain minimisation over every adapted BN affine
    max_fn, min_fn = params_lib.no_params, params_lib.union(max_fn, min_fn)
  if adapt_alpha:
    min_fn = params_lib.union(min_fn, params_lib.by_regex(r'(^|/)alpha$'))

  def groups_fn(params, batch_stats):
    return {
      'max': max_fn(params, batch_stats),
      'min': min_fn(params, batch_stats),
    }

  def sgd_phase(params, batch_stats, images, valid, sign, lr, shift, fo):
    trainable, frozen = params_lib.split(
      params, groups_fn(params, batch_stats)['max' if sign < 0 else 'min']
    )
    lrs = traverse_util.path_aware_map(
      lambda path, _: alpha_lr if path[-1] == 'alpha' else lr, trainable
    )

    def loss_fn(trainable):
      out = apply_fn(
        params_lib.merge(trainable, frozen),
        batch_stats,
        images,
        bn_mode=bn_mode,
        mask=valid,
        feature_shift=shift,
      )
      s_sup, s_unsup, n_conf = ssl_loss(
        out.logits,
        valid,
        threshold=threshold,
        loss=loss,
        temperature_scale=temperature_scale,
      )
      return s_sup + sign * s_unsup, n_conf

    grad_fn = grad_step.inner_value_and_grad(
      loss_fn, has_aux=True, first_order=fo
    )
    for _ in range(steps):
      (value, n_conf), grads = grad_fn(trainable)
      trainable = jax.tree.map(lambda p, g, r: p - r * g, trainable, grads, lrs)
    return params_lib.merge(trainable, frozen), value, n_conf

  def adapt(
    params,
    batch_stats,
    images,
    mask=None,
    *,
    phases: Sequence[str] = ('max', 'min'),
    feature_shift=None,
    first_order: bool = False,
  ):
    """SGD steps per phase, in order; returns `(params, metrics)`."""
    valid = jnp.ones(images.shape[:1], bool) if mask is None else mask
    metrics = {}
    for phase in phases if minimax else [p for p in phases if p == 'min']:
      sign, lr = (-1.0, max_lr) if phase == 'max' else (1.0, min_lr)
      params, value, n_conf = sgd_phase(
        params, batch_stats, images, valid, sign, lr, feature_shift, first_order
      )
      metrics[f'{phase}_loss'] = value
      metrics[f'{phase}_confident'] = n_conf / jnp.maximum(jnp.sum(valid), 1)
    return params, metrics

  return Minimax(groups_fn, adapt, bn_mode, hparams)


def meta_ttt(apply_fn, **hparams) -> base.Adapter:
  """Meta-TTT (Tao, Shen & Mondal, 2024): minimax entropy on mixed BN.

  Per test batch, from the meta-trained parameters (episodic: the state's
  parameters never change, so batch 2 adapts the same after batch 1 as
  alone): one SGD step of `S_sup - S_unsup` on psi_max (maximise the
  entropy of unconfident rows while fitting the confident ones), then one
  of `S_sup + S_unsup` on psi_min, starting from the max-adapted model;
  the batch is then predicted with the adapted copy (`ssl_loss` defines
  the terms). BN normalises with `mixed_bn(alpha)` throughout.

  Which parameters maximise: the issue and the paper's text assign entropy
  maximisation to the BN shifts and minimisation to the BN scales; the
  authors' code (`get_mme_optimizers`, `meta_sup.sh`) maximises with the
  bias of one named BN layer only (`layer4.1.bn2`, the last BN) and
  minimises with every other BN scale and bias, both steps using the
  split loss above. Default `groups='code'` (parity with the authors'
  code, with `max_layers` the last BN); `groups='paper'` maximises with every BN
  bias and minimises with every BN scale, same losses.

  Args:
    apply_fn: the model's `ApplyFn`; with `alpha=None` a model built with
      `bn_alpha_init` (what `meta_train` returns).
    threshold: confidence split tau (`--sup_thresh` 0.8); <= 0 disables it.
    loss: the unconfident rows' entropy: `'gem_t'` (the code's GEM-T) or
      `'entropy'` (Shannon, EM).
    temperature_scale: GEM-T's s.
    max_lr: SGD step size of the max step (1e-2).
    min_lr: SGD step size of the min step (1e-2).
    steps: SGD steps per phase (`--meta-step` 1).
    minimax: False drops the max step and minimises over psi_max + psi_min
      (the "no minimax" ablation; with `loss='entropy', threshold=0` plain
      entropy minimisation).
    groups: `'code'` or `'paper'`, see above.
    max_layers: regex (full match) of the BN module paths whose bias is
      psi_max under `groups='code'`; `'last'`: the model's BN before
      pooling (`models.last_bn`).
    exclude: regex of parameter paths never adapted (downsample BNs).
    alpha: None: learned per-channel alpha; a float: fixed source weight
      (needs no alpha parameters; the "fixed alpha" ablation).
    adapt_alpha: also adapt alpha in the min step (the code's `--inner
      lambd`; off in `meta_sup.sh`).
    alpha_lr: its step size (`--meta-lambd-lr`, 0.1).

  Returns:
    An `Adapter`; `adapted` declares the per-batch adapted leaves (the
    state's copies of them never change).

  References:
    Tao, Shen & Mondal, Meta-TTT: A Meta-learning Minimax Framework For
    Test-Time Training, arXiv 2410.01709 (code: TAOC0002/domain_adapter).
  """
  inner = make_minimax(apply_fn, **hparams)
  alpha, minimax = inner.hparams['alpha'], inner.hparams['minimax']

  def adapted(params, batch_stats):
    g = inner.groups(params, batch_stats)
    return jax.tree.map(lambda a, b: a or b, g['max'], g['min'])

  def init_fn(variables, rng):
    params, stats = variables['params'], variables['batch_stats']
    if alpha is None and not any(
      p.endswith('/alpha') for p in params_lib.paths(params)
    ):
      raise ValueError(
        'meta_ttt: alpha=None uses learned per-channel alphas, which this '
        'model lacks: meta-train it first (experiments.meta_train_main) or '
        'pass a fixed alpha'
      )
    g = inner.groups(params, stats)
    for phase in ('max', 'min') if minimax else ('min',):
      if not params_lib.count(g[phase]):
        bn = params_lib.bn_affine(params, stats)
        raise ValueError(
          f'meta_ttt: the {phase} step adapts no parameter (groups='
          f'{inner.hparams["groups"]!r}, max_layers='
          f'{inner.hparams["max_layers"]!r}); BN parameters: '
          f'{params_lib.selected_paths(params, bn)[:6]}'
        )
    return base.init_state(variables, rng)

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del meta, extra_args
    mask = batch.get('mask')
    params, metrics = inner.adapt(
      state.params,
      state.batch_stats,
      batch['image'],
      mask,
      first_order=first_order,
    )
    out = apply_fn(
      params,
      state.batch_stats,
      batch['image'],
      bn_mode=inner.bn_mode,
      mask=mask,
    )
    return state._replace(step=state.step + 1), base.StepOutput(
      out.logits, metrics
    )

  return base.adapter(init_fn, step_fn, adapted)


# One keyword signature for both (`methods.from_config` reads it).
meta_ttt.__signature__ = inspect.signature(make_minimax).replace(
  return_annotation=base.Adapter
)
