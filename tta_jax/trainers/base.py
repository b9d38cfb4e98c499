"""What a trainer gets and returns.

A trainer learns something before test time (a meta-trained backbone, a
generator, a learned optimiser, prompt context vectors) from labelled
source data. It is a function `TrainContext -> TrainResult`: everything it
may use arrives as an explicit field (the model, the data, its own
hyperparameters, a seed, where to checkpoint and cache); it never reads an
experiment config or works out a runner's directory layout. The runner
saves the result where the adaptation runner finds it.
"""

import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from absl import logging


class TrainContext(NamedTuple):
  """The inputs of an image-classifier trainer."""

  # The model: its config (`{'name': ..., **kwargs}`, plain data, as
  # `models.build` takes it), the built module, its `ApplyFn`, and the
  # trained source variables the trainer starts from.
  model_config: Mapping[str, Any]
  module: Any
  apply_fn: Callable
  variables: Any
  input_shape: tuple[int, ...]  # (H, W, C)
  num_classes: int
  # Labelled source domains (train parts, >= 1) and their validation parts
  # (model selection; maybe empty).
  source_domains: list
  val_domains: list
  # Labelled shifted domains disjoint from the test stream (the validation
  # stream's shifts of source-val data), for trainers that learn from or
  # select on shifted data; empty where the benchmark has none.
  shifted_domains: list
  hparams: Any  # the trainer's own settings (a ConfigDict, read-only)
  # The method's keyword arguments at test time (`from_config` minus the
  # runner's keys), so training and adaptation build the same adapter.
  method_kwargs: Mapping[str, Any]
  # The source-training recipe (epochs, batch size, learning rate, ...),
  # for trainers that train backbones of their own.
  source_recipe: Mapping[str, Any]
  seed: int  # numpy data order
  rng: Any  # jax key for initialisation and sampling
  checkpointer: Any  # checkpoint.StateCheckpointer: resume a long loop
  # Where artifacts shared between trainers and runs may be cached
  # (GeneralizeFormer's meta-source backbones); None: no cache.
  cache_dir: pathlib.Path | None
  log_every: int  # steps between progress lines (0: none)


class TrainResult(NamedTuple):
  """What a trainer returns; the runner saves it."""

  meta: Any = None  # meta-parameters for `step(meta=...)`, or None
  variables: Any = None  # a trained backbone replacing the source, or None
  model: dict | None = None  # its model config, if it differs
  metrics: dict = {}  # final scalars (losses, validation accuracy)


def log_progress(
  name: str, done: int, total: int, metrics, seconds: float, hint: str
) -> dict[str, float]:
  """Logs a meta-trainer's metrics; a non-finite one stops training.

  Returns the metrics as floats. `hint` says what to change when a metric
  is not finite.
  """
  metrics = {k: float(v) for k, v in metrics.items()}
  if not all(math.isfinite(v) for v in metrics.values()):
    raise FloatingPointError(
      f'{name}: non-finite meta-training metrics at step {done}: '
      f'{metrics}; {hint}'
    )
  logging.info('%s step %d/%d: %s (%.1fs)', name, done, total, metrics, seconds)
  return metrics
