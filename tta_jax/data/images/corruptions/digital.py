"""Digital families: brightness, contrast, elastic_transform, pixelate,
jpeg_compression."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy import ndimage

from tta_jax.data.images.corruptions._common import (
  _gaussian_stack,
  _matmul,
  _pick,
  _uniforms,
)

# Severity tables from make_cifar_c.py (CIFAR-10-C, 32 px).
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_ELASTIC = (  # fractions of the image size: alpha, sigma, affine jitter
  (0, 0, 0.08),
  (0.05, 0.2, 0.07),
  (0.08, 0.06, 0.06),
  (0.1, 0.04, 0.05),
  (0.1, 0.03, 0.03),
)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # resize factor
_JPEG_QUALITY = (80, 65, 58, 50, 40)
# JPEG standard tables (ITU-T T.81 Annex K.1), row-major 8x8.
_JPEG_LUMA_TABLE = np.array(
  [
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
  ],
  np.float64,
)
_JPEG_CHROMA_TABLE = np.full((8, 8), 99.0)
_JPEG_CHROMA_TABLE[:4, :4] = [
  [17, 18, 24, 47],
  [18, 21, 26, 66],
  [24, 26, 56, 99],
  [47, 66, 99, 99],
]


# ---------------------------------------------------------------------------
# Static helpers of pixelate (PIL BOX resize) and jpeg_compression.


@functools.cache
def _pil_box_matrix(n_in: int, n_out: int) -> np.ndarray:
  """PIL `Image.resize(..., BOX)` along one axis as an [n_out, n_in] matrix.

  Pillow's `precompute_coeffs` (libImaging/Resample.c) with the box filter
  (support 0.5, value 1 on (-0.5, 0.5]).
  """
  scale = n_in / n_out
  filterscale = max(scale, 1.0)
  support = 0.5 * filterscale
  m = np.zeros((n_out, n_in))
  for xx in range(n_out):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), n_in)
    for x in range(xmin, xmax):
      u = (x - center + 0.5) / filterscale
      m[xx, x] = 1.0 if -0.5 < u <= 0.5 else 0.0
    m[xx] /= m[xx].sum()
  return m


@functools.cache
def _pixelate_matrices(n: int) -> np.ndarray:
  """[5, n, n]: BOX down to int(n factor), then BOX back up to n."""
  return np.stack(
    [
      _pil_box_matrix(int(n * f), n) @ _pil_box_matrix(n, int(n * f))
      for f in _PIXELATE
    ]
  )


@functools.cache
def _dct_matrix() -> np.ndarray:
  """Orthonormal 8-point DCT-II matrix D (coefficients = D @ block @ D.T)."""
  k, n = np.meshgrid(np.arange(8), np.arange(8), indexing='ij')
  d = np.cos((2 * n + 1) * k * np.pi / 16) * np.sqrt(2 / 8)
  d[0] /= np.sqrt(2)
  return d


@functools.cache
def _jpeg_tables(chroma: bool) -> np.ndarray:
  """[5, 8, 8] libjpeg `jpeg_set_quality(q, force_baseline=TRUE)` tables."""
  base = _JPEG_CHROMA_TABLE if chroma else _JPEG_LUMA_TABLE
  tables = []
  for quality in _JPEG_QUALITY:
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    tables.append(np.clip(np.floor((base * scale + 50) / 100), 1, 255))
  return np.stack(tables)


@functools.cache
def _fancy_upsample_matrix(n_small: int) -> np.ndarray:
  """libjpeg h2v2 "fancy" (triangle) upsampling along an axis: [2n, n]."""
  m = np.zeros((2 * n_small, n_small))
  for i in range(n_small):
    m[2 * i, i] += 0.75
    m[2 * i, max(i - 1, 0)] += 0.25
    m[2 * i + 1, i] += 0.75
    m[2 * i + 1, min(i + 1, n_small - 1)] += 0.25
  return m


# ---------------------------------------------------------------------------
# The families: fn(x [H, W, C] float32, key, s) -> [H, W, C], s the
# traced severity - 1 (clipping to [0, 1] happens once, in `registry._apply`).


def _brightness(x, key, s):
  del key
  c = _pick(_BRIGHTNESS, s)
  v = x.max(axis=-1, keepdims=True)
  v_new = jnp.clip(v + c, 0, 1)
  safe = jnp.where(v > 0, v, 1.0)
  return jnp.where(v > 0, x * (v_new / safe), v_new)


def _contrast(x, key, s):
  del key
  c = _pick(_CONTRAST, s)
  means = x.mean(axis=(0, 1), keepdims=True)
  return (x - means) * c + means


def _elastic_transform(x, key, s):
  h, w, c = x.shape
  size = float(min(h, w))  # the reference's IMSIZE
  alpha, sigmas, jitter = (
    np.array(column) * size for column in zip(*_ELASTIC, strict=True)
  )
  alpha, jitter = _pick(alpha, s), _pick(jitter, s)
  u_affine, u_dx, u_dy = _uniforms(key, (3, 2), (h, w, 1), (h, w, 1))
  # Random affine (cv2.getAffineTransform + warpAffine, bilinear, border
  # reflect-101): three points around the centre, each moved by U(+-jitter).
  cx, cy, sq = w // 2, h // 2, min(h, w) // 3
  src = np.array([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]])
  dst = src + jitter * (2 * u_affine - 1)
  # M (2x3) with M [x, y, 1]^T = dst; warpAffine samples at M^-1(out).
  m = jnp.asarray(np.linalg.inv(np.c_[src, np.ones(3)]), jnp.float32) @ dst
  (ra, rc), (rb, rd), (tx, ty) = m[0], m[1], m[2]  # x' = ra x + rb y + tx
  det = ra * rd - rb * rc
  yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij')
  px, py = xx - tx, yy - ty
  sx, sy = (rd * px - rb * py) / det, (-rc * px + ra * py) / det

  def sample(img, rows, cols, mode):
    one = lambda ch: ndimage.map_coordinates(ch, [rows, cols], 1, mode=mode)
    return jax.vmap(one, in_axes=-1, out_axes=-1)(img)

  x = sample(x, sy, sx, 'mirror')
  # Elastic field: uniform noise smoothed by scipy's Gaussian (mode
  # 'reflect', truncate 3), times alpha; scipy map_coordinates, order 1.
  smooth_h = _pick(_gaussian_stack(h, tuple(sigmas), 'reflect', 3.0), s)
  smooth_w = _pick(_gaussian_stack(w, tuple(sigmas), 'reflect', 3.0), s)
  dx = alpha * _matmul(smooth_h, 2 * u_dx - 1, smooth_w)[..., 0]
  dy = alpha * _matmul(smooth_h, 2 * u_dy - 1, smooth_w)[..., 0]
  return sample(x, yy + dy, xx + dx, 'reflect')


def _pixelate(x, key, s):
  del key
  h, w = x.shape[:2]
  return _matmul(
    _pick(_pixelate_matrices(h), s), x, _pick(_pixelate_matrices(w), s)
  )


def _jpeg_plane(plane, table):
  """Quantises one [h, w] plane (multiples of 8) of 0-255 samples."""
  h, w = plane.shape
  d = jnp.asarray(_dct_matrix(), jnp.float32)
  q = jnp.asarray(table, jnp.float32)
  blocks = (plane - 128.0).reshape(h // 8, 8, w // 8, 8).transpose(0, 2, 1, 3)
  hi = jax.lax.Precision.HIGHEST
  coef = jnp.einsum('ki,abij,lj->abkl', d, blocks, d, precision=hi)
  coef = jnp.sign(coef) * jnp.floor(jnp.abs(coef) / q + 0.5) * q
  rec = jnp.einsum('ki,abkl,lj->abij', d, coef, d, precision=hi) + 128.0
  rec = rec.transpose(0, 2, 1, 3).reshape(h, w)
  return jnp.clip(jnp.round(rec), 0, 255)


def _jpeg_compression(x, key, s):
  del key
  h, w, c = x.shape
  x = jnp.round(jnp.clip(x, 0, 1) * 255)  # the reference encodes uint8
  luma_table = _pick(_jpeg_tables(chroma=False), s)
  if c == 1:
    plane = jnp.pad(x[..., 0], ((0, -h % 8), (0, -w % 8)), mode='edge')
    return (_jpeg_plane(plane, luma_table)[:h, :w] / 255)[..., None]
  # JFIF RGB -> YCbCr; 4:2:0 MCUs are 16x16, edge-padded.
  r, g, b = (x[..., i] for i in range(3))
  ycc = (
    0.299 * r + 0.587 * g + 0.114 * b,
    -0.168736 * r - 0.331264 * g + 0.5 * b + 128,
    0.5 * r - 0.418688 * g - 0.081312 * b + 128,
  )
  hp, wp = h + -h % 16, w + -w % 16
  y, cb, cr = (
    jnp.pad(jnp.round(p), ((0, hp - h), (0, wp - w)), mode='edge') for p in ycc
  )
  y = _jpeg_plane(y, luma_table)
  chroma_table = _pick(_jpeg_tables(chroma=True), s)
  up_rows = _fancy_upsample_matrix(hp // 2)
  up_cols = _fancy_upsample_matrix(wp // 2)
  chroma = []
  for p in (cb, cr):
    small = p.reshape(hp // 2, 2, wp // 2, 2).mean(axis=(1, 3))
    small = _jpeg_plane(small, chroma_table)
    chroma.append(_matmul(up_rows, small[..., None], up_cols)[..., 0] - 128)
  cb, cr = chroma
  rgb = jnp.stack(
    [y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1
  )
  return jnp.clip(jnp.round(rgb[:h, :w]), 0, 255) / 255
