"""The corruption names, their families and severities, and the public
functions applying a corruption by name (`corrupt`, `corrupt_indexed`,
`corrupted_source`)."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax.data import sources
from tta_jax.data.images.corruptions._common import (
  CORRUPTION_SEVERITIES,
  _check_images,
  _check_indices,
  _check_severity,
  _index_keys,
  _map_images,
  _position_keys,
)
from tta_jax.data.images.corruptions.blur import (
  _defocus_blur,
  _glass_blur,
  _motion_blur,
  _zoom_blur,
)
from tta_jax.data.images.corruptions.digital import (
  _brightness,
  _contrast,
  _elastic_transform,
  _jpeg_compression,
  _pixelate,
)
from tta_jax.data.images.corruptions.extra import (
  _gaussian_blur,
  _saturate,
  _spatter,
  _speckle_noise,
)
from tta_jax.data.images.corruptions.noise import (
  _gaussian_noise,
  _impulse_noise,
  _shot_noise,
)
from tta_jax.data.images.corruptions.weather import _fog, _frost, _snow

# In the standard ImageNet-C order.
CORRUPTIONS = (
  'gaussian_noise',
  'shot_noise',
  'impulse_noise',
  'defocus_blur',
  'glass_blur',
  'motion_blur',
  'zoom_blur',
  'snow',
  'frost',
  'fog',
  'brightness',
  'contrast',
  'elastic_transform',
  'pixelate',
  'jpeg_compression',
)
# The four held-out "extra" corruptions released beside them, for model and
# hyperparameter selection (disjoint from the 15 test families).
VALIDATION_CORRUPTIONS = (
  'speckle_noise',
  'gaussian_blur',
  'spatter',
  'saturate',
)
ALL_CORRUPTIONS = CORRUPTIONS + VALIDATION_CORRUPTIONS
# Families with fewer severities here (see the package docstring).
_SEVERITIES = {'spatter': (4, 5)}
# Families whose output does not depend on the key.
DETERMINISTIC_CORRUPTIONS = frozenset(
  {
    'defocus_blur',
    'zoom_blur',
    'brightness',
    'contrast',
    'pixelate',
    'jpeg_compression',
    'gaussian_blur',
    'saturate',
  }
)


# Every family by name, in `ALL_CORRUPTIONS` order.
_FAMILIES: dict[str, Callable] = {
  'gaussian_noise': _gaussian_noise,
  'shot_noise': _shot_noise,
  'impulse_noise': _impulse_noise,
  'defocus_blur': _defocus_blur,
  'glass_blur': _glass_blur,
  'motion_blur': _motion_blur,
  'zoom_blur': _zoom_blur,
  'snow': _snow,
  'frost': _frost,
  'fog': _fog,
  'brightness': _brightness,
  'contrast': _contrast,
  'elastic_transform': _elastic_transform,
  'pixelate': _pixelate,
  'jpeg_compression': _jpeg_compression,
  'speckle_noise': _speckle_noise,
  'gaussian_blur': _gaussian_blur,
  'spatter': _spatter,
  'saturate': _saturate,
}
assert tuple(_FAMILIES) == ALL_CORRUPTIONS


# ---------------------------------------------------------------------------
# Public API.


def _check_name(name):
  if name not in _FAMILIES:
    raise ValueError(
      f'unknown corruption {name!r}; valid names: {", ".join(ALL_CORRUPTIONS)}'
    )


def _severities(name):
  return _SEVERITIES.get(name, CORRUPTION_SEVERITIES)


def _severity_index(severity, n, name):
  """[n] int32 severity - 1 from an int or [n] ints in 1..5 (concrete)."""
  valid = _severities(name)
  if np.ndim(severity) == 0:
    _check_severity(severity, valid)
    return jnp.full((n,), int(severity) - 1, jnp.int32)
  values = np.asarray(severity)
  if (
    values.shape != (n,)
    or not np.issubdtype(values.dtype, np.integer)
    or not np.isin(values, valid).all()
  ):
    raise ValueError(
      f'severity must be one of {valid} or [N={n}] of them, got {severity!r}'
    )
  return jnp.asarray(values - 1, jnp.int32)


@functools.partial(jax.jit, static_argnames=('name',))
def _apply(images, keys, severity_index, *, name):
  out = jax.vmap(_FAMILIES[name])(
    images.astype(jnp.float32), keys, severity_index
  )
  return jnp.clip(out, 0, 1).astype(images.dtype)


def corrupt(images, name: str, severity: int, key: jax.Array) -> jax.Array:
  """Corrupts a batch; example i is keyed by `fold_in(key, i)`.

  The output depends on where an example sits in the batch; use
  `corrupt_indexed` for batch-independent corruption of a dataset.

  Args:
    images: [N, H, W, C] floats in [0, 1], C in {1, 3}, H, W >= 8.
    name: one of ALL_CORRUPTIONS.
    severity: one of CORRUPTION_SEVERITIES, or [N] of them (per example).
    key: a PRNG key.

  Returns:
    [N, H, W, C] corrupted images in [0, 1], with the dtype of `images`.
  """
  _check_name(name)
  images = jnp.asarray(images)
  _check_images(images)
  n = images.shape[0]
  severity_index = _severity_index(severity, n, name)
  keys = _position_keys(key, jnp.arange(n))
  return _apply(images, keys, severity_index, name=name)


def corrupt_indexed(
  images, name: str, severity: int, seed: int, indices
) -> jax.Array:
  """Corrupts a batch with per-example keys derived from global indices.

  Example i uses `fold_in(fold_in(PRNGKey(seed), ALL_CORRUPTIONS.index(name)),
  indices[i])`, so its pixels are the same whatever batch it comes in.
  Compiled once per (name, shape): the severity, `seed` and `indices` are
  traced.

  Args:
    images: [N, H, W, C] floats in [0, 1], C in {1, 3}, H, W >= 8.
    name: one of ALL_CORRUPTIONS.
    severity: one of CORRUPTION_SEVERITIES, or [N] of them (per example).
    seed: integer seed of the corrupted dataset.
    indices: [N] integer global indices of the examples.

  Returns:
    [N, H, W, C] corrupted images in [0, 1], with the dtype of `images`.
  """
  _check_name(name)
  images = jnp.asarray(images)
  _check_images(images)
  _check_indices(images, indices)
  severity_index = _severity_index(severity, images.shape[0], name)
  keys = _index_keys(
    jnp.asarray(seed, jnp.int32),
    ALL_CORRUPTIONS.index(name),
    jnp.asarray(indices, jnp.int32),
  )
  return _apply(images, keys, severity_index, name=name)


def corrupted_source(
  source: sources.Source, name: str, severity: int, seed: int
) -> sources.MappedSource:
  """`source` with images corrupted lazily, keyed by global example index."""
  _check_name(name)
  _check_severity(severity, _severities(name))
  return sources.MappedSource(
    source,
    _map_images(
      lambda images, indices: corrupt_indexed(
        images, name, severity, seed, indices
      )
    ),
  )
