"""Weather families: snow, frost, fog (and the plasma fractal behind them)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax.data.images.corruptions._common import (
  _gaussian_filter,
  _gray,
  _magick_weights,
  _matmul,
  _motion_blur_magick,
  _pick,
  _shift_matrices,
  _uniforms,
  _zoom_matrices,
  _zoom_params,
)

# Severity tables from make_cifar_c.py (CIFAR-10-C, 32 px).
_SNOW = (  # loc, scale, zoom, threshold, blur radius, blur sigma, blend
  (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
  (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
  (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
  (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
  (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
)
_FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))
_FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))


# ---------------------------------------------------------------------------
# The plasma fractal (make_cifar_c.py `plasma_fractal`) behind frost and fog.


def _fractal_size(h: int, w: int) -> int:
  # A power of two covering the image; 32 as in make_cifar_c.py at least.
  return max(32, 1 << (max(h, w) - 1).bit_length())


def _diamond_square(noise, mapsize, xp):
  """Unnormalised make_cifar_c.py `plasma_fractal` from noise [..., K].

  K = mapsize**2 - 1 noise values, already scaled (the reference's
  `wibble * uniform(-wibble, wibble)`), consumed level by level: square
  centres, then the two kinds of edge midpoints. The reference's strided
  writes are rewritten as interleaving: at each level every new point is
  the mean of its 4 (wrapping) neighbours plus noise. Linear in the noise;
  `xp` is numpy or jax.numpy.
  """
  batch = noise.shape[:-1]
  m = xp.zeros(batch + (1, 1))
  used = 0
  while m.shape[-1] < mapsize:
    n = m.shape[-1]
    level = noise[..., used : used + 3 * n * n].reshape(batch + (3, n, n))
    used += 3 * n * n
    sq = m + xp.roll(m, -1, -2)
    sq = (sq + xp.roll(sq, -1, -1)) / 4 + level[..., 0, :, :]
    # Midpoints between horizontal / vertical neighbours.
    mid_h = sq + xp.roll(sq, 1, -2) + m + xp.roll(m, -1, -1)
    mid_h = mid_h / 4 + level[..., 1, :, :]
    mid_v = sq + xp.roll(sq, 1, -1) + m + xp.roll(m, -1, -2)
    mid_v = mid_v / 4 + level[..., 2, :, :]
    even = xp.stack([m, mid_h], -1).reshape(batch + (n, 2 * n))
    odd = xp.stack([mid_v, sq], -1).reshape(batch + (n, 2 * n))
    m = xp.stack([even, odd], -2).reshape(batch + (2 * n, 2 * n))
  return m


@functools.cache
def _noise_levels(mapsize: int) -> np.ndarray:
  """[mapsize**2 - 1] recursion level of each noise value (wibble / decay^l)."""
  sizes = 3 * 4 ** np.arange(int(np.log2(mapsize)))
  return np.repeat(np.arange(len(sizes)), sizes)


@functools.cache
def _diamond_square_matrix(mapsize: int) -> np.ndarray:
  """[mapsize**2, mapsize**2 - 1] matrix of the linear `_diamond_square`."""
  k = mapsize * mapsize - 1
  m = _diamond_square(np.eye(k), mapsize, np)
  return m.reshape(k, mapsize * mapsize).T.astype(np.float32)


# Up to this map size the diamond-square recursion is one static matrix
# (4 MB at 32), which compiles much faster than the recursion.
_PLASMA_MATRIX_MAX = 32


def _plasma_fractal(u, mapsize, wibbledecay):
  """make_cifar_c.py `plasma_fractal(mapsize, wibbledecay)` from
  mapsize**2 - 1 uniforms [0, 1); [mapsize, mapsize] values in [0, 1].

  Level l adds uniform(-w_l, w_l) w_l with w_l = 100 / wibbledecay^l; the
  decay may be traced.
  """
  wibble = 100.0 / wibbledecay ** jnp.asarray(_noise_levels(mapsize))
  noise = wibble**2 * (2 * u - 1)
  if mapsize <= _PLASMA_MATRIX_MAX:
    a = jnp.asarray(_diamond_square_matrix(mapsize))
    m = jnp.dot(a, noise, precision=jax.lax.Precision.HIGHEST)
    m = m.reshape(mapsize, mapsize)
  else:
    m = _diamond_square(noise, mapsize, jnp)
  m = m - m.min()
  return m / m.max()


# ---------------------------------------------------------------------------
# The families: fn(x [H, W, C] float32, key, s) -> [H, W, C], s the
# traced severity - 1 (clipping to [0, 1] happens once, in `registry._apply`).


def _snow(x, key, s):
  loc, scale, _, threshold, _, _, blend = (
    _pick(column, s) for column in zip(*_SNOW, strict=True)
  )
  h, w = x.shape[:2]
  u_flakes, u_angle = _uniforms(key, (2, h, w, 1), ())
  # Box-Muller normal draws.
  radius_u = jnp.sqrt(-2 * jnp.log1p(-u_flakes[0]))
  flakes = loc + scale * radius_u * jnp.cos(2 * jnp.pi * u_flakes[1])
  zooms = tuple(c[2] for c in _SNOW)
  flakes = _matmul(
    _zoom_matrices(h, _pick(_zoom_params(h, zooms), s)[None])[0],
    flakes,
    _zoom_matrices(w, _pick(_zoom_params(w, zooms), s)[None])[0],
  )
  flakes = jnp.where(flakes < threshold, 0.0, flakes)
  flakes = jnp.floor(jnp.clip(flakes, 0, 1) * 255) / 255  # PIL 'L' image
  weights = _pick(_magick_weights([c[4:6] for c in _SNOW]), s)
  flakes = _motion_blur_magick(flakes, weights, -135 + 90 * u_angle)
  x = blend * x + (1 - blend) * jnp.maximum(x, _gray(x) * 1.5 + 0.5)
  return x + flakes + flakes[::-1, ::-1]


_FROST_ANGLES = 6


def _frost_texture(key, h, w, channels):
  """Procedural stand-in for the frost photographs, [H, W, C] in [0, 1].

  A plasma-fractal haze plus crystal needles: sparse random seeds, denser
  where the haze is bright (frost grows in patches), each drawn out into a
  tapered line along one of six random orientations. The needle length and
  seed density scale with the image, so the mean (~0.55) does not.
  """
  size = _fractal_size(h, w)
  u_haze, u_seed, u_amp, u_group, u_angle = _uniforms(
    key, (size * size - 1,), (h, w), (h, w), (h, w), (_FROST_ANGLES,)
  )
  haze = _plasma_fractal(u_haze, size, 1.7)[:h, :w]
  length = max(2, round(min(h, w) / 10))
  density = 0.25 / (0.7 * (length + 1)) * (0.25 + 1.5 * haze**2)
  seeds = jnp.where(u_seed < density, 0.4 + 0.6 * u_amp, 0.0)
  group = jnp.floor(u_group * _FROST_ANGLES)
  seeds = jnp.stack([seeds * (group == g) for g in range(_FROST_ANGLES)])
  t = np.arange(-length, length + 1)
  taper = jnp.asarray(1 - np.abs(t) / (length + 1), jnp.float32)
  a = u_angle[:, None] * jnp.pi  # [G, 1]
  dy = jnp.round(t * jnp.sin(a)).astype(jnp.int32)  # [G, T]
  dx = jnp.round(t * jnp.cos(a)).astype(jnp.int32)
  rows = jax.vmap(lambda d: _shift_matrices(d, h, clamp=False))(dy)
  cols = jax.vmap(lambda d: _shift_matrices(d, w, clamp=False))(dx)
  needles = jnp.einsum(
    'gtrh,ghw,gtsw->rs',
    rows * taper[:, None, None],
    seeds,
    cols,
    precision=jax.lax.Precision.HIGHEST,
  )
  tex = jnp.clip(0.25 + 0.45 * haze + 0.6 * needles, 0, 1)[..., None]
  tex = _gaussian_filter(tex, 0.5, mode='nearest')
  if channels == 3:
    tex = tex * jnp.asarray([0.85, 0.93, 1.0])  # pale blue ice
  return tex


def _frost(x, key, s):
  c_img, c_frost = (_pick(column, s) for column in zip(*_FROST, strict=True))
  h, w, c = x.shape
  return c_img * x + c_frost * _frost_texture(key, h, w, c)


def _fog(x, key, s):
  amount, decay = (_pick(column, s) for column in zip(*_FOG, strict=True))
  h, w = x.shape[:2]
  size = _fractal_size(h, w)
  plasma = _plasma_fractal(
    jax.random.uniform(key, (size * size - 1,)), size, decay
  )
  max_val = x.max()
  x = x + amount * plasma[:h, :w, None]
  return x * max_val / (max_val + amount)
