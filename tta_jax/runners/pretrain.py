"""Source training: the model every method starts from.

Plain supervised training on the benchmark's source-train split with AdamW,
a cosine schedule, small random translations, and BN running statistics
kept as an EMA (momentum 0.9, as PyTorch and flax do). Resumable per epoch;
the result goes to `WORKDIR/source` with its metadata (architecture, clean
errors), where `adapt.run` and `meta_train.run` find it.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from tta_jax import models
from tta_jax._src import checkpoint, losses, metrics
from tta_jax.data import benchmarks, sources
from tta_jax.runners import common


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
  module = models.build(
    metadata['model']['name'],
    num_classes=metadata['num_classes'],
    **common.model_kwargs(metadata['model']),
  )
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


def train(config, benchmark: benchmarks.Benchmark, workdir):
  """Trains the source model; returns `(variables, metadata)`."""
  cfg = config.pretrain
  module, apply_fn = common.build_model(config.model, benchmark)
  train_src = benchmark.source_train
  n = len(train_src)
  steps_per_epoch = n // cfg.batch_size
  if steps_per_epoch == 0:
    raise ValueError(
      f'{benchmark.name}: {n} source training examples, fewer than one '
      f'batch (pretrain.batch_size={cfg.batch_size})'
    )
  total = steps_per_epoch * cfg.epochs
  schedule = optax.cosine_decay_schedule(cfg.learning_rate, total)
  tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
  rng = jax.random.key(config.seed)
  variables = models.init_variables(module, benchmark.input_shape, rng)
  if cfg.get('init_ckpt'):
    variables = warm_start(variables, cfg.init_ckpt, config.model)
  state = {
    'variables': variables,
    'opt_state': tx.init(variables['params']),
    'epoch': np.int32(0),
  }
  ckpt = checkpoint.StateCheckpointer(workdir / 'pretrain_ckpt')
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    logging.info('Resuming source training at epoch %d', int(state['epoch']))

  train_step = jax.jit(supervised_step(apply_fn, tx, cfg.bn_momentum))

  t0 = time.perf_counter()
  variables, opt_state = state['variables'], state['opt_state']
  for epoch in range(int(state['epoch']), cfg.epochs):
    r = np.random.default_rng([config.seed, epoch])
    order = r.permutation(n)
    for s in range(steps_per_epoch):
      batch = train_src[order[s * cfg.batch_size : (s + 1) * cfg.batch_size]]
      images = _translate(batch['image'], cfg.max_translation, r)
      variables, opt_state, loss = train_step(
        variables, opt_state, images, batch['label']
      )
    val_error = (
      evaluate(apply_fn, variables, benchmark.source_val)
      if benchmark.source_val is not None
      else float('nan')
    )
    logging.info(
      'pretrain epoch %d/%d: loss %.4f, val error %.2f%% (%.0fs)',
      epoch + 1,
      cfg.epochs,
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
  metadata = common.model_metadata(config.model, benchmark)
  for split in ('source_val', 'clean_test'):
    src = getattr(benchmark, split)
    if src is not None:
      metadata[f'{split}_error'] = evaluate(apply_fn, variables, src)
  metadata['train_seconds'] = time.perf_counter() - t0
  metadata['epochs'] = cfg.epochs
  return variables, metadata


def run(config, workdir):
  """Trains and saves the source model to `WORKDIR/source`."""
  import pathlib

  workdir = pathlib.Path(workdir)
  out = None
  for tag, benchmark in benchmarks.targets(config.data, config.setting):
    wd = workdir if tag is None else workdir / 'dg' / tag
    out = train_and_save(config, wd, benchmark)
  return out


def train_and_save(config, workdir, benchmark):
  """Trains the source model of one benchmark into `WORKDIR/source`."""
  if benchmark.source_train is None:
    raise ValueError(
      f'benchmark {benchmark.name!r} has no source-train split in tta_jax; '
      'convert a pretrained checkpoint and set config.source_ckpt instead'
    )
  variables, metadata = train(config, benchmark, workdir)
  checkpoint.save_variables(
    common.source_dir(config, workdir), variables, metadata
  )
  logging.info(
    'Source model of %s saved: clean test error %.2f%%',
    benchmark.name,
    100 * metadata.get('clean_test_error', float('nan')),
  )
  return variables, metadata
