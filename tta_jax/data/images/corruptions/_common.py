"""What the corruption families share: static matrices and traced helpers.

Static helpers are numpy, evaluated at trace time for the static image size:
linear operators that do not depend on the key become small matrices, and
whatever changes with the severity is stacked over the five severities, so
that the severity is traced and one program serves all of them. Traced
helpers act on one image x: [H, W, C] float32; `s` is the traced 0-based
severity. Also the input checks, the per-example key derivation and the
`Source` mapping shared by the public functions.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

CORRUPTION_SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIZE = 8
# ITU-R BT.601 luma weights (cv2 RGB2GRAY, JFIF Y).
_LUMA = (0.299, 0.587, 0.114)


# ---------------------------------------------------------------------------
# Static helpers (numpy, evaluated at trace time for the static image size).

# scipy.ndimage boundary modes -> numpy/jnp.pad modes.
_PAD_MODE = {'nearest': 'edge', 'reflect': 'symmetric', 'mirror': 'reflect'}


@functools.cache
def _gaussian_matrix(n: int, sigma: float, mode: str, truncate: float):
  """scipy.ndimage.gaussian_filter1d along an axis of length n: [n, n]."""
  if sigma <= 0:
    return np.eye(n)
  radius = int(truncate * sigma + 0.5)
  t = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (t / sigma) ** 2)
  k /= k.sum()
  src = np.pad(np.arange(n), radius, mode=_PAD_MODE[mode])
  m = np.zeros((n, n))
  for o in range(n):
    np.add.at(m[o], src[o : o + 2 * radius + 1], k)
  return m


def _gaussian_stack(n, sigmas, mode, truncate):
  return np.stack([_gaussian_matrix(n, s, mode, truncate) for s in sigmas])


@functools.cache
def _zoom_params(n: int, zooms: tuple) -> np.ndarray:
  """make_cifar_c.py `clipped_zoom` along an axis, as [len(zooms), 4] rows
  (top, crop, trim, scale): crop the central ceil(n / zoom) pixels at top,
  resize them with scipy.ndimage.zoom (order 1, grid_mode=False) to
  round(crop zoom) and keep n from trim on; output o samples the input at
  top + (o + trim) scale. Integer parts in float64 numpy, like the
  reference."""
  rows = []
  for zoom in zooms:
    crop = int(np.ceil(n / zoom))
    zoomed = int(round(crop * zoom))
    scale = (crop - 1) / (zoomed - 1) if zoomed > 1 else 0.0
    rows.append(((n - crop) // 2, crop, (zoomed - n) // 2, scale))
  return np.array(rows)


def _clipped_zoom_matrix(n: int, zoom: float) -> np.ndarray:
  """One `clipped_zoom` along an axis as an [n, n] numpy matrix."""
  return np.asarray(_zoom_matrices(n, jnp.asarray(_zoom_params(n, (zoom,)))))[0]


def _magick_weights(radius_sigma) -> np.ndarray:
  """[5, width] ImageMagick motion-blur weights per severity (zero-padded).

  MotionBlurImage averages width = 2 ceil(radius) + 1 pixels along a ray
  with weights exp(-i^2 / 2 sigma^2), normalised (MagickCore/effect.c).
  """
  widths = [int(2 * math.ceil(r) + 1) for r, _ in radius_sigma]
  out = np.zeros((len(widths), max(widths)))
  for s, ((_, sigma), width) in enumerate(
    zip(radius_sigma, widths, strict=True)
  ):
    k = np.exp(-(np.arange(width) ** 2) / (2.0 * sigma**2))
    out[s, :width] = k / k.sum()
  return out


# ---------------------------------------------------------------------------
# Traced helpers on one image x: [H, W, C] float32; `s` is the traced
# 0-based severity.


def _pick(table, s):
  return jnp.asarray(np.asarray(table, np.float32))[s]


def _uniforms(key, *shapes):
  """One uniform [0, 1) draw, cut into `shapes` (one PRNG call compiles
  much faster than several)."""
  sizes = [math.prod(s) for s in shapes]
  u = jax.random.uniform(key, (sum(sizes),))
  parts = jnp.split(u, np.cumsum(sizes)[:-1])
  return [p.reshape(s) for p, s in zip(parts, shapes, strict=True)]


def _matmul(rows, x, cols):
  """rows @ x @ cols.T over the spatial axes of x [H, W, C]."""
  return jnp.einsum(
    'ih,hwc,jw->ijc',
    jnp.asarray(rows, jnp.float32),
    x,
    jnp.asarray(cols, jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )


def _gaussian_filter(x, sigma, *, mode, truncate=4.0):
  """scipy.ndimage.gaussian_filter (static sigma) over x's spatial axes."""
  h, w = x.shape[:2]
  return _matmul(
    _gaussian_matrix(h, sigma, mode, truncate),
    x,
    _gaussian_matrix(w, sigma, mode, truncate),
  )


def _zoom_matrices(n, params):
  """[..., n, n] linear-interpolation matrices from `_zoom_params` rows."""
  top, crop, trim, scale = (params[..., i, None] for i in range(4))
  coord = jnp.clip((jnp.arange(n) + trim) * scale, 0, jnp.maximum(crop - 1, 0))
  lo = jnp.floor(coord)
  frac = coord - lo
  hi = jnp.minimum(lo + 1, jnp.maximum(crop - 1, 0))
  cols = jnp.arange(n)
  m = (1 - frac[..., None]) * ((top + lo)[..., None] == cols)
  m = m + frac[..., None] * ((top + hi)[..., None] == cols)
  return m * (crop > 0)[..., None]  # crop = 0 pads a list of zooms


def _shift_matrices(offsets, n, *, clamp):
  """One-hot [T, n, n] matrices S_t with (S_t @ v)[r] = v[r + offsets[t]].

  Outside [0, n) the index is clamped (edge pixels) or the row is zero.
  """
  src = jnp.arange(n)[None, :] + offsets[:, None]
  if clamp:
    src = jnp.clip(src, 0, n - 1)
  return (src[..., None] == jnp.arange(n)).astype(jnp.float32)


def _motion_blur_magick(x, weights, angle_deg):
  """ImageMagick MotionBlurImage (MagickCore/effect.c), edge virtual pixels.

  out(p) = sum_i weights_i x(p + offset_i), with the ray offsets rounded as
  ImageMagick does: (ceil(i cos(angle) - .5), ceil(i sin(angle) - .5)).
  Each tap is a pair of one-hot shift matrices (cheap to compile and run).
  """
  i = np.arange(weights.shape[-1])
  a = jnp.deg2rad(angle_deg)
  dx = jnp.ceil(i * jnp.cos(a) - 0.5).astype(jnp.int32)
  dy = jnp.ceil(i * jnp.sin(a) - 0.5).astype(jnp.int32)
  rows = _shift_matrices(dy, x.shape[0], clamp=True) * weights[:, None, None]
  cols = _shift_matrices(dx, x.shape[1], clamp=True)
  return jnp.einsum(
    'trh,hwc,tsw->rsc', rows, x, cols, precision=jax.lax.Precision.HIGHEST
  )


def _gray(x):
  """[H, W, 1] luma (cv2.COLOR_RGB2GRAY) of RGB, or x itself if 1 channel."""
  if x.shape[-1] == 1:
    return x
  return jnp.tensordot(x, jnp.asarray(_LUMA, x.dtype), axes=1)[..., None]


# ---------------------------------------------------------------------------
# Input checks, per-example keys and the `Source` mapping.


def _check_severity(severity, valid=CORRUPTION_SEVERITIES):
  if isinstance(severity, bool) or severity not in valid:
    raise ValueError(f'severity must be one of {valid}, got {severity!r}')


def _check_images(images, channels=(1, 3)):
  shape = np.shape(images)
  if len(shape) != 4:
    raise ValueError(f'images must be [N, H, W, C], got shape {shape}')
  if shape[-1] not in channels:
    raise ValueError(f'images must have C in {channels}, got shape {shape}')
  if min(shape[1:3]) < MIN_SIZE:
    raise ValueError(f'images must be at least {MIN_SIZE}x{MIN_SIZE}: {shape}')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
      f'images must be floating point in [0, 1], got dtype {images.dtype}'
    )


def _check_indices(images, indices):
  if np.shape(indices) != (np.shape(images)[0],):
    raise ValueError(
      f'indices must have shape [N] = {(np.shape(images)[0],)}, got'
      f' {np.shape(indices)}'
    )


# Keys are derived in their own small programs, compiled once per batch size
# and shared by every family and severity (the stream id is traced).
@jax.jit
def _index_keys(seed, stream_id, indices):
  base = jax.random.fold_in(jax.random.PRNGKey(seed), stream_id)
  return jax.vmap(jax.random.fold_in, (None, 0))(base, indices)


@jax.jit
def _position_keys(key, positions):
  return jax.vmap(jax.random.fold_in, (None, 0))(key, positions)


def _map_images(fn):
  def mapped(batch, indices):
    out = dict(batch)
    out['image'] = np.asarray(
      fn(np.asarray(batch['image'], np.float32), indices)
    )
    return out

  return mapped
