"""Source training: the model every method starts from.

Plain supervised training on labelled source data with AdamW, a cosine
schedule, small random translations, and BN running statistics kept as an
EMA (momentum 0.9, as PyTorch and flax do). Resumable per epoch. The
recipe's settings are `configs.common.base_config().pretrain`.
"""

import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from tta_jax import models
from tta_jax._src import checkpoint, losses, metrics
from tta_jax.data import sources


def _translate(images: np.ndarray, max_shift: int, rng) -> np.ndarray:
  """Random integer translations with zero fill (per example)."""
  if max_shift == 0:
    return images
  n, h, w, _ = images.shape
  pad = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
  dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
  return np.stack(
    [pad[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)]
  )


def evaluate(apply_fn, variables, source: sources.Source, batch_size=500):
  """Clean error of the source model (source BN statistics)."""
  fn = jax.jit(lambda v, x: apply_fn(v['params'], v['batch_stats'], x).logits)
  correct = []
  for start in range(0, len(source), batch_size):
    batch = source[np.arange(start, min(start + batch_size, len(source)))]
    logits = fn(variables, batch['image'])
    correct.append(np.asarray(jnp.argmax(logits, -1)) == batch['label'])
  return metrics.summarize(
    {
      'correct': np.concatenate(correct),
      'confidence': np.zeros(len(source)),
      'nll': np.zeros(len(source)),
    }
  )['error']


def warm_start(variables, directory, model_config):
  """`variables` with every leaf of the checkpoint in `directory` whose path
  and shape agree (`config.pretrain.init_ckpt`, e.g. torchvision's ImageNet
  ResNet-18 converted by `experiments.convert_torch_main`); the others (a
  classifier for another number of classes) keep their fresh init."""
  metadata = checkpoint.load_metadata(directory)
  if metadata is None or not checkpoint.has_variables(directory):
    raise FileNotFoundError(
      f'pretrain.init_ckpt={str(directory)!r} holds no checkpoint (expected '
      'variables/ and metadata.json, as convert_torch_main writes them)'
    )
  if metadata['model']['name'] != model_config['name']:
    raise ValueError(
      f'pretrain.init_ckpt holds a {metadata["model"]["name"]!r}, the '
      f'config trains a {model_config["name"]!r}'
    )
  module = models.from_config(metadata['model'], metadata['num_classes'])
  template = models.init_variables(
    module, metadata['input_shape'], jax.random.key(0)
  )
  loaded = traverse_util.flatten_dict(
    checkpoint.load_variables(directory, template)
  )
  flat = traverse_util.flatten_dict(variables)
  fresh = []
  for path, leaf in flat.items():
    if path in loaded and loaded[path].shape == leaf.shape:
      flat[path] = jnp.asarray(loaded[path], leaf.dtype)
    else:
      fresh.append('/'.join(path))
  if len(fresh) == len(flat):
    raise ValueError(f'pretrain.init_ckpt: no variable of {directory} fits')
  logging.info(
    'Initialised from %s; freshly initialised: %s', directory, fresh or 'none'
  )
  return traverse_util.unflatten_dict(flat)


def supervised_step(apply_fn, tx: optax.GradientTransformation, momentum):
  """The source recipe's step: cross-entropy in train-mode BN, BN EMA.

  Returns `step(variables, opt_state, images, labels) -> (variables,
  opt_state, loss)`; the running statistics move to the batch's by
  `1 - momentum`.
  """

  def step(variables, opt_state, images, labels):
    def loss_fn(params):
      out = apply_fn(
        params, variables['batch_stats'], images, use_batch_stats=True
      )
      return losses.cross_entropy(out.logits, labels).mean(), out.batch_stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables['params']
    )
    updates, opt_state = tx.update(grads, opt_state, variables['params'])
    ema = jax.tree.map(
      lambda s, b: momentum * s + (1 - momentum) * b,
      variables['batch_stats'],
      stats,
    )
    params = optax.apply_updates(variables['params'], updates)
    return {'params': params, 'batch_stats': ema}, opt_state, loss

  return step


def train(
  *,
  model_config: Mapping[str, Any],
  input_shape,
  num_classes: int,
  source_train: sources.Source,
  source_val: sources.Source | None,
  recipe: Mapping[str, Any],
  seed: int,
  checkpoint_dir: pathlib.Path,
  name: str = 'source',
) -> tuple[Any, dict[str, Any]]:
  """Trains a model of `model_config` on `source_train` from scratch.

  Args:
    model_config: `{'name': ..., **kwargs}` for `models.from_config`.
    input_shape: `(H, W, C)`.
    num_classes: K.
    source_train: the labelled training data.
    source_val: data to report a clean error on after every epoch, or None.
    recipe: epochs, batch_size, learning_rate, weight_decay, bn_momentum,
      max_translation and init_ckpt (a checkpoint to warm-start from, or
      '').
    seed: initialisation and data order.
    checkpoint_dir: where training is checkpointed per epoch (and resumed).
    name: for log lines and errors.

  Returns:
    `(variables, {'epochs', 'train_seconds'})`.
  """
  cfg = dict(recipe)
  module = models.from_config(model_config, num_classes)
  apply_fn = models.make_apply_fn(module, input_shape)
  n = len(source_train)
  steps_per_epoch = n // cfg['batch_size']
  if steps_per_epoch == 0:
    raise ValueError(
      f'{name}: {n} source training examples, fewer than one '
      f'batch (pretrain.batch_size={cfg["batch_size"]})'
    )
  total = steps_per_epoch * cfg['epochs']
  schedule = optax.cosine_decay_schedule(cfg['learning_rate'], total)
  tx = optax.adamw(schedule, weight_decay=cfg['weight_decay'])
  rng = jax.random.key(seed)
  variables = models.init_variables(module, input_shape, rng)
  if cfg.get('init_ckpt'):
    variables = warm_start(variables, cfg['init_ckpt'], model_config)
  state = {
    'variables': variables,
    'opt_state': tx.init(variables['params']),
    'epoch': np.int32(0),
  }
  ckpt = checkpoint.StateCheckpointer(checkpoint_dir)
  saved_at, restored = ckpt.restore_latest(state)
  if saved_at is not None:
    state = restored
    logging.info('Resuming source training at epoch %d', int(state['epoch']))

  train_step = jax.jit(supervised_step(apply_fn, tx, cfg['bn_momentum']))

  t0 = time.perf_counter()
  variables, opt_state = state['variables'], state['opt_state']
  batch_size = cfg['batch_size']
  for epoch in range(int(state['epoch']), cfg['epochs']):
    r = np.random.default_rng([seed, epoch])
    order = r.permutation(n)
    for s in range(steps_per_epoch):
      batch = source_train[order[s * batch_size : (s + 1) * batch_size]]
      images = _translate(batch['image'], cfg['max_translation'], r)
      variables, opt_state, loss = train_step(
        variables, opt_state, images, batch['label']
      )
    val_error = (
      evaluate(apply_fn, variables, source_val)
      if source_val is not None
      else float('nan')
    )
    logging.info(
      'pretrain epoch %d/%d: loss %.4f, val error %.2f%% (%.0fs)',
      epoch + 1,
      cfg['epochs'],
      float(loss),
      100 * val_error,
      time.perf_counter() - t0,
    )
    ckpt.save(
      epoch + 1,
      {
        'variables': variables,
        'opt_state': opt_state,
        'epoch': np.int32(epoch + 1),
      },
    )
  ckpt.close()
  return variables, {
    'train_seconds': time.perf_counter() - t0,
    'epochs': cfg['epochs'],
  }
