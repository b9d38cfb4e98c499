"""Besides corruptions: rotations (DomainBed's Rotated MNIST) and colour
shifts (a coloured variant of digits), with their lazy `Source` wrappers."""

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

from tta_jax.data import sources
from tta_jax.data.images.corruptions._common import (
  _check_images,
  _check_indices,
  _check_severity,
  _index_keys,
  _map_images,
)

# Rotated MNIST domains in DomainBed (`domainbed/datasets.py`, RotatedMNIST).
ROTATIONS = (0, 15, 30, 45, 60, 75)
COLOR_SHIFT_SEVERITIES = (1, 2, 3, 4, 5)
# The `corruption_id` folded into the seed for `color_shift`; the 15
# corruptions use their position in CORRUPTIONS.
COLOR_SHIFT_ID = 100


# ---------------------------------------------------------------------------
# Rotations.


@jax.jit
def _rotate(images, degrees):
  n, h, w, c = images.shape
  theta = jnp.deg2rad(jnp.broadcast_to(degrees, (n,)).astype(jnp.float32))
  yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij')
  dy, dx = yy - (h - 1) / 2, xx - (w - 1) / 2

  def one(img, t):
    # Counter-clockwise on screen (rows grow downwards): out(p) = in(R^-1 p).
    cos, sin = jnp.cos(t), jnp.sin(t)
    rows = (h - 1) / 2 + sin * dx + cos * dy
    cols = (w - 1) / 2 + cos * dx - sin * dy
    return jnp.stack(
      [
        ndimage.map_coordinates(img[..., i], [rows, cols], order=1, cval=0.0)
        for i in range(c)
      ],
      -1,
    )

  out = jax.vmap(one)(images.astype(jnp.float32), theta)
  return jnp.clip(out, 0, 1).astype(images.dtype)


def rotate(images, degrees) -> jax.Array:
  """Rotates images counter-clockwise about their centre.

  Bilinear interpolation, zero fill outside the image, as torchvision's
  `rotate(x, angle, fill=0, interpolation=BILINEAR)` in DomainBed's Rotated
  MNIST, and scipy.ndimage.rotate(reshape=False, order=1).

  Args:
    images: [N, H, W, C] floats.
    degrees: a scalar or [N] angles in degrees (traced: no recompilation).

  Returns:
    [N, H, W, C] rotated images, clipped to [0, 1], dtype kept.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f'images must be [N, H, W, C], got {images.shape}')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'images must be floating point, got {images.dtype}')
  degrees = jnp.asarray(degrees, jnp.float32)
  if degrees.ndim > 1 or (degrees.ndim == 1 and len(degrees) != len(images)):
    raise ValueError(
      f'degrees must be a scalar or [N={len(images)}], got {degrees.shape}'
    )
  return _rotate(images, degrees)


# ---------------------------------------------------------------------------
# Colour shifts.


def to_rgb(images) -> jax.Array:
  """Repeats a single channel three times; RGB passes through unchanged."""
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be [N, H, W, 1 or 3], got {images.shape}')
  return jnp.broadcast_to(images, images.shape[:-1] + (3,))


def _hue_to_rgb(hue):
  """Fully saturated, full-value RGB of hues in [0, 1): [..., 3]."""
  k = (jnp.asarray([5.0, 3.0, 1.0]) + hue[..., None] * 6) % 6
  return 1 - jnp.clip(jnp.minimum(k, 4 - k), 0, 1)


@jax.jit
def _color_shift(images, keys, alpha):
  def one(img, key):
    hue, gap = jax.random.uniform(key, (2,))
    gap = (1 + gap) / 3  # U[1/3, 2/3]
    fg = (1 - alpha) + alpha * _hue_to_rgb(hue)
    bg = alpha * 0.5 * _hue_to_rgb((hue + gap) % 1)
    return bg + (fg - bg) * img

  out = jax.vmap(one)(to_rgb(images).astype(jnp.float32), keys)
  return jnp.clip(out, 0, 1).astype(images.dtype)


def color_shift(images, severity: int, seed: int, indices) -> jax.Array:
  """A coloured, 3-channel variant of (digit) images, keyed by index.

  Each example draws a hue h ~ U[0, 1) and a gap g ~ U[1/3, 2/3] from
  `fold_in(fold_in(PRNGKey(seed), COLOR_SHIFT_ID), index)`. With strength
  a = severity / 5, the foreground colour is F = (1 - a) white + a rgb(h)
  and the background colour B = a/2 rgb(h + g) (rgb = full saturation and
  value; the background hue is at least a third of the wheel away), and
  every channel is mapped `out = B + (F - B) x`. A white-on-black digit
  becomes an F digit on a B background; an RGB image gets a per-channel
  affine colour cast. At a = 0 it would be the identity (for RGB input).

  Args:
    images: [N, H, W, C] floats in [0, 1], C in {1, 3} (1 is tiled to 3).
    severity: one of COLOR_SHIFT_SEVERITIES.
    seed: integer seed.
    indices: [N] global indices of the examples.

  Returns:
    [N, H, W, 3] images in [0, 1], with the dtype of `images`.
  """
  _check_severity(severity, COLOR_SHIFT_SEVERITIES)
  images = jnp.asarray(images)
  _check_images(images)
  _check_indices(images, indices)
  keys = _index_keys(
    jnp.asarray(seed, jnp.int32),
    COLOR_SHIFT_ID,
    jnp.asarray(indices, jnp.int32),
  )
  # The strength is traced: one program serves every severity.
  alpha = jnp.float32(severity / len(COLOR_SHIFT_SEVERITIES))
  return _color_shift(images, keys, alpha)


# ---------------------------------------------------------------------------
# Lazy `Source` wrappers.


def rotated_source(
  source: sources.Source, degrees: float
) -> sources.MappedSource:
  """`source` with every image rotated by `degrees` (counter-clockwise)."""
  degrees = float(degrees)
  return sources.MappedSource(
    source, _map_images(lambda images, indices: rotate(images, degrees))
  )


def color_shifted_source(
  source: sources.Source, severity: int, seed: int
) -> sources.MappedSource:
  """`source` with images coloured by `color_shift` (always 3 channels)."""
  _check_severity(severity, COLOR_SHIFT_SEVERITIES)
  return sources.MappedSource(
    source,
    _map_images(
      lambda images, indices: color_shift(images, severity, seed, indices)
    ),
  )
