"""Orbax checkpoints of variables and adaptation states.

Typed PRNG keys are stored as their key data and re-wrapped on restore, so
an `AdaptState` (or any pytree holding keys) round-trips exactly.
"""

import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


class _DropOrbaxInfo(logging.Filter):
  """Orbax logs every save step at INFO; keep its warnings only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or 'orbax' not in record.pathname


def quiet_orbax() -> None:
  """Silences orbax's per-save INFO lines (idempotent)."""
  for handler in (
    logging.getLogger().handlers + logging.getLogger('absl').handlers
  ):
    if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
      handler.addFilter(_DropOrbaxInfo())
  absl_logger = logging.getLogger('absl')
  if not any(isinstance(f, _DropOrbaxInfo) for f in absl_logger.filters):
    absl_logger.addFilter(_DropOrbaxInfo())


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_storable(tree: Any) -> Any:
  """Replaces typed PRNG keys by their uint32 key data."""
  return jax.tree.map(
    lambda x: jax.random.key_data(x) if _is_key(x) else x, tree
  )


def from_storable(tree: Any, like: Any) -> Any:
  """Inverse of `to_storable`, given a tree with the original structure."""

  def restore(x, ref):
    if _is_key(ref):
      return jax.random.wrap_key_data(
        jnp.asarray(x), impl=jax.random.key_impl(ref)
      )
    return x

  return jax.tree.map(restore, tree, like)


def _abstract(tree):
  return jax.tree.map(
    lambda x: (
      jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
      if not hasattr(x, 'sharding')
      else jax.ShapeDtypeStruct(x.shape, x.dtype)
    ),
    to_storable(tree),
  )


class StateCheckpointer:
  """Periodic checkpoints of a pytree (state + host records) in a directory.

  A thin wrapper over `ocp.CheckpointManager` that keeps the latest
  `max_to_keep` steps, writes synchronously-safe (orbax commits atomically),
  and restores into the structure of a template.
  """

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
    quiet_orbax()
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True
      ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(to_storable(tree)))
    self.manager.wait_until_finished()

  def restore(self, template: Any, step: int | None = None) -> Any:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    restored = self.manager.restore(
      step, args=ocp.args.StandardRestore(_abstract(template))
    )
    return from_storable(restored, template)

  def close(self) -> None:
    self.manager.close()


def save_variables(
  directory: str | pathlib.Path, variables: Any, metadata: dict
) -> None:
  """Saves model variables and a JSON metadata file (architecture, errors)."""
  quiet_orbax()
  directory = pathlib.Path(directory).absolute()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory / 'variables', variables, force=True)
  ckptr.wait_until_finished()
  (directory / 'metadata.json').write_text(json.dumps(metadata, indent=2))


def load_metadata(directory: str | pathlib.Path) -> dict | None:
  path = pathlib.Path(directory) / 'metadata.json'
  return json.loads(path.read_text()) if path.exists() else None


def load_variables(directory: str | pathlib.Path, template: Any) -> Any:
  """Restores variables saved by `save_variables` into `template`'s shapes."""
  directory = pathlib.Path(directory).absolute()
  ckptr = ocp.StandardCheckpointer()
  return ckptr.restore(directory / 'variables', _abstract(template))


def has_variables(directory: str | pathlib.Path) -> bool:
  d = pathlib.Path(directory)
  return (d / 'variables').exists() and (d / 'metadata.json').exists()


def model_metadata(model_config, input_shape, num_classes: int) -> dict:
  """What identifies a model's architecture, stored beside its variables."""
  return {
    'model': _normal(dict(model_config)),
    'input_shape': list(input_shape),
    'num_classes': num_classes,
  }


def _normal(x):
  """JSON round trip: tuples and lists (ConfigDict vs metadata) compare."""
  return json.loads(json.dumps(x.to_dict() if hasattr(x, 'to_dict') else x))


def check_metadata(found: dict, expected: dict, where) -> None:
  """Fails clearly when a checkpoint holds another architecture."""
  for key in ('model', 'input_shape', 'num_classes'):
    if _normal(found.get(key)) != _normal(expected[key]):
      raise ValueError(
        f'the checkpoint in {where} was trained with {key}='
        f'{found.get(key)!r}, but the config asks for {expected[key]!r}. '
        'Use another --workdir, or set config.source_ckpt to a matching '
        'checkpoint.'
      )
