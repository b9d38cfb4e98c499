"""Helpers for tests: a tiny BN net, fake batches, tree comparisons."""

import contextlib
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax import models

TINY_SHAPE = (8, 8, 1)
TINY_CLASSES = 5


def tiny_bn_net(seed: int = 0, num_classes: int = TINY_CLASSES):
  """A 4-conv BN net on 8x8x1 images: `(module, apply_fn, variables)`.

  Its BN statistics are randomised (not the init 0/1), so source-mode and
  batch-mode forwards differ, as they do for a trained model. Cached per
  seed; the returned dict is a fresh shallow copy.
  """
  module, variables = _tiny_bn_net(seed, num_classes)
  return module, models.make_apply_fn(module, TINY_SHAPE), dict(variables)


@functools.lru_cache(maxsize=8)
def _tiny_bn_net(seed: int, num_classes: int):
  rng = jax.random.key(seed)
  module = models.build('digits_cnn', num_classes=num_classes, width=4)
  variables = models.init_variables(module, TINY_SHAPE, rng)
  r = np.random.default_rng(seed)

  def randomise(path, leaf):
    if path[-1].key == 'mean':
      return jnp.asarray(0.1 * r.normal(size=leaf.shape), jnp.float32)
    return jnp.asarray(r.uniform(0.5, 2.0, size=leaf.shape), jnp.float32)

  variables['batch_stats'] = jax.tree_util.tree_map_with_path(
    randomise, variables['batch_stats']
  )
  return module, variables


def fake_batch(
  rng: int = 0,
  batch_size: int = 16,
  *,
  shape=TINY_SHAPE,
  num_classes: int = TINY_CLASSES,
  labels: bool = True,
  mask=None,
) -> dict[str, Any]:
  """A batch of uniform images in [0, 1] (numpy), optionally labelled."""
  r = np.random.default_rng(rng)
  batch = {'image': r.uniform(size=(batch_size, *shape)).astype(np.float32)}
  if labels:
    batch['label'] = r.integers(0, num_classes, batch_size).astype(np.int32)
  if mask is not None:
    batch['mask'] = np.asarray(mask, bool)
  return batch


def stack_batches(batches):
  """Stacks a list of batch dicts along a new leading (time) axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def trees_equal(a, b) -> bool:
  """Bitwise equality of two pytrees (structure and values)."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
    np.array_equal(_host(x), _host(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _host(x):
  if jnp.issubdtype(getattr(x, 'dtype', np.float32), jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def copy_tree(tree):
  """A fresh copy of every array (so donation cannot delete the original)."""
  return jax.tree.map(jnp.copy, tree)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  """Same structure, close values (PRNG keys compared by their data)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(_host(x), _host(y), rtol=rtol, atol=atol)


@contextlib.contextmanager
def compilations():
  """Yields a list that collects the XLA compilations inside the block.

  Each entry is JAX's log message for one compiled program, so an empty
  list means every call reused a program compiled before the block.
  """
  messages = []
  handler = logging.Handler(logging.DEBUG)
  handler.emit = lambda r: messages.append(r.getMessage())
  logger = logging.getLogger('jax')
  logger.addHandler(handler)
  try:
    with jax.log_compiles():
      yield messages
  finally:
    logger.removeHandler(handler)
  messages[:] = [m for m in messages if 'Compiling' in m]
