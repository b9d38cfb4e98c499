"""Source training from a config: the model every method starts from.

`run(config, workdir)` trains the source model of every benchmark the
config names (`trainers.source`, the recipe in `config.pretrain`) into
`WORKDIR[/dg/<held_out>]/source` with its metadata (architecture, clean
errors). `ensure_source` is how the other runners ask for a source model:
it trains one only where none exists yet and the config names no
`source_ckpt`.
"""

import pathlib

from absl import logging

from tta_jax._src import checkpoint
from tta_jax.data import benchmarks
from tta_jax.runners import artifacts
from tta_jax.trainers import source


def train(config, benchmark: benchmarks.Benchmark, workdir):
  """Trains the source model; returns `(variables, metadata)`."""
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
  _, apply_fn = artifacts.build_model(config.model, benchmark)
  metadata = artifacts.model_metadata(config.model, benchmark)
  for split in ('source_val', 'clean_test'):
    src = getattr(benchmark, split)
    if src is not None:
      metadata[f'{split}_error'] = source.evaluate(apply_fn, variables, src)
  metadata['train_seconds'] = info['train_seconds']
  metadata['epochs'] = info['epochs']
  return variables, metadata


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
  """`(variables, metadata)` of the source model, training it if missing."""
  if not artifacts.has_source(config, workdir) and not config.source_ckpt:
    if benchmark.source_train is not None:
      logging.info(
        'No source checkpoint in %s: pretraining first.',
        artifacts.source_dir(config, workdir),
      )
      train_and_save(config, workdir, benchmark)
  return artifacts.load_source(config, workdir, benchmark, module)


def run(config, workdir):
  """Trains and saves the source model to `WORKDIR/source`."""
  out = None
  for _, benchmark, wd in artifacts.benchmark_dirs(config, workdir):
    out = train_and_save(config, wd, benchmark)
  return out
