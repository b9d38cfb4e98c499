"""CoOp: learn the prompt context on a few labelled source images.

Zhou et al. (IJCV 2022) keep CLIP frozen and learn the `n_ctx` context
vectors of the prompt `"X X X X <class>."` by cross-entropy on 16 images
per class. The recipe (CoOp's ImageNet configuration): the context starts
from "a photo of a"; SGD with momentum 0.9 and (coupled, as torch's) weight
decay 5e-4 at lr 0.002, batch 32, 50 epochs; the learning rate is 1e-5 for
one warmup epoch, then follows a per-epoch cosine (Dassl's
`ConstantWarmupScheduler` around `CosineAnnealingLR`); training images get
a random resized crop (and, for natural images, a flip). Only the context
receives gradients; the encoders run in eval mode (source BN statistics).

`train(ctx, gradient=...)` takes the gradient of the context as a function
so that sharpness-aware prompt tuning (SAPT) can reuse the loop with its
own; the default is the plain gradient of the cross-entropy.
"""

import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tta_jax._src import augment, losses, params as params_lib
from tta_jax.data import sources
from tta_jax.models import vlm
from tta_jax.trainers import base, lit

# (loss_fn, ctx_params) -> (loss, grads): loss_fn(ctx_params) -> loss.
GradientFn = Callable[..., tuple[jax.Array, dict]]


def plain_gradient(loss_fn, trainable):
  return jax.value_and_grad(loss_fn)(trainable)


def few_shot(labels: np.ndarray, shots: int, num_classes: int, seed: int):
  """`shots` random indices per class (sorted by class), seeded.

  Raises:
    ValueError: a class has fewer than `shots` examples.
  """
  r = np.random.default_rng(seed)
  out = []
  for k in range(num_classes):
    pool = np.flatnonzero(labels == k)
    if len(pool) < shots:
      raise ValueError(
        f'coop: class {k} has {len(pool)} images < {shots} shots'
      )
    out.append(r.choice(pool, shots, replace=False))
  return np.concatenate(out)


def epoch_learning_rate(
  epoch: int, *, lr: float, epochs: int, warmup_epochs: int, warmup_lr: float
) -> float:
  """Dassl's constant warmup then per-epoch cosine, at `epoch` (0-based).

  The first epoch after the warmup trains at `lr` itself: Dassl's warmup
  hands over to a `CosineAnnealingLR` that has not stepped yet, which then
  steps at the end of every epoch.
  """
  if epoch < warmup_epochs:
    return warmup_lr
  t = epoch - warmup_epochs
  return 0.5 * lr * (1.0 + math.cos(math.pi * t / epochs))


# The settings `train` reads (`ctx.hparams`); others are refused as typos.
SETTINGS = frozenset({
  'shots', 'epochs', 'batch_size', 'learning_rate', 'momentum',
  'weight_decay', 'warmup_epochs', 'warmup_lr', 'crop_scale', 'flip',
})  # fmt: skip


def train(
  ctx: base.TrainContext, *, gradient: GradientFn = plain_gradient
) -> base.TrainResult:
  """CoOp on `ctx.source_domains[0]`: only `prompt/ctx` changes.

  `ctx.hparams`: `shots`, `epochs`, `batch_size`, `learning_rate`,
  `momentum`, `weight_decay`, `warmup_epochs`, `warmup_lr`, `crop_scale`,
  `flip`.

  Returns:
    The variables with the learned context, and metrics: the final loss,
    the accuracy on the (uncropped) shots before (the initial context) and
    after, which says how much the shots had left to teach, and the same
    per validation domain.
  """
  hp = ctx.hparams
  variables = ctx.variables
  trainable, frozen = params_lib.split_by(
    vlm.context_mask, variables['params'], variables['batch_stats'], who='coop'
  )
  source = ctx.source_domains[0].source
  # Sources that know their labels (image folders, TFDS) are not decoded
  # for them: ImageNet's 1.28M training images hold 16 shots per class.
  labels = getattr(source, 'labels', None)
  if labels is None:
    labels = source[np.arange(len(source))]['label']
  labels = np.asarray(labels)
  idx = few_shot(labels, hp.shots, ctx.num_classes, ctx.seed)
  data = source[idx]
  n = len(idx)
  per_epoch = n // hp.batch_size  # drop_last, as Dassl
  if per_epoch == 0:
    raise ValueError(f'coop: {n} shots, fewer than a batch of {hp.batch_size}')
  lr_of_epoch = functools.partial(
    epoch_learning_rate,
    lr=hp.learning_rate,
    epochs=hp.epochs,
    warmup_epochs=hp.warmup_epochs,
    warmup_lr=hp.warmup_lr,
  )
  table = jnp.asarray([lr_of_epoch(e) for e in range(hp.epochs)], jnp.float32)
  tx = optax.chain(
    optax.add_decayed_weights(hp.weight_decay),
    optax.sgd(lambda count: table[count // per_epoch], momentum=hp.momentum),
  )
  state = {
    'trainable': trainable,
    'opt_state': tx.init(trainable),
    'epoch': np.int32(0),
  }
  saved_at, restored = ctx.checkpointer.restore_latest(state)
  if saved_at is not None:
    state = restored
    logging.info('coop: resuming at epoch %d', int(state['epoch']))
  apply_fn, batch_stats = ctx.apply_fn, variables['batch_stats']
  crop = functools.partial(
    augment.random_resized_crop, scale=tuple(hp.crop_scale)
  )

  def views(key, images):
    keys = jax.random.split(key, images.shape[0])
    x = jax.vmap(crop)(keys, images)
    if hp.flip:
      flips = jax.random.uniform(jax.random.fold_in(key, 1), (x.shape[0],))
      x = jnp.where(flips[:, None, None, None] < 0.5, x[:, :, ::-1], x)
    return x

  @jax.jit
  def step(trainable, opt_state, images, y, key):
    x = views(key, images)

    def loss_fn(trainable):
      logits = apply_fn(params_lib.merge(trainable, frozen), batch_stats, x)
      return losses.cross_entropy(logits.logits, y).mean()

    loss, grads = gradient(loss_fn, trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  key = jax.random.fold_in(ctx.rng, 11)
  trainable, opt_state = state['trainable'], state['opt_state']
  loss = float('nan')
  t0 = time.perf_counter()
  for epoch in range(int(state['epoch']), hp.epochs):
    order = np.random.default_rng([ctx.seed, epoch]).permutation(n)
    for s in range(per_epoch):
      b = order[s * hp.batch_size : (s + 1) * hp.batch_size]
      trainable, opt_state, loss = step(
        trainable,
        opt_state,
        data['image'][b],
        data['label'][b],
        jax.random.fold_in(key, epoch * per_epoch + s),
      )
    if ctx.log_every and (epoch + 1) % max(1, ctx.log_every // per_epoch) == 0:
      logging.info(
        'coop epoch %d/%d: loss %.4f, lr %.2g (%.0fs)',
        epoch + 1,
        hp.epochs,
        float(loss),
        lr_of_epoch(epoch),
        time.perf_counter() - t0,
      )
    ctx.checkpointer.save(
      epoch + 1,
      {
        'trainable': trainable,
        'opt_state': opt_state,
        'epoch': np.int32(epoch + 1),
      },
    )
  learned = {
    'params': params_lib.merge(trainable, frozen),
    'batch_stats': batch_stats,
  }
  shots = sources.ArraySource(data['image'], data['label'])  # in memory
  metrics = {
    'loss': float(loss),
    'shots': int(hp.shots),
    'shots_zero_shot_accuracy': lit.zero_shot_accuracy(
      apply_fn, variables, shots
    ),
    'shots_accuracy': lit.zero_shot_accuracy(apply_fn, learned, shots),
  }
  for d in ctx.val_domains:
    metrics[f'{d.name}_zero_shot_accuracy'] = lit.zero_shot_accuracy(
      apply_fn, variables, d.source
    )
    metrics[f'{d.name}_accuracy'] = lit.zero_shot_accuracy(
      apply_fn, learned, d.source
    )
  if ctx.val_domains:
    metrics['val_accuracy'] = metrics[f'{ctx.val_domains[0].name}_accuracy']
  return base.TrainResult(variables=learned, metrics=metrics)
