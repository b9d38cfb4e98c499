"""Meta-TTT: meta-learned minimax entropy on mixed-BN layers.

Test time (`meta_ttt`): every test batch adapts a copy of the BN affine
parameters with one entropy-maximisation step and one minimisation step,
predicts the batch with the adapted copy and discards it (episodic). Every
BN layer mixes source and batch statistics with a per-channel weight alpha.

Meta-training (`meta_train`): on labelled source batches, the same inner
steps run differentiably and the supervised loss after them is minimised
with respect to every weight and alpha (second order: the outer gradient
flows through the inner SGD step), while a random per-channel affine
transform after the stem convolution synthesises domain shifts.
"""

import inspect
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from tta_jax import models
from tta_jax._src import base, losses, meta as meta_lib, params as params_lib
from tta_jax.data import sources

# The BN layer right before global pooling in each registered model family:
# DigitsCNN `bn4`, WideResNet and ResNet-26 `bn`, ResNet-18 `layer4_1/bn2`
# (the authors' `--max_bn_layer layer4.1.bn2`). ResNet-50 needs
# `max_layers='layer4_2/bn3'`.
LAST_BN = 'bn4|bn|layer4_1/bn2'


def mixed_bn(alpha: float | None = None) -> models.BNMode:
  """Meta-TTT's BN: unbiased batch variance and the exact mixture variance.

  `alpha` is the weight of the source statistics: None uses each layer's
  learned per-channel `alpha` (a model built with `bn_alpha_init`); a float
  fixes it for every layer (1: source BN, 0: test-batch BN).
  """
  if alpha is None:
    return models.BNMode(ddof=1, mixture_variance=True, learned_weight=True)
  return models.BNMode(source_weight=alpha, ddof=1, mixture_variance=True)


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


def sample_feature_shift(key: jax.Array, channels: int, p: float):
  """Stochastic domain-shift synthesis: a random per-channel `(w, b)`.

  Independently per channel, with probability `p` the weight is drawn from
  U(0, 1) (else 1) and, with another probability-`p` draw, the bias from
  U(0, 1) (else 0). One draw per batch, as in the authors' code.
  """
  kw, kb, kmw, kmb = jax.random.split(key, 4)
  w = jnp.where(
    jax.random.uniform(kmw, (channels,)) < p,
    jax.random.uniform(kw, (channels,)),
    1.0,
  )
  b = jnp.where(
    jax.random.uniform(kmb, (channels,)) < p,
    jax.random.uniform(kb, (channels,)),
    0.0,
  )
  return w, b


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
  max_layers: str = LAST_BN,
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
  bn_mode = mixed_bn(alpha)
  bn = params_lib.bn_affine
  if exclude:
    bn = params_lib.difference(bn, params_lib.by_regex(exclude))
  if groups == 'code':
    max_fn = params_lib.intersection(
      bn, params_lib.by_regex(f'^(?:{max_layers})/bias$')
    )
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

    grad_fn = meta_lib.inner_value_and_grad(
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
  split loss above. Default `groups='code'` (the spec's parity choice,
  with `max_layers` the last BN); `groups='paper'` maximises with every BN
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
      psi_max under `groups='code'`.
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
    return base.AdaptState(
      params=params,
      batch_stats=stats,
      opt_state=optax.EmptyState(),
      rng=rng,
      step=jnp.zeros([], jnp.int32),
    )

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

  return base.Adapter(init_fn, step_fn, adapted)


# One keyword signature for both (`methods.from_config` reads it).
meta_ttt.__signature__ = inspect.signature(make_minimax).replace(
  return_annotation=base.Adapter
)


# ----------------------------------------------------------------------------
# Meta-training.


def _phase_plan(minimax: bool, sequential: bool) -> tuple[tuple[str, ...], ...]:
  """The inner phases of each outer update of one iteration.

  The authors' primary trainer (`tta_meta_sup`) makes two outer updates, a
  max-only and a min-only inner context each starting from the same
  weights, while test time runs max then min; `sequential=True` is their
  `tta_meta_sup2`: one context, max then min, one outer update.
  """
  if not minimax:
    return (('min',),)
  return (('max', 'min'),) if sequential else (('max',), ('min',))


def meta_objective(
  apply_fn,
  inner: Minimax,
  theta,
  batch_stats,
  batch,
  *,
  shift=None,
  phases: Sequence[str] = ('max', 'min'),
  first_order: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Query cross-entropy after the inner minimax steps on the same batch.

  Returns `(loss, inner metrics)`. `jax.grad(..., has_aux=True)` of this
  with respect to `theta` is the meta-gradient: second order (through the
  inner SGD steps) unless `first_order`.
  """
  adapted, metrics = inner.adapt(
    theta,
    batch_stats,
    batch['image'],
    phases=phases,
    feature_shift=shift,
    first_order=first_order,
  )
  out = apply_fn(
    adapted,
    batch_stats,
    batch['image'],
    bn_mode=inner.bn_mode,
    feature_shift=shift,
  )
  return jnp.mean(losses.cross_entropy(out.logits, batch['label'])), metrics


def _outer_optimizer(cfg, num_updates: int) -> optax.GradientTransformation:
  """SGD-Nesterov with weight decay; head x`head_lr_multiplier`; step decay."""

  def sgd(lr):
    schedule = optax.piecewise_constant_schedule(
      lr, {int(cfg.decay_at * num_updates): cfg.decay_factor}
    )
    return optax.chain(
      optax.add_decayed_weights(cfg.weight_decay),
      optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov),
    )

  def labels(params):
    return traverse_util.path_aware_map(
      lambda path, _: (
        'head'
        if path[0] == 'head'
        else 'alpha'
        if path[-1] == 'alpha'
        else 'backbone'
      ),
      params,
    )

  return optax.multi_transform(
    {
      'backbone': sgd(cfg.learning_rate),
      'head': sgd(cfg.learning_rate * cfg.head_lr_multiplier),
      'alpha': sgd(cfg.alpha_learning_rate),
    },
    labels,
  )


def _with_alpha(ctx, alpha_init: float):
  """The source model rebuilt with a learnable alpha in every BN layer."""
  model = {**ctx.config.model.to_dict(), 'bn_alpha_init': alpha_init}
  kwargs = {k: v for k, v in model.items() if k != 'name'}
  module = models.build(model['name'], num_classes=ctx.num_classes, **kwargs)
  apply_fn = models.make_apply_fn(module, ctx.input_shape)
  init = models.init_variables(module, ctx.input_shape, ctx.rng)
  flat = traverse_util.flatten_dict(init['params'])
  source = traverse_util.flatten_dict(ctx.variables['params'])
  missing = set(flat) - set(source) - {k for k in flat if k[-1] == 'alpha'}
  if missing:
    raise ValueError(f'meta_ttt: the source model lacks {sorted(missing)[:4]}')
  params = traverse_util.unflatten_dict(
    {k: source.get(k, v) for k, v in flat.items()}
  )
  return model, apply_fn, params


def _recompute_stats(apply_fn, params, batch_stats, batches):
  """Population BN statistics of `params` on source batches (train-mode BN)."""
  fn = jax.jit(
    lambda p, s, x: apply_fn(p, s, x, bn_mode=models.BNMode(ddof=1)).batch_stats
  )
  stats = [fn(params, batch_stats, b['image']) for b in batches]
  return jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs), 0), *stats)


def meta_train(ctx: meta_lib.MetaTrainContext) -> meta_lib.MetaTrainResult:
  """Meta-trains the backbone and alpha for `meta_ttt` (second order).

  Each iteration draws one labelled batch per source domain. For every
  outer update of `_phase_plan` and every domain batch: a fresh shift
  (`sample_feature_shift`, probability `shift_p`) is applied after the stem
  convolution, the inner phases adapt psi differentiably on the batch
  (support), and the cross-entropy of the adapted model on the same batch
  (query) is differentiated through the inner steps with respect to every
  parameter, alpha included; the per-domain gradients are summed and
  applied by SGD-Nesterov (lr 1e-3, head x10, weight decay 5e-4, x0.1 at
  80 % of the updates). Source BN statistics stay frozen (the code's mixed
  BN never updates them) unless `source_stats='recompute'`.

  alpha: its outer learning rate is the paper's 0.1 (`alpha_learning_rate`;
  in the code alpha sits in the backbone group at 1e-3). Unconstrained, as
  in the code, alpha then leaves [0, 1] within ~50 iterations, the mixed
  variance turns negative and training collapses to chance (measured on
  the digits benchmark), so by default (`clip_alpha=True`, the spec's
  C.8-3 option) alpha is projected onto [0, 1] after every outer update;
  `clip_alpha=False` is the code's unconstrained alpha. The iterate
  with the best source-validation accuracy *after* test-time adaptation is
  returned (the code's model selection).

  `ctx.method_config` holds the trainer's settings (see
  `configs/meta_ttt_digits.py`); `ctx.method_kwargs` the adapter's, shared
  with test time. With `alpha=None` the model is rebuilt with
  `bn_alpha_init=alpha_init`; with a fixed `alpha` the source model is kept.

  Returns:
    A `MetaTrainResult` with the meta-trained `variables` and, for learned
    alpha, the `model` config including `bn_alpha_init`.
  """
  cfg, kwargs = ctx.method_config, dict(ctx.method_kwargs)
  if kwargs.get('alpha') is None:  # the factory's default: learned alpha
    model, apply_fn, params = _with_alpha(ctx, cfg.alpha_init)
  else:
    model, apply_fn, params = None, ctx.apply_fn, ctx.variables['params']
  batch_stats = ctx.variables['batch_stats']
  inner = make_minimax(apply_fn, **kwargs)
  adapter = meta_ttt(apply_fn, **kwargs)
  plan = _phase_plan(kwargs.get('minimax', True), cfg.sequential_minimax)
  tx = _outer_optimizer(cfg, cfg.steps * len(plan))
  channels = params['conv1']['kernel'].shape[-1]  # every model's stem conv

  @jax.jit
  def train_step(theta, opt_state, batch_stats, batches, key):
    metrics = {}
    for u, phases in enumerate(plan):
      grads, total = jax.tree.map(jnp.zeros_like, theta), 0.0
      for d, batch in enumerate(batches):
        shift = sample_feature_shift(
          jax.random.fold_in(jax.random.fold_in(key, u), d),
          channels,
          cfg.shift_p,
        )
        (value, _), g = jax.value_and_grad(
          meta_objective, argnums=2, has_aux=True
        )(
          apply_fn,
          inner,
          theta,
          batch_stats,
          batch,
          shift=shift,
          phases=phases,
          first_order=cfg.first_order,
        )
        grads = jax.tree.map(jnp.add, grads, g)
        total += value / len(batches)
      updates, opt_state = tx.update(grads, opt_state, theta)
      theta = optax.apply_updates(theta, updates)
      if cfg.clip_alpha:  # keep the mixture convex: variance >= 0
        theta = traverse_util.path_aware_map(
          lambda k, x: jnp.clip(x, 0.0, 1.0) if k[-1] == 'alpha' else x, theta
        )
      metrics['loss_' + '_'.join(phases)] = total
    alphas = [x for k, x in _flat(theta).items() if k[-1] == 'alpha']
    if alphas:
      metrics['alpha_min'] = jnp.min(jnp.concatenate(alphas))
      metrics['alpha_max'] = jnp.max(jnp.concatenate(alphas))
    return theta, opt_state, metrics

  val = [_first(d.source, cfg.val_examples) for d in ctx.val_domains]
  predict = jax.jit(lambda s, x: adapter.step(s, x)[1].logits)

  def val_accuracy(theta):
    state = adapter.init({'params': theta, 'batch_stats': batch_stats}, ctx.rng)
    correct, n = 0, 0
    for data in val:
      for batch in sources.padded_batches(data, cfg.batch_size):
        logits = np.asarray(
          predict(state, {'image': batch['image'], 'mask': batch['mask']})
        )
        hit = logits.argmax(-1) == batch['label']
        correct += int(hit[batch['mask']].sum())
        n += int(batch['mask'].sum())
    return correct / max(n, 1)

  def sample(step):
    r = np.random.default_rng([ctx.config.seed, step])
    out = []
    for d in ctx.source_domains:
      idx = np.sort(r.integers(0, len(d.source), cfg.batch_size))
      b = d.source[idx]
      out.append({'image': b['image'], 'label': b['label']})
    return tuple(out)

  opt_state = tx.init(params)
  train = {
    'theta': params,
    'opt_state': opt_state,
    'best': params,
    'best_accuracy': np.float64(-1.0),
    'best_step': np.int64(-1),
  }
  start = 0
  if ctx.checkpointer.latest_step() is not None:
    start = ctx.checkpointer.latest_step()
    train = ctx.checkpointer.restore(train)
    logging.info('meta_ttt: resuming meta-training at step %d', start)
  theta, opt_state = train['theta'], train['opt_state']
  t0, metrics = time.perf_counter(), {}
  for step in range(start, cfg.steps):
    key = jax.random.fold_in(ctx.rng, step)
    theta, opt_state, metrics = train_step(
      theta, opt_state, batch_stats, sample(step), key
    )
    done = step + 1
    if ctx.log_every and done % ctx.log_every == 0:
      meta_lib.log_progress(
        'meta_ttt',
        done,
        cfg.steps,
        metrics,
        time.perf_counter() - t0,
        'alpha may have left [0, 1] (mixed variance < 0): lower '
        'alpha_learning_rate',
      )
    if done % cfg.eval_every == 0 or done == cfg.steps:
      acc = val_accuracy(theta) if val else 0.0
      logging.info(
        'meta_ttt step %d: source-val accuracy with TTA %.4f', done, acc
      )
      if acc >= train['best_accuracy']:
        train.update(
          best=theta, best_accuracy=np.float64(acc), best_step=np.int64(done)
        )
      train.update(theta=theta, opt_state=opt_state)
      ctx.checkpointer.save(done, train)
  best = train['best']
  if cfg.source_stats == 'recompute':
    batches = [
      sample(-1 - i)[d]
      for i in range(cfg.stats_batches)
      for d in range(len(ctx.source_domains))
    ]
    batch_stats = _recompute_stats(apply_fn, best, batch_stats, batches)
  elif cfg.source_stats != 'frozen':
    raise ValueError(
      f"source_stats must be 'frozen' or 'recompute': {cfg.source_stats}"
    )
  alphas = [
    np.asarray(v)
    for k, v in traverse_util.flatten_dict(best).items()
    if k[-1] == 'alpha'
  ]
  out_metrics = {
    'val_accuracy': float(train['best_accuracy']),
    'best_step': int(train['best_step']),
    **{k: float(v) for k, v in metrics.items()},
  }
  if alphas:
    a = np.concatenate(alphas)
    out_metrics.update(
      alpha_mean=float(a.mean()),
      alpha_min=float(a.min()),
      alpha_max=float(a.max()),
    )
  return meta_lib.MetaTrainResult(
    variables={'params': best, 'batch_stats': batch_stats},
    model=model,
    metrics=out_metrics,
  )


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(tree)


def _first(source, n: int) -> dict[str, np.ndarray]:
  n = len(source) if not n else min(n, len(source))
  return source[np.arange(n)]
