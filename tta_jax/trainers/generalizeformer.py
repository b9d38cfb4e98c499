"""GeneralizeFormer meta-training: the generator phi on the source domains.

Episodes pair a backbone with meta-target batches from a domain that
backbone never saw, and phi minimises the supervised cross-entropy of the
parameters it generates (`methods.generalizeformer`) on them, through the
layer-wise gradients it reads (second order unless `first_order`).
"""

import hashlib
import json
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tta_jax import models
from tta_jax._src import (
  checkpoint,
  losses,
  meta as meta_lib,
  metrics as metrics_lib,
)
from tta_jax.data import sources
from tta_jax.methods import generalizeformer as gf
from tta_jax.trainers import base, source

BACKBONES = ('meta_source', 'joint', 'source')


class _Split(NamedTuple):
  variables: Any  # the backbone of this meta-source / meta-target split
  targets: tuple[str, ...]  # meta-target domains (unseen by the backbone)


# The settings `train` reads (`ctx.hparams`); others are refused as typos.
SETTINGS = frozenset({
  'backbone', 'backbone_batch_size', 'backbone_epochs',
  'backbone_learning_rate', 'batch_size', 'episode_length', 'eval_every',
  'first_order', 'grad_clip', 'learning_rate', 'remat', 'steps',
  'weight_decay',
})  # fmt: skip


def train(ctx: base.TrainContext) -> base.TrainResult:
  """Meta-trains phi on the source domains (paper: meta-source/target).

  `ctx.hparams` (see `configs/generalizeformer_dg.py`) chooses the
  backbone of each episode:

  - 'meta_source' (default): one backbone per source domain k, trained from
    scratch with the source recipe (`config.pretrain`; `backbone_epochs`
    epochs, 0: as many as the source model) on the other source domains
    (the meta-source); episodes of split k draw
    meta-target batches from domain k, which that backbone never saw, as
    the test domain was never seen. Backbones are cached in
    `ctx.cache_dir` and shared by the variants (ablations).
  - 'joint' (the official code's training loop, simplified): one
    backbone, from the source model, takes an AdamW cross-entropy step on a
    random meta-source domain d before each phi step on a batch of another
    domain; the trained backbone is returned and replaces the source model.
    Unlike the code, the whole backbone has one learning rate (the code's
    fc rate; its trunk takes half), with no drop (the code's x0.1 at 60 %
    of training), and each step's batch comes from one domain (the code
    draws 10 images per class from each other source domain).
  - 'source' (the 'without meta-learning' ablation): the source model,
    meta-target batches from every source domain (no simulated shift).

  Each phi step minimises the cross-entropy of theta_t's logits over an
  episode of `episode_length` meta-target batches (one domain per episode;
  >1 matters only with `accumulate`), plus the optional Huber term, with
  AdamW (cosine decay, global-norm clipping) through `make_meta_train_step`
  (second order unless `first_order`). Every `eval_every` steps phi is
  scored with the same splits on the source domains' validation parts; the
  best phi (step 0, theta_t = theta_s, included) is returned.

  Returns:
    A `MetaTrainResult`: `meta` = phi; `variables` = the joint backbone.
  """
  cfg, kwargs = ctx.hparams, dict(ctx.method_kwargs)
  if cfg.backbone not in BACKBONES:
    raise ValueError(f'backbone must be one of {BACKBONES}: {cfg.backbone!r}')
  names = [d.name for d in ctx.source_domains]
  if cfg.backbone != 'source' and len(names) < 2:
    raise ValueError(
      f'generalizeformer: backbone={cfg.backbone!r} splits the source '
      f'domains into meta-source and meta-target, but there is one '
      f"({names}); use backbone='source'"
    )
  adapter = gf.generalizeformer(ctx.apply_fn, **kwargs)
  phi = gf.init_meta(
    ctx.variables,
    jax.random.fold_in(ctx.rng, 0),
    apply_fn=ctx.apply_fn,
    input_shape=ctx.input_shape,
    **kwargs,
  )
  train_parts = {d.name: d.source for d in ctx.source_domains}
  val_parts = {
    d.name: sources.materialize(d.source)
    for d in ctx.val_domains
    if len(d.source)
  }
  if cfg.backbone == 'meta_source':
    splits = [
      _Split(_canonical(_meta_source_backbone(ctx, cfg, t)), (t,))
      for t in names
    ]
  else:
    splits = [_Split(_canonical(ctx.variables), tuple(names))]
  tx = optax.chain(
    optax.clip_by_global_norm(cfg.grad_clip),
    optax.adamw(
      optax.cosine_decay_schedule(cfg.learning_rate, max(cfg.steps, 1)),
      weight_decay=cfg.weight_decay,
    ),
  )
  train_step = meta_lib.make_meta_train_step(
    adapter,
    tx,
    first_order=cfg.first_order,
    remat=cfg.remat,
    loss_fn=_meta_loss,
  )
  step_jit = jax.jit(adapter.step)
  eval_key = jax.random.fold_in(ctx.rng, 2)

  def val_accuracy(phi, splits):
    correct, n = 0, 0
    for split in splits:
      for t in split.targets:
        if t not in val_parts:
          continue
        c, m = metrics_lib.count_correct(
          lambda s, x: _logits(step_jit(s, x, meta=phi)),
          adapter.init(split.variables, eval_key),
          sources.padded_batches(val_parts[t], cfg.batch_size),
          carry=True,
        )
        correct, n = correct + c, n + m
    return correct / max(n, 1)

  def sample(r, targets):
    src = train_parts[targets[r.integers(len(targets))]]
    b = src[r.integers(0, len(src), cfg.episode_length * cfg.batch_size)]
    shape = (cfg.episode_length, cfg.batch_size)
    return {
      'image': b['image'].reshape(shape + b['image'].shape[1:]),
      'label': b['label'].reshape(shape),
    }

  joint = cfg.backbone == 'joint'
  if joint:
    backbone_tx, backbone_step = _backbone_trainer(ctx, cfg)
  train = {
    'meta_state': meta_lib.init_meta_train_state(
      phi, tx, jax.random.fold_in(ctx.rng, 1)
    ),
    'best': phi,
    'best_accuracy': np.float64(-1.0),
    'best_step': np.int64(0),
  }
  if joint:
    train['backbone'] = train['best_backbone'] = _canonical(ctx.variables)
    train['backbone_opt'] = backbone_tx.init(ctx.variables['params'])
  start, restored = ctx.checkpointer.restore_latest(train)
  if start is not None:
    train = restored
    logging.info('generalizeformer: resuming meta-training at step %d', start)
  else:
    start = 0
    acc = val_accuracy(phi, splits) if val_parts else 0.0
    train['best_accuracy'] = np.float64(acc)
    logging.info('generalizeformer step 0: source-val accuracy %.4f', acc)
  mstate, t0, metrics = train['meta_state'], time.perf_counter(), {}
  for step in range(start, cfg.steps):
    r = np.random.default_rng([ctx.seed, 7, step])
    if joint:
      # The code cycles through the domains first, then draws at random.
      d = step if step < len(names) else int(r.integers(len(names)))
      b = train_parts[names[d]][
        r.integers(0, len(train_parts[names[d]]), cfg.backbone_batch_size)
      ]
      train['backbone'], train['backbone_opt'], _ = backbone_step(
        train['backbone'], train['backbone_opt'], b['image'], b['label']
      )
      split = _Split(
        train['backbone'], tuple(n for n in names if n != names[d])
      )
    else:
      split = splits[int(r.integers(len(splits)))]
    mstate, metrics = train_step(
      mstate, split.variables, sample(r, split.targets)
    )
    done = step + 1
    if ctx.log_every and done % ctx.log_every == 0:
      base.log_progress(
        'generalizeformer',
        done,
        cfg.steps,
        metrics,
        time.perf_counter() - t0,
        'lower the learning rate',
      )
    if done % cfg.eval_every == 0 or done == cfg.steps:
      now = splits if not joint else [_Split(train['backbone'], tuple(names))]
      acc = val_accuracy(mstate.meta, now) if val_parts else 0.0
      logging.info(
        'generalizeformer step %d: source-val accuracy %.4f', done, acc
      )
      if acc > train['best_accuracy'] or not val_parts:
        train.update(
          best=mstate.meta,
          best_accuracy=np.float64(acc),
          best_step=np.int64(done),
        )
        if joint:
          train['best_backbone'] = train['backbone']
      train['meta_state'] = mstate
      ctx.checkpointer.save(done, train)
  out_metrics = {
    'val_accuracy': float(train['best_accuracy']),
    'best_step': int(train['best_step']),
    'seconds': time.perf_counter() - t0,
    **{k: float(v) for k, v in metrics.items()},
  }
  return base.TrainResult(
    meta=train['best'],
    variables=train['best_backbone'] if joint else None,
    metrics=out_metrics,
  )


def _meta_loss(
  meta, adapter, variables, episode, rng, *, first_order=False, remat=False
):
  """Cross-entropy of theta_t's logits (+ the optional Huber term)."""
  state = adapter.init(variables, rng)
  _, out = meta_lib.unroll(
    adapter,
    state,
    episode,
    meta=meta,
    remat=remat,
    first_order=first_order,
    train=True,
  )
  labels, mask = episode['label'], episode.get('mask')
  xent = losses.masked_mean(losses.cross_entropy(out.logits, labels), mask)
  aux = jnp.mean(out.metrics['aux_loss']) if 'aux_loss' in out.metrics else 0.0
  correct = (jnp.argmax(out.logits, -1) == labels).astype(jnp.float32)
  return xent + aux, {
    'loss': xent,
    'aux_loss': jnp.asarray(aux),
    'accuracy': losses.masked_mean(correct, mask),
    'delta_norm': jnp.mean(out.metrics['delta_norm']),
  }


def _logits(step_output):
  state, out = step_output
  return state, out.logits


def _canonical(variables):
  # Freshly trained and checkpoint-restored backbones can differ in weak
  # types; one abstract signature keeps the meta-train step compiled once.
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.asarray(x).dtype), variables)


def _meta_source_backbone(ctx, cfg, target: str):
  """The source recipe on every source domain but `target` (cached)."""
  # 0: the source model's own epochs. Backbones trained much less than the
  # source model teach phi to repair weak models, which hurts the source.
  epochs = cfg.backbone_epochs or ctx.source_recipe['epochs']
  others = [d for d in ctx.source_domains if d.name != target]
  val = [d.source for d in ctx.val_domains if d.name != target]
  # A backbone is defined by its training domains (names and sizes), the
  # recipe, the model and the seed, so the cache is shared by every trainer
  # and held-out domain that needs the same one, and never by another.
  if ctx.cache_dir is None:
    raise ValueError('generalizeformer: meta-source backbones need cache_dir')
  recipe = {**ctx.source_recipe, 'epochs': epochs}
  key = json.dumps(
    [
      dict(ctx.model_config),
      recipe,
      ctx.seed,
      sorted((d.name, len(d.source)) for d in others),
    ],
    sort_keys=True,
    default=str,
  )
  directory = pathlib.Path(ctx.cache_dir) / (
    f'{"+".join(sorted(d.name for d in others))}_e{epochs}_'
    f'{hashlib.sha256(key.encode()).hexdigest()[:10]}'
  )
  expected = checkpoint.model_metadata(
    ctx.model_config, ctx.input_shape, ctx.num_classes
  )
  module = models.from_config(ctx.model_config, ctx.num_classes)
  if checkpoint.has_variables(directory):
    checkpoint.check_metadata(
      checkpoint.load_metadata(directory), expected, directory
    )
    template = models.init_variables(module, ctx.input_shape, jax.random.key(0))
    return checkpoint.load_variables(directory, template)
  logging.info(
    'generalizeformer: training the meta-source backbone '
    'without %s (%d epochs)',
    target,
    epochs,
  )
  source_val = sources.ConcatSource(val) if val else None
  variables, info = source.train(
    model_config=ctx.model_config,
    input_shape=ctx.input_shape,
    num_classes=ctx.num_classes,
    source_train=sources.ConcatSource([d.source for d in others]),
    source_val=source_val,
    recipe=recipe,
    seed=ctx.seed,
    checkpoint_dir=directory / 'pretrain_ckpt',
    name=f'meta_source_without_{target}',
  )
  apply_fn = models.make_apply_fn(module, ctx.input_shape)
  if source_val is not None:
    info['source_val_error'] = source.evaluate(apply_fn, variables, source_val)
  checkpoint.save_variables(directory, variables, {**expected, **info})
  return variables


def _backbone_trainer(ctx, cfg):
  """The 'joint' backbone's AdamW cross-entropy step (BN EMA as pretrain)."""
  tx = optax.adamw(cfg.backbone_learning_rate, weight_decay=5e-4)
  step = source.supervised_step(
    ctx.apply_fn, tx, ctx.source_recipe['bn_momentum']
  )
  return tx, jax.jit(step)
