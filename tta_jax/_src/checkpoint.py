"""Orbax checkpoints of variables and adaptation states.

Typed PRNG keys are stored as their key data and re-wrapped on restore, so
an `AdaptState` (or any pytree holding keys) round-trips exactly. Orbax
cannot save zero-size arrays (an adapter state may hold one, e.g. the empty
memory of MGG's memory-less ablation): `StateCheckpointer` stores each as a
one-element placeholder and restores the template's empty array.
"""

import hashlib
import json
import logging
import os
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
  # With several processes (jax.distributed), orbax restores only into
  # explicit shardings: each process reads the whole array onto its first
  # local device.
  local = (
    jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if jax.process_count() > 1
    else None
  )
  return jax.tree.map(
    lambda x: (
      jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=local)
      if not hasattr(x, 'sharding')
      else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local)
    ),
    to_storable(tree),
  )


def _without_empty(tree: Any) -> Any:
  """Zero-size arrays -> one zero of their dtype (orbax cannot save them)."""
  return jax.tree.map(
    lambda x: np.zeros((1,), np.asarray(x).dtype) if np.size(x) == 0 else x,
    tree,
  )


def _with_empty(tree: Any, like: Any) -> Any:
  """Inverse of `_without_empty`: the template's zero-size arrays back."""
  return jax.tree.map(
    lambda x, ref: (
      jnp.zeros(np.shape(ref), ref.dtype)
      if not _is_key(ref) and np.size(ref) == 0
      else x
    ),
    tree,
    like,
  )


def digest(tree: Any) -> str:
  """SHA-256 of a pytree's leaves (dtype, shape and bytes, in tree order)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(to_storable(tree)):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{a.dtype}{a.shape}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def write_atomically(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


class StateCheckpointer:
  """Periodic checkpoints of a pytree (state + host records) in a directory.

  A thin wrapper over `ocp.CheckpointManager` that keeps the latest
  `max_to_keep` steps and restores into the structure of a template. Saves
  are synchronous and atomic (orbax writes a temporary directory and renames
  it; one left by an interrupted save is removed on the next start), and
  each step's SHA-256 is written beside it: `restore_latest` verifies it
  and falls back, with a warning, to the newest intact step when a step is
  damaged or truncated.
  """

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 2):
    quiet_orbax()
    self.directory = pathlib.Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=False,
      ),
    )
    self._sums = self.directory / 'checksums'

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, tree: Any) -> None:
    storable = _without_empty(to_storable(tree))
    self.manager.save(step, args=ocp.args.StandardSave(storable))
    self.manager.wait_until_finished()
    self._sums.mkdir(exist_ok=True)
    write_atomically(self._sums / f'{step}.sha256', digest(storable))
    kept = {str(s) for s in self.manager.all_steps()}
    for path in self._sums.glob('*.sha256'):
      if path.stem not in kept:
        path.unlink(missing_ok=True)

  def _verified(self, step: int, template: Any) -> Any:
    """The step restored into `template`, or ValueError if it is damaged."""
    path = self._sums / f'{step}.sha256'
    if not path.exists():
      raise ValueError('it has no checksum, so it cannot be verified')
    abstract = _abstract(_without_empty(to_storable(template)))
    restored = self.manager.restore(
      step, args=ocp.args.StandardRestore(abstract)
    )
    if digest(restored) != path.read_text().strip():
      raise ValueError('its contents do not match its checksum')
    return _with_empty(from_storable(restored, template), template)

  def restore(self, template: Any, step: int | None = None) -> Any:
    """Step `step` (default: the latest), verified; raises if damaged."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    try:
      return self._verified(step, template)
    except Exception as e:  # noqa: BLE001 - orbax/TensorStore errors vary
      raise ValueError(
        f'checkpoint step {step} in {self.directory} is damaged: {e}'
      ) from e

  def restore_latest(self, template: Any) -> tuple[int | None, Any]:
    """`(step, tree)` of the newest intact step; `(None, None)` if none.

    A damaged or truncated step is skipped with a warning and deleted, so
    the run resumes from the step before it and can save past it again.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return step, self._verified(step, template)
      except Exception as e:  # noqa: BLE001 - orbax/TensorStore errors vary
        logging.warning(
          'Checkpoint step %d in %s is not used: %s; trying an earlier one',
          step,
          self.directory,
          str(e).splitlines()[0][:200],
        )
        self.manager.delete(step)
    return None, None

  def close(self) -> None:
    self.manager.close()


def save_variables(
  directory: str | pathlib.Path, variables: Any, metadata: dict
) -> None:
  """Saves model variables and a JSON metadata file (architecture, errors,
  and the variables' SHA-256, which `load_variables` verifies)."""
  quiet_orbax()
  directory = pathlib.Path(directory).absolute()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(directory / 'variables', variables, force=True)
  ckptr.wait_until_finished()
  metadata = {**metadata, 'variables_sha256': digest(variables)}
  write_atomically(directory / 'metadata.json', json.dumps(metadata, indent=2))


def load_metadata(directory: str | pathlib.Path) -> dict | None:
  path = pathlib.Path(directory) / 'metadata.json'
  return json.loads(path.read_text()) if path.exists() else None


def load_variables(directory: str | pathlib.Path, template: Any) -> Any:
  """Restores variables saved by `save_variables` into `template`'s shapes.

  Raises ValueError when they do not match the checksum in
  `metadata.json` (a damaged or truncated checkpoint is never used).
  """
  directory = pathlib.Path(directory).absolute()
  ckptr = ocp.StandardCheckpointer()
  try:
    variables = ckptr.restore(directory / 'variables', _abstract(template))
  except Exception as e:  # noqa: BLE001 - orbax/TensorStore errors vary
    raise ValueError(
      f'the checkpoint in {directory} is damaged or truncated '
      f'({str(e).splitlines()[0][:200]}); delete it to make it again'
    ) from e
  expected = (load_metadata(directory) or {}).get('variables_sha256')
  if expected is not None and digest(variables) != expected:
    raise ValueError(
      f'the checkpoint in {directory} is damaged: its variables do not '
      'match the checksum in its metadata.json; delete it to make it again'
    )
  return variables


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
  """JSON round trip: tuples and lists (ConfigDict vs metadata) compare;
  ConfigDicts nested in plain dicts are plain dicts too."""
  return json.loads(json.dumps(x, default=_config_to_dict))


def _config_to_dict(o):
  if hasattr(o, 'to_dict'):
    return o.to_dict()
  raise TypeError(f'{type(o).__name__} in a model config is not JSON data')


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
