"""Helpers shared by the runners: models from configs, source checkpoints."""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging

from tta_jax import models
from tta_jax._src import checkpoint
from tta_jax.data import benchmarks


def model_kwargs(model_config: Mapping[str, Any]) -> dict[str, Any]:
  kwargs = dict(model_config)
  kwargs.pop('name')
  return kwargs


def build_model(model_config, benchmark: benchmarks.Benchmark):
  """`(module, apply_fn)` for the config's model on the benchmark's data."""
  module = models.build(
    model_config['name'],
    num_classes=benchmark.num_classes,
    **model_kwargs(model_config),
  )
  return module, models.make_apply_fn(module, benchmark.input_shape)


def model_metadata(model_config, benchmark) -> dict[str, Any]:
  return {
    'model': _normal(dict(model_config)),
    'input_shape': list(benchmark.input_shape),
    'num_classes': benchmark.num_classes,
  }


def _normal(x):
  """JSON round trip: tuples and lists (ConfigDict vs metadata) compare."""
  return json.loads(json.dumps(x.to_dict() if hasattr(x, 'to_dict') else x))


def check_metadata(found: dict, expected: dict, where) -> None:
  """Fails clearly when a checkpoint holds another architecture."""
  for key in ('model', 'input_shape', 'num_classes'):
    if _normal(found.get(key)) != _normal(expected[key]):
      raise ValueError(
        f'the source checkpoint in {where} was trained with {key}='
        f'{found.get(key)!r}, but the config asks for {expected[key]!r}. '
        'Use another --workdir, or set config.source_ckpt to a matching '
        'checkpoint.'
      )


def source_dir(config, workdir) -> pathlib.Path:
  if config.source_ckpt:
    return pathlib.Path(config.source_ckpt)
  return pathlib.Path(workdir) / 'source'


def load_source(config, workdir, benchmark, module, *, pretrain_if_missing):
  """The source variables: loaded, or pretrained first where possible."""
  directory = source_dir(config, workdir)
  expected = model_metadata(config.model, benchmark)
  if not checkpoint.has_variables(directory):
    if config.source_ckpt:
      raise FileNotFoundError(
        f'config.source_ckpt={config.source_ckpt!r} holds no checkpoint '
        '(expected variables/ and metadata.json written by pretrain_main)'
      )
    if not pretrain_if_missing or benchmark.source_train is None:
      raise FileNotFoundError(
        f'no source checkpoint in {directory}; run experiments.pretrain_main '
        'first or set config.source_ckpt'
      )
    from tta_jax.runners import pretrain

    logging.info('No source checkpoint in %s: pretraining first.', directory)
    pretrain.train_and_save(config, pathlib.Path(workdir), benchmark)
  metadata = checkpoint.load_metadata(directory)
  check_metadata(metadata, expected, directory)
  template = models.init_variables(
    module, benchmark.input_shape, jax.random.key(0)
  )
  variables = checkpoint.load_variables(directory, template)
  return variables, metadata
