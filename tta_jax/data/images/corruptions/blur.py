"""Blur families: defocus_blur, glass_blur, motion_blur, zoom_blur."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax.data.images.corruptions._common import (
  _gaussian_stack,
  _magick_weights,
  _matmul,
  _motion_blur_magick,
  _pick,
  _zoom_matrices,
  _zoom_params,
)

# Severity tables from make_cifar_c.py (CIFAR-10-C, 32 px).
_DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))
_GLASS_BLUR = (  # (sigma, max_delta, iterations)
  (0.05, 1, 1),
  (0.25, 1, 1),
  (0.4, 1, 1),
  (0.25, 1, 2),
  (0.4, 1, 2),
)
_MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # radius, sigma
_ZOOM_BLUR = (0.06, 0.11, 0.16, 0.21, 0.26)  # np.arange(1, 1 + c, 0.01)


# ---------------------------------------------------------------------------
# Static helpers.


@functools.cache
def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
  """make_cifar_c.py `disk`: an aliased disk smoothed by cv2.GaussianBlur."""
  if radius <= 8:
    grid, ksize = np.arange(-8, 9), 3
  else:
    grid, ksize = np.arange(-radius, radius + 1), 5
  xx, yy = np.meshgrid(grid, grid)
  disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
  disk /= disk.sum()
  # cv2.getGaussianKernel(ksize, sigma), applied separably; the disk sits
  # well inside its grid, so cv2's reflect-101 border never matters.
  t = np.arange(ksize) - (ksize - 1) / 2
  g = np.exp(-(t**2) / (2 * alias_blur**2))
  g /= g.sum()
  out = np.zeros_like(disk)
  padded = np.pad(disk, ksize // 2)
  n = disk.shape[0]
  for i in range(ksize):
    for j in range(ksize):
      out += g[i] * g[j] * padded[i : i + n, j : j + n]
  return out


@functools.cache
def _defocus_kernels() -> np.ndarray:
  """[5, k, k] disk kernels, trimmed to their common (numerical) support."""
  kernels = np.stack([_disk_kernel(*c) for c in _DEFOCUS_BLUR])
  n = kernels.shape[-1]
  nz = np.flatnonzero(kernels.sum((0, 1)) > 1e-12)
  r = int(max(abs(nz[0] - n // 2), abs(nz[-1] - n // 2)))
  return kernels[:, n // 2 - r : n // 2 + r + 1, n // 2 - r : n // 2 + r + 1]


@functools.cache
def _zoom_blur_params(n: int) -> np.ndarray:
  """[5, Z, 4] `_zoom_params` of every zoom blur severity, padded with
  crop = 0 (an all-zero matrix) to the longest list of zoom factors."""
  lists = [tuple(np.arange(1, 1 + c, 0.01)) for c in _ZOOM_BLUR]
  longest = max(map(len, lists))
  out = np.zeros((len(lists), longest, 4))
  for s, zooms in enumerate(lists):
    out[s, : len(zooms)] = _zoom_params(n, zooms)
  return out


# ---------------------------------------------------------------------------
# The families: fn(x [H, W, C] float32, key, s) -> [H, W, C], s the
# traced severity - 1 (clipping to [0, 1] happens once, in `registry._apply`).


def _defocus_blur(x, key, s):
  del key
  kernel = _pick(_defocus_kernels(), s)
  k = kernel.shape[0]
  h, w = x.shape[:2]
  # cv2.filter2D's default border, reflect-101.
  xp = jnp.pad(x, ((k // 2,) * 2, (k // 2,) * 2, (0, 0)), mode='reflect')
  out = 0.0
  for i in range(k):
    for j in range(k):
      out = out + kernel[i, j] * xp[i : i + h, j : j + w]
  return out


def _glass_blur(x, key, s):
  h, w, c = x.shape
  sigmas, deltas, iterations = zip(*_GLASS_BLUR, strict=True)
  (delta,) = set(deltas)  # 1 at every severity
  blur_h = _pick(_gaussian_stack(h, sigmas, 'nearest', 4.0), s)
  blur_w = _pick(_gaussian_stack(w, sigmas, 'nearest', 4.0), s)
  # skimage.filters.gaussian (mode 'nearest', truncate 4), then np.uint8.
  x = jnp.floor(_matmul(blur_h, jnp.clip(x, 0, 1), blur_w) * 255) / 255
  # The reference "swaps" x[h, w] with a neighbour at
  # np.random.randint(-delta, delta) (high exclusive: up or left), looping
  # bottom-right to top-left. On its [H, W, 3] arrays the tuple swap of two
  # numpy views copies the neighbour into x[h, w] and leaves the neighbour
  # unchanged (numpy/numpy#14428); every neighbour is visited later in the
  # loop, so one iteration is the parallel gather out[p] = in[p + d_p].
  inside = np.zeros((h, w), bool)
  inside[delta + 1 : h - delta + 1, delta + 1 : w - delta + 1] = True
  passes = max(iterations)
  d = jax.random.randint(key, (passes, h, w, 2), -delta, delta)
  rows, cols = np.mgrid[:h, :w]
  for i in range(passes):
    moved = x[
      jnp.where(inside, rows + d[i, ..., 0], rows),
      jnp.where(inside, cols + d[i, ..., 1], cols),
    ]
    x = jnp.where(i < _pick(iterations, s), moved, x)
  return _matmul(blur_h, x, blur_w)


def _motion_blur(x, key, s):
  angle = jax.random.uniform(key, (), minval=-45, maxval=45)
  return _motion_blur_magick(x, _pick(_magick_weights(_MOTION_BLUR), s), angle)


def _zoom_blur(x, key, s):
  del key
  h, w = x.shape[:2]
  params_h = _pick(_zoom_blur_params(h), s)
  params_w = _pick(_zoom_blur_params(w), s)
  zoomed = jnp.einsum(
    'zih,hwc,zjw->ijc',
    _zoom_matrices(h, params_h),
    x,
    _zoom_matrices(w, params_w),
    precision=jax.lax.Precision.HIGHEST,
  )
  count = jnp.sum(params_h[:, 1] > 0)
  return (x + zoomed) / (count + 1)
