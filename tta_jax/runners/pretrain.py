"""Source training from a config: the model every method starts from.

`run(config, workdir)` trains the source model of every benchmark the
config names (`trainers.source`, the recipe in `config.pretrain`, or the
source trainer `config.pretrain.trainer` names, e.g. LiT for the dual
encoder) into `WORKDIR[/dg/<held_out>]/source` with its metadata
(architecture, clean errors). `ensure_source` is how the other runners ask
for a source model: it trains one only where none exists yet and the
config names no `source_ckpt`.
"""

import pathlib
import time

import jax
from absl import logging

from tta_jax import models, trainers
from tta_jax._src import checkpoint
from tta_jax.data import benchmarks
from tta_jax.runners import artifacts, configs
from tta_jax.trainers import base, source


def _train_with(name: str, config, benchmark, workdir):
  """A `trainers.SOURCE_TRAINERS` recipe: `(variables, info)`."""
  if name not in trainers.SOURCE_TRAINERS:
    raise ValueError(
      f'unknown config.pretrain.trainer {name!r}; valid: '
      f"'' (supervised) or {sorted(trainers.SOURCE_TRAINERS)}"
    )
  trainers.check_settings(name, config.pretrain, ignore=('trainer',))
  module, apply_fn = artifacts.build_model(config.model, benchmark)
  rng = jax.random.key(config.seed)
  train_domains, val_domains = benchmark.meta_source_domains()
  ckpt = checkpoint.StateCheckpointer(artifacts.pretrain_dir(workdir))
  ctx = base.TrainContext(
    model_config=config.model.to_dict(),
    module=module,
    apply_fn=apply_fn,
    variables=models.init_variables(module, benchmark.input_shape, rng),
    input_shape=tuple(benchmark.input_shape),
    num_classes=benchmark.num_classes,
    source_domains=train_domains,
    val_domains=val_domains,
    shifted_domains=[],
    hparams=config.pretrain,
    method_kwargs={},
    source_recipe=config.pretrain.to_dict(),
    seed=config.seed,
    rng=rng,
    checkpointer=ckpt,
    cache_dir=None,
    log_every=config.log_every,
  )
  t0 = time.perf_counter()
  result = trainers.SOURCE_TRAINERS[name](ctx)
  ckpt.close()
  return result.variables, {
    'train_seconds': time.perf_counter() - t0,
    'trainer': name,
    'metrics': result.metrics,
  }


def train(config, benchmark: benchmarks.Benchmark, workdir):
  """Trains the source model; returns `(variables, metadata)`."""
  trainer = config.pretrain.get('trainer', '')
  if trainer:
    variables, info = _train_with(trainer, config, benchmark, workdir)
  else:
    variables, info = _supervised(config, benchmark, workdir)
  _, apply_fn = artifacts.build_model(config.model, benchmark)
  metadata = artifacts.model_metadata(config.model, benchmark)
  for split in ('source_val', 'clean_test'):
    src = getattr(benchmark, split)
    if src is not None:
      metadata[f'{split}_error'] = source.evaluate(apply_fn, variables, src)
  metadata.update(info)
  metadata['training'] = artifacts.source_training(config)
  return variables, metadata


def _supervised(config, benchmark, workdir):
  variables, info = source.train(
    model_config=config.model.to_dict(),
    input_shape=tuple(benchmark.input_shape),
    num_classes=benchmark.num_classes,
    source_train=benchmark.source_train,
    source_val=benchmark.source_val,
    recipe=config.pretrain.to_dict(),
    seed=config.seed,
    checkpoint_dir=artifacts.pretrain_dir(workdir),
    name=benchmark.name,
  )
  return variables, {
    'train_seconds': info['train_seconds'],
    'epochs': info['epochs'],
  }


def train_and_save(config, workdir, benchmark):
  """Trains the source model of one benchmark into `WORKDIR/source`."""
  if benchmark.source_train is None:
    raise ValueError(
      f'benchmark {benchmark.name!r} has no source-train split in tta_jax; '
      'convert a pretrained checkpoint and set config.source_ckpt instead'
    )
  variables, metadata = train(config, benchmark, pathlib.Path(workdir))
  checkpoint.save_variables(
    artifacts.source_dir(config, workdir), variables, metadata
  )
  logging.info(
    'Source model of %s saved: clean test error %.2f%%',
    benchmark.name,
    100 * metadata.get('clean_test_error', float('nan')),
  )
  return variables, metadata


def ensure_source(config, workdir, benchmark, module):
  """`(variables, metadata)` of the source model, training it if missing.

  A source model this workdir trained under another recipe, seed or data
  split is refused (it would silently change every number), not reused.
  """
  if not artifacts.has_source(config, workdir) and not config.source_ckpt:
    if benchmark.source_train is not None:
      logging.info(
        'No source checkpoint in %s: pretraining first.',
        artifacts.source_dir(config, workdir),
      )
      train_and_save(config, workdir, benchmark)
  variables, metadata = artifacts.load_source(
    config, workdir, benchmark, module
  )
  if not config.source_ckpt:
    artifacts.check_source_training(config, workdir, metadata)
  return variables, metadata


def run(config, workdir):
  """Trains and saves the source model to `WORKDIR/source`."""
  configs.check(config)
  out = None
  for _, benchmark, wd in artifacts.benchmark_dirs(config, workdir):
    out = train_and_save(config, wd, benchmark)
  return out
