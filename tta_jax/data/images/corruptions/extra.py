"""The four validation corruptions: speckle_noise, gaussian_blur, spatter,
saturate (the "extra" set released beside the 15, for selection)."""

import jax
import jax.numpy as jnp

from tta_jax.data.images.corruptions._common import (
  _LUMA,
  _gaussian_stack,
  _gray,
  _matmul,
  _pick,
)

# Severity tables from make_cifar_c.py (CIFAR-10-C, 32 px).
_SPECKLE_NOISE = (0.06, 0.1, 0.12, 0.16, 0.2)  # multiplicative noise std
_GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)  # sigma
_SPATTER = (  # loc, scale, sigma, threshold, mask sigma, mud (1) / water (0)
  (0.62, 0.1, 0.7, 0.7, 0.5, 0),
  (0.65, 0.1, 0.8, 0.7, 0.5, 0),
  (0.65, 0.3, 1, 0.69, 0.5, 0),
  (0.65, 0.1, 0.7, 0.69, 0.6, 1),
  (0.65, 0.1, 0.5, 0.68, 0.6, 1),
)
_MUD = (63 / 255, 42 / 255, 20 / 255)
_SATURATE = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))  # S c0 + c1


# ---------------------------------------------------------------------------
# The families: fn(x [H, W, C] float32, key, s) -> [H, W, C], s the
# traced severity - 1 (clipping to [0, 1] happens once, in `registry._apply`).


def _speckle_noise(x, key, s):
  c = _pick(_SPECKLE_NOISE, s)
  return x + x * c * jax.random.normal(key, x.shape)


def _gaussian_blur(x, key, s):
  del key
  h, w = x.shape[:2]
  # skimage.filters.gaussian: mode 'nearest', truncate 4, per channel.
  return _matmul(
    _pick(_gaussian_stack(h, _GAUSSIAN_BLUR, 'nearest', 4.0), s),
    x,
    _pick(_gaussian_stack(w, _GAUSSIAN_BLUR, 'nearest', 4.0), s),
  )


def _spatter(x, key, s):
  # Mud (severities 4-5): a thresholded blurred Gaussian field masks the
  # image and paints it mud-brown (its luma on one channel).
  h, w, c = x.shape
  loc, scale, sigma, threshold, mask_sigma, _ = zip(*_SPATTER, strict=True)
  liquid = _pick(loc, s) + _pick(scale, s) * jax.random.normal(key, (h, w, 1))
  liquid = _matmul(
    _pick(_gaussian_stack(h, sigma, 'nearest', 4.0), s),
    liquid,
    _pick(_gaussian_stack(w, sigma, 'nearest', 4.0), s),
  )
  t = _pick(threshold, s)
  mask = jnp.where(liquid > t, 1.0, 0.0)  # the zeroing below t is implied
  mask = _matmul(
    _pick(_gaussian_stack(h, mask_sigma, 'nearest', 4.0), s),
    mask,
    _pick(_gaussian_stack(w, mask_sigma, 'nearest', 4.0), s),
  )
  mask = jnp.where(mask < 0.8, 0.0, mask)
  mud = jnp.asarray(_MUD, jnp.float32)
  if c == 1:
    mud = jnp.dot(mud, jnp.asarray(_LUMA, jnp.float32))[None]
  return x * (1 - mask) + mud * mask


def _saturate(x, key, s):
  # skimage's RGB->HSV->RGB with S' = clip(S c0 + c1, 0, 1): every channel
  # is V (1 - S k) with k set by the hue alone, so x' = V - (V - x) S' / S.
  # A grey pixel (S = 0) has hue 0 (red): (V, V (1 - S'), V (1 - S')).
  # One channel goes through RGB and back to its luma (a tint only dims it).
  del key
  c0, c1 = (_pick(col, s) for col in zip(*_SATURATE, strict=True))
  rgb = jnp.repeat(x, 3, -1) if x.shape[-1] == 1 else x
  v = rgb.max(-1, keepdims=True)
  sat = jnp.where(
    v > 0, (v - rgb.min(-1, keepdims=True)) / jnp.where(v > 0, v, 1), 0
  )
  new = jnp.clip(sat * c0 + c1, 0, 1)
  grey = v * jnp.concatenate([jnp.ones_like(v), 1 - new, 1 - new], -1)
  scaled = v - (v - rgb) * new / jnp.where(sat > 0, sat, 1)
  out = jnp.where(sat > 0, scaled, grey)
  return _gray(out) if x.shape[-1] == 1 else out
