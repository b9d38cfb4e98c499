"""Device-side, keyed image augmentations for test-time adaptation.

Two families, both pure JAX (jittable, vmappable, deterministic per key) on
float images in [0, 1]:

* `cotta_augment`: CoTTA's `get_tta_transforms` (colour jitter with gamma in
  a random order, edge padding, random affine, Gaussian blur, centre crop,
  horizontal flip, Gaussian noise), acting on a whole `[B, H, W, C]` batch.
  Like the official code, one random transform is drawn per call and shared
  by the batch (`per_example=True` draws one per image). RoTTA reuses it.
* `augmix` / `memo_augment`: AugMix (Hendrycks et al., 2020) with the op list
  that avoids ImageNet-C's corruptions, on top of MEMO's pre-augmentation
  (random crop or random-resized crop, then a flip), on a single `[H, W, C]`
  image; `vmap` it over keys to make a stack of views.

Randomness that touches individual rows is keyed by the row index
(`fold_in(key, i)`), so a batch padded with extra rows augments its real rows
exactly as the unpadded batch does.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------------------
# Sampling helpers.


def _bilinear(image, ys, xs, *, fill=0.0, mode='zeros'):
  """Bilinear samples of `image` [H, W, C] at index-space `ys`, `xs` [h, w].

  Pixel centres sit at integer coordinates. `mode`: 'zeros' treats every
  neighbour outside the image as `fill` (torch `grid_sample`, zero padding);
  'pil' clamps neighbours to the edge and gives `fill` to points outside the
  image area (PIL's bilinear transform); 'clamp' clamps neighbours (resize).
  """
  h, w = image.shape[:2]
  y0 = jnp.floor(ys)
  x0 = jnp.floor(xs)
  wy = (ys - y0)[..., None]
  wx = (xs - x0)[..., None]
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)

  def at(yi, xi):
    v = image[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)]
    if mode == 'zeros':
      inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
      v = jnp.where(inside[..., None], v, fill)
    return v

  top = (1.0 - wx) * at(y0, x0) + wx * at(y0, x0 + 1)
  bottom = (1.0 - wx) * at(y0 + 1, x0) + wx * at(y0 + 1, x0 + 1)
  out = (1.0 - wy) * top + wy * bottom
  if mode == 'pil':
    inside = (ys >= -0.5) & (ys < h - 0.5) & (xs >= -0.5) & (xs < w - 0.5)
    out = jnp.where(inside[..., None], out, fill)
  return out


def _row_keys(key, n):
  return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n))


def _grayscale(image):
  """ITU-R 601-2 luma, torchvision's `rgb_to_grayscale`. [..., 3] -> [...]."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  return 0.2989 * r + 0.587 * g + 0.114 * b


# ---------------------------------------------------------------------------
# CoTTA.


class CottaStrength(NamedTuple):
  """Ranges of CoTTA's random transform (`get_tta_transforms`).

  Ranges are `(low, high)` of a uniform draw. A range fixed at the identity
  value (1 for factors, 0 for shifts) switches that part off.
  """

  brightness: tuple[float, float] = (0.6, 1.4)
  contrast: tuple[float, float] = (0.7, 1.3)
  saturation: tuple[float, float] = (0.5, 1.5)
  hue: tuple[float, float] = (-0.06, 0.06)
  gamma: tuple[float, float] = (0.7, 1.3)
  degrees: tuple[float, float] = (-15.0, 15.0)
  translate: float = 1.0 / 16.0  # fraction of the padded image size
  scale: tuple[float, float] = (0.9, 1.1)
  blur_sigma: tuple[float, float] = (0.001, 0.5)
  hflip_prob: float = 0.5
  noise_std: float = 0.005


# The official CIFAR and ImageNet transforms use the same ranges (only the
# image size differs, which is read from the input here); `soft=True` in the
# official `get_tta_transforms` halves them.
COTTA_STRENGTHS = {
  'cifar': CottaStrength(),
  'imagenet': CottaStrength(),
  'soft': CottaStrength(
    brightness=(0.8, 1.2),
    contrast=(0.85, 1.15),
    saturation=(0.75, 1.25),
    hue=(-0.03, 0.03),
    gamma=(0.85, 1.15),
    degrees=(-8.0, 8.0),
    scale=(0.95, 1.05),
    blur_sigma=(0.001, 0.25),
  ),
  'none': CottaStrength(
    brightness=(1.0, 1.0),
    contrast=(1.0, 1.0),
    saturation=(1.0, 1.0),
    hue=(0.0, 0.0),
    gamma=(1.0, 1.0),
    degrees=(0.0, 0.0),
    translate=0.0,
    scale=(1.0, 1.0),
    blur_sigma=(0.001, 0.001),
    hflip_prob=0.0,
    noise_std=0.0,
  ),
}

_BLUR_SIZE = 5
_BLUR_HALF = _BLUR_SIZE // 2


class _CottaDraw(NamedTuple):
  factors: jax.Array  # [5] brightness, contrast, saturation, hue, gamma
  order: jax.Array  # [5] int: the order the five colour ops are applied in
  angle: jax.Array  # degrees
  shift: jax.Array  # [2] integer (dx, dy) pixels on the padded canvas
  scale: jax.Array
  sigma: jax.Array
  flip: jax.Array  # bool


def _draw_cotta(key, s: CottaStrength, canvas_hw) -> _CottaDraw:
  # One draw of uniforms for everything: each PRNG call costs compile time.
  u = jax.random.uniform(key, (17,))

  def between(v, lohi):
    lo, hi = jnp.asarray(lohi, jnp.float32).T
    return lo + v * (hi - lo)

  # torchvision: max_dx = translate * width, tx = round(U(-max_dx, max_dx)).
  max_shift = s.translate * jnp.asarray(canvas_hw[::-1], jnp.float32)
  return _CottaDraw(
    factors=between(
      u[:5], [s.brightness, s.contrast, s.saturation, s.hue, s.gamma]
    ),
    order=jnp.argsort(u[5:10]),  # a uniformly random permutation
    angle=between(u[10], s.degrees),
    shift=jnp.round(max_shift * (2.0 * u[11:13] - 1.0)),
    scale=between(u[13], s.scale),
    sigma=between(u[14], s.blur_sigma),
    flip=u[15] < s.hflip_prob,
  )


def _rgb_to_hsv(img):
  """torchvision's `_rgb2hsv` on [..., 3] channels-last."""
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc = jnp.max(img, axis=-1)
  minc = jnp.min(img, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / jnp.where(eqc, 1.0, maxc)
  div = jnp.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
  hr = (maxc == r) * (bc - gc)
  hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
  hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
  h = jnp.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return h, s, maxc


def _hsv_to_rgb(h, s, v):
  """torchvision's `_hsv2rgb`; returns [..., 3]."""
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(jnp.int32) % 6
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  r = jnp.choose(i, [v, q, p, p, t, v], mode='clip')
  g = jnp.choose(i, [t, v, v, q, p, p], mode='clip')
  b = jnp.choose(i, [p, p, t, v, v, q], mode='clip')
  return jnp.stack([r, g, b], axis=-1)


def _color_jitter(img, draw: _CottaDraw):
  """ColorJitterPro on one [H, W, C] image, ops in the drawn order.

  Saturation and hue need colour: on one-channel images they are the
  identity (as in torchvision, which returns grayscale images unchanged).
  """
  rgb = img.shape[-1] == 3
  f = draw.factors

  def brightness(x):
    return jnp.clip(f[0] * x, 0.0, 1.0)

  def contrast(x):
    mean = jnp.mean(_grayscale(x) if rgb else x)
    return jnp.clip(f[1] * x + (1.0 - f[1]) * mean, 0.0, 1.0)

  def saturation(x):
    if not rgb:
      return x
    gray = _grayscale(x)[..., None]
    return jnp.clip(f[2] * x + (1.0 - f[2]) * gray, 0.0, 1.0)

  def hue(x):
    if not rgb:
      return x
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb(jnp.mod(h + f[3], 1.0), s, v)

  def gamma(x):
    # The official code clamps to 1e-8 first (NaN gradients at 0).
    return jnp.clip(jnp.clip(x, 1e-8, 1.0) ** f[4], 0.0, 1.0)

  ops = [brightness, contrast, saturation, hue, gamma]
  # A scan over the five stages compiles each op once, not five times.
  img, _ = jax.lax.scan(
    lambda x, i: (jax.lax.switch(i, ops, x), None), img, draw.order
  )
  return img


def _blur_kernel(sigma):
  x = jnp.linspace(-_BLUR_HALF, _BLUR_HALF, _BLUR_SIZE)
  pdf = jnp.exp(-0.5 * jnp.square(x / sigma))
  return pdf / jnp.sum(pdf)


def _cotta_one(image, draw: _CottaDraw, noise_key, noise_std):
  """The whole CoTTA transform on one [H, W, C] image."""
  h, w, _ = image.shape
  ph, pw = h // 2, w // 2
  x = _color_jitter(jnp.clip(image, 0.0, 1.0), draw)
  canvas = jnp.pad(x, ((ph, ph), (pw, pw), (0, 0)), mode='edge')
  ch, cw = h + 2 * ph, w + 2 * pw
  # Only the centre crop survives, so the affine warp is evaluated on the
  # crop plus the blur's reach; the 5x5 blur then needs no padding (its
  # reflect padding in torchvision only touches the canvas border).
  rows = jnp.arange(ph - _BLUR_HALF, ph + h + _BLUR_HALF) - (ch - 1) / 2.0
  cols = jnp.arange(pw - _BLUR_HALF, pw + w + _BLUR_HALF) - (cw - 1) / 2.0
  yy, xx = jnp.meshgrid(rows, cols, indexing='ij')
  # torchvision's inverse affine (centre at the image centre, no shear):
  # source = R(-angle) (p - t) / scale.
  theta = jnp.deg2rad(draw.angle)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  px, py = xx - draw.shift[0], yy - draw.shift[1]
  src_x = (cos * px + sin * py) / draw.scale + (cw - 1) / 2.0
  src_y = (-sin * px + cos * py) / draw.scale + (ch - 1) / 2.0
  warped = _bilinear(canvas, src_y, src_x, fill=0.0, mode='zeros')
  k = _blur_kernel(draw.sigma)
  blurred = sum(k[i] * warped[i : i + h] for i in range(_BLUR_SIZE))
  blurred = sum(k[j] * blurred[:, j : j + w] for j in range(_BLUR_SIZE))
  x = jnp.where(draw.flip, blurred[:, ::-1], blurred)
  x = x + noise_std * jax.random.normal(noise_key, x.shape, x.dtype)
  return jnp.clip(x, 0.0, 1.0)


def cotta_augment(
  key: jax.Array,
  images: jax.Array,
  *,
  strength: str | CottaStrength = 'cifar',
  per_example: bool = False,
) -> jax.Array:
  """CoTTA's test-time augmentation of a batch (`get_tta_transforms`).

  In order: clip to [0, 1]; ColorJitterPro (brightness [0.6, 1.4], contrast
  [0.7, 1.3], saturation [0.5, 1.5], hue +-0.06, gamma [0.7, 1.3], applied
  in a random order); edge-pad by half the image size; RandomAffine (+-15
  degrees, translation up to 1/16 of the padded size in whole pixels, scale
  [0.9, 1.1], bilinear, zero fill); GaussianBlur (5x5, sigma in [0.001,
  0.5]); centre crop back to the input size; horizontal flip with p 0.5;
  Gaussian noise (std 0.005); clip to [0, 1].

  The official code applies the transform to the batch tensor, so one random
  transform is shared by all images of a call (only the noise differs per
  pixel); that is the default. `per_example=True` draws one per image.
  Grayscale images skip saturation and hue. Contrast blends with each
  image's own mean grey level, as torchvision does.

  Args:
    key: a PRNG key.
    images: `[B, H, W, C]` floats in [0, 1], `C` 1 or 3, `H, W >= 4`.
    strength: `'cifar'` and `'imagenet'` (the official ranges, which are the
      same for both), `'soft'` (the official `soft=True` ranges), `'none'`
      (the identity up to float rounding), or a `CottaStrength`.
    per_example: one random transform per image instead of per batch.

  Returns:
    The augmented batch, same shape and dtype, in [0, 1].
  """
  if isinstance(strength, str):
    if strength not in COTTA_STRENGTHS:
      raise ValueError(
        f'unknown CoTTA strength {strength!r}; valid: '
        f'{sorted(COTTA_STRENGTHS)} or a CottaStrength'
      )
    strength = COTTA_STRENGTHS[strength]
  b, h, w, c = images.shape
  if min(h, w) < 2 * _BLUR_HALF or c not in (1, 3):
    raise ValueError(
      f'cotta_augment needs [B, H, W, C] images with H, W >= 4 and C in '
      f'(1, 3); got shape {images.shape}'
    )
  canvas_hw = (h + 2 * (h // 2), w + 2 * (w // 2))
  draw_key, noise_key = jax.random.split(key)
  noise_keys = _row_keys(noise_key, b)
  if per_example:
    draws = jax.vmap(lambda k: _draw_cotta(k, strength, canvas_hw))(
      _row_keys(draw_key, b)
    )
    in_axes = (0, 0, 0, None)
  else:
    draws = _draw_cotta(draw_key, strength, canvas_hw)
    in_axes = (0, None, 0, None)
  out = jax.vmap(_cotta_one, in_axes)(
    images, draws, noise_keys, strength.noise_std
  )
  return out.astype(images.dtype)


# ---------------------------------------------------------------------------
# AugMix (MEMO).

# MEMO's list: AugMix's `augmentations`, without the ops that overlap
# ImageNet-C's corruptions (color, contrast, brightness, sharpness).
AUGMIX_OPS = (
  'autocontrast',
  'equalize',
  'rotate',
  'solarize',
  'shear_x',
  'shear_y',
  'translate_x',
  'translate_y',
  'posterize',
)
_GEOMETRIC = ('rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y')
_MAX_LEVEL = 10.0  # AugMix's PARAMETER_MAX


def _autocontrast(x8):
  """PIL `ImageOps.autocontrast` (cutoff 0) per channel on 0..255 values."""
  lo = jnp.min(x8, axis=(0, 1))
  hi = jnp.max(x8, axis=(0, 1))
  # Exact-arithmetic floor of x * 255/(hi-lo) - lo * 255/(hi-lo).
  scaled = jnp.floor((x8 - lo) * 255.0 / jnp.maximum(hi - lo, 1.0) + 1e-3)
  return jnp.where(hi > lo, jnp.clip(scaled, 0.0, 255.0), x8)


def _equalize_channel(x8):
  """PIL `ImageOps.equalize` on one [H, W] channel of 0..255 values."""
  idx = x8.astype(jnp.int32).ravel()
  hist = jnp.bincount(idx, length=256)
  last = 255 - jnp.argmax(hist[::-1] > 0)
  step = (jnp.sum(hist) - hist[last]) // 255
  lut = (step // 2 + jnp.cumsum(hist) - hist) // jnp.maximum(step, 1)
  lut = jnp.clip(lut, 0, 255).astype(x8.dtype)
  # One grey level gives step 0 as well, so `step > 0` covers PIL's checks.
  return jnp.where(step > 0, lut[idx].reshape(x8.shape), x8)


def _equalize(x8):
  return jax.vmap(_equalize_channel, in_axes=-1, out_axes=-1)(x8)


def _affine_pil(x8, matrix, fill8):
  """PIL `Image.transform(AFFINE, matrix, BILINEAR, fillcolor)`.

  `matrix` = (a, b, c, d, e, f) maps output to input continuous coordinates
  (x_in = a x + b y + c, y_in = d x + e y + f, pixel centres at +0.5).
  """
  h, w = x8.shape[:2]
  a, b, c, d, e, f = matrix
  yy, xx = jnp.meshgrid(jnp.arange(h) + 0.5, jnp.arange(w) + 0.5, indexing='ij')
  src_x = a * xx + b * yy + c - 0.5
  src_y = d * xx + e * yy + f - 0.5
  out = _bilinear(x8, src_y, src_x, fill=fill8, mode='pil')
  return jnp.round(out)


def _augmix_matrix(op, level, sign, hw):
  """The PIL affine matrix of a geometric op (the identity for the others)."""
  h, w = hw
  one, zero = jnp.ones([]), jnp.zeros([])
  # rotate: int(level * 30 / 10) degrees about the centre (PIL's rotate).
  degrees = jnp.floor(level * 30.0 / _MAX_LEVEL) * sign
  rad = -jnp.deg2rad(degrees)
  cos, sin = jnp.cos(rad), jnp.sin(rad)
  cx, cy = w / 2.0, h / 2.0
  rotate = (
    cos,
    sin,
    cx - cos * cx - sin * cy,
    -sin,
    cos,
    cy + sin * cx - cos * cy,
  )
  shear = level * 0.3 / _MAX_LEVEL * sign
  tx = jnp.floor(level * (w / 3.0) / _MAX_LEVEL) * sign
  ty = jnp.floor(level * (h / 3.0) / _MAX_LEVEL) * sign
  matrices = {
    'rotate': rotate,
    'shear_x': (one, shear, zero, zero, one, zero),
    'shear_y': (one, zero, zero, shear, one, zero),
    'translate_x': (one, zero, tx, zero, one, zero),
    'translate_y': (one, zero, zero, zero, one, ty),
  }
  identity = (one, zero, zero, zero, one, zero)
  table = jnp.stack(
    [jnp.stack(matrices.get(name, identity)) for name in AUGMIX_OPS]
  )  # [9, 6]
  return table[op]


def _augmix_op(u, x8, severity, fill8):
  """One uniformly chosen op at a level U(0.1, severity), on 0..255 values.

  `u` holds three uniforms (op, level, sign). Every geometric op is one
  affine warp whose matrix is picked by index, so under `vmap` the warp runs
  once per step rather than once per op.
  """
  n_ops = len(AUGMIX_OPS)
  op = jnp.minimum(jnp.floor(u[0] * n_ops), n_ops - 1).astype(jnp.int32)
  level = 0.1 + u[1] * (severity - 0.1)
  sign = jnp.where(u[2] > 0.5, -1.0, 1.0)
  warped = _affine_pil(x8, _augmix_matrix(op, level, sign, x8.shape[:2]), fill8)
  threshold = 256.0 - jnp.floor(level * 256.0 / _MAX_LEVEL)
  solarized = jnp.where(x8 < threshold, x8, 255.0 - x8)
  bits = 4.0 - jnp.floor(level * 4.0 / _MAX_LEVEL)
  shift = 2.0 ** (8.0 - bits)
  posterized = jnp.floor(x8 / shift) * shift
  candidates = {
    'autocontrast': _autocontrast(x8),
    'equalize': _equalize(x8),
    'solarize': solarized,
    'posterize': posterized,
  }
  out = warped
  for i, name in enumerate(AUGMIX_OPS):
    if name in candidates:
      out = jnp.where(op == i, candidates[name], out)
  return out


def _mixing_weights(key, width, alpha):
  """Dirichlet(alpha) chain weights and the Beta(alpha, alpha) weight m.

  At alpha = 1 (AugMix's and MEMO's value) these are normalised exponentials
  and a uniform, which avoid the gamma sampler's slow-compiling loops.
  """
  if alpha == 1.0:
    u = jax.random.uniform(key, (width + 1,), minval=1e-12)
    e = -jnp.log(u[:width])
    return e / jnp.sum(e), u[width]
  k_w, k_m = jax.random.split(key)
  weights = jax.random.dirichlet(k_w, jnp.full((width,), alpha))
  return weights, jax.random.beta(k_m, alpha, alpha)


def augmix(
  key: jax.Array,
  image: jax.Array,
  *,
  severity: float = 3.0,
  width: int = 3,
  depth: int = -1,
  alpha: float = 1.0,
  fill: float = 0.5,
) -> jax.Array:
  """AugMix of one image (Hendrycks et al., 2020), MEMO's op list.

  `width` chains each apply `depth` ops (uniform in {1, 2, 3} when `depth`
  is -1) drawn uniformly from `AUGMIX_OPS`, each at a level drawn from
  U(0.1, severity) on AugMix's 0..10 scale. The chains are mixed with
  Dirichlet(alpha) weights and the result mixed with the image with a
  Beta(alpha, alpha) weight m: `m * image + (1 - m) * mix` (MEMO's form; the
  same distribution as AugMix's). The ops emulate PIL on 8-bit values:
  each chain starts from the image rounded to 1/255 steps and every op's
  output is on that grid again; geometric ops fill with `fill` (MEMO: grey
  128).

  Args:
    key: a PRNG key.
    image: `[H, W, C]` floats in [0, 1]; vmap for views or batches.
    severity: the upper end of the op levels (AugMix's default 3; MEMO's code
      uses 1).
    width: the number of chains.
    depth: ops per chain, or -1 for uniform in {1, 2, 3}.
    alpha: Dirichlet and Beta concentration.
    fill: the fill value of geometric ops, in [0, 1].

  Returns:
    The augmented image, same shape, in [0, 1].
  """
  if image.ndim != 3:
    raise ValueError(f'augmix takes one [H, W, C] image, got {image.shape}')
  dtype = image.dtype
  image = jnp.clip(image.astype(jnp.float32), 0.0, 1.0)
  x8 = jnp.round(image * 255.0)
  fill8 = jnp.round(fill * 255.0)
  k_mix, k_chains = jax.random.split(key)
  weights, m = _mixing_weights(k_mix, width, alpha)
  max_depth = 3 if depth < 0 else depth
  # Per chain: one uniform for the depth, three per op (op, level, sign).
  u = jax.random.uniform(k_chains, (width, 1 + 3 * max_depth))

  def chain(u):
    n = 1 + jnp.floor(3.0 * u[0]) if depth < 0 else max_depth

    # A scan, not an unrolled loop: the op is compiled once.
    def body(x, step):
      d, u_op = step
      y = _augmix_op(u_op, x, severity, fill8)
      return jnp.where(d < n, y, x), None

    steps = (jnp.arange(max_depth), u[1:].reshape(max_depth, 3))
    x, _ = jax.lax.scan(body, x8, steps)
    return x / 255.0

  chains = jax.vmap(chain)(u)
  mix = jnp.tensordot(weights, chains, axes=1)
  return (m * image + (1.0 - m) * mix).astype(dtype)


def _random_crop(u, image, padding):
  """torchvision RandomCrop(size, padding, zero fill) to the input size.

  `u`: two uniforms (the offsets).
  """
  h, w, c = image.shape
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  i, j = jnp.minimum(jnp.floor(u * (2 * padding + 1)), 2 * padding)
  i, j = i.astype(jnp.int32), j.astype(jnp.int32)
  return jax.lax.dynamic_slice(padded, (i, j, 0), (h, w, c))


def _random_resized_crop(u, image, scale=(0.08, 1.0), ratio=(0.75, 4 / 3)):
  """torchvision RandomResizedCrop to the input size (bilinear).

  Ten candidate boxes as in `get_params`; the first that fits wins, else the
  centre crop with the aspect ratio clamped to `ratio`. `u`: 22 uniforms.
  """
  h, w, _ = image.shape
  area = h * w * (scale[0] + u[:10] * (scale[1] - scale[0]))
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + u[10:20] * (log_hi - log_lo))
  cw = jnp.round(jnp.sqrt(area * aspect))
  chh = jnp.round(jnp.sqrt(area / aspect))
  ok = (cw > 0) & (cw <= w) & (chh > 0) & (chh <= h)
  first = jnp.argmax(ok)
  u = u[20:22]
  in_ratio = w / h
  if in_ratio < ratio[0]:
    fb_w, fb_h = w, round(w / ratio[0])
  elif in_ratio > ratio[1]:
    fb_w, fb_h = round(h * ratio[1]), h
  else:
    fb_w, fb_h = w, h
  found = jnp.any(ok)
  bw = jnp.where(found, cw[first], fb_w)
  bh = jnp.where(found, chh[first], fb_h)
  top = jnp.where(found, jnp.floor(u[0] * (h - bh + 1)), (h - fb_h) // 2)
  left = jnp.where(found, jnp.floor(u[1] * (w - bw + 1)), (w - fb_w) // 2)
  ys = top + (jnp.arange(h) + 0.5) * bh / h - 0.5
  xs = left + (jnp.arange(w) + 0.5) * bw / w - 0.5
  ys = jnp.clip(ys, top, top + bh - 1)
  xs = jnp.clip(xs, left, left + bw - 1)
  yy, xx = jnp.meshgrid(ys, xs, indexing='ij')
  return _bilinear(image, yy, xx, mode='clamp')


PREAUGMENTS = ('crop', 'resized_crop', 'none')


def memo_augment(
  key: jax.Array,
  image: jax.Array,
  *,
  preaugment: str = 'crop',
  severity: float = 1.0,
  width: int = 3,
  depth: int = -1,
  alpha: float = 1.0,
) -> jax.Array:
  """One MEMO view: pre-augmentation, a horizontal flip, then AugMix.

  MEMO's `_augmix_aug` first applies `preaugment` and then AugMix with its
  op list at level 1 (`rotate(x, 1)`, ...), hence `severity=1` here.

  Args:
    key: a PRNG key.
    image: `[H, W, C]` floats in [0, 1].
    preaugment: `'crop'` (MEMO's CIFAR code: RandomCrop with zero padding of
      H // 8, i.e. 4 px at 32 px), `'resized_crop'` (MEMO's ImageNet code:
      RandomResizedCrop back to the input size), or `'none'` (no crop).
      A flip with p 0.5 follows in every case but `'none'`.
    severity, width, depth, alpha: see `augmix`.

  Returns:
    The view, same shape, in [0, 1].
  """
  if preaugment not in PREAUGMENTS:
    raise ValueError(f'unknown preaugment {preaugment!r}; valid: {PREAUGMENTS}')
  k_pre, k_mix = jax.random.split(key)
  if preaugment != 'none':
    u = jax.random.uniform(k_pre, (23,))
    if preaugment == 'crop':
      image = _random_crop(u[:2], image, max(1, image.shape[0] // 8))
    else:
      image = _random_resized_crop(u[:22], image)
    image = jnp.where(u[22] < 0.5, image[:, ::-1], image)
  return augmix(
    k_mix, image, severity=severity, width=width, depth=depth, alpha=alpha
  )


# ---------------------------------------------------------------------------
# TPT.


def random_resized_crop(
  key: jax.Array,
  image: jax.Array,
  *,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
  """torchvision's `RandomResizedCrop` back to the input size (bilinear).

  Args:
    key: a PRNG key.
    image: `[H, W, C]`.
    scale: range of the crop's area, as a fraction of the image's.
    ratio: range of the crop's aspect ratio (log-uniform).
  """
  if image.ndim != 3:
    raise ValueError(
      f'random_resized_crop takes one [H, W, C] image, got {image.shape}'
    )
  if not 0.0 < scale[0] <= scale[1] <= 1.0:
    raise ValueError(f'crop scale must satisfy 0 < lo <= hi <= 1: {scale}')
  u = jax.random.uniform(key, (22,))
  return _random_resized_crop(u, image, tuple(scale), tuple(ratio))


def tpt_views(
  key: jax.Array,
  image: jax.Array,
  *,
  n_views: int = 64,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
  augmix_views: bool = False,
  severity: float = 1.0,
) -> jax.Array:
  """TPT's views of one test image (its `AugMixAugmenter`).

  View 0 is the image itself (TPT's "original": the deterministic resize
  and centre crop, which here is the identity, as images arrive at the
  model's size). Views 1..n_views-1 are random resized crops back to the
  input size, flipped horizontally with p 0.5 (`flip`), then with
  `augmix_views` mixed by AugMix (`augmix` at `severity`, 3 chains, TPT's
  setting for the fine-grained datasets; ImageNet and its variants use the
  crops alone). TPT's AugMix ops leave PIL's default fill, black, where
  a rotation or shear uncovers the frame (MEMO's fill grey).

  Args:
    key: a PRNG key.
    image: `[H, W, C]` floats in [0, 1].
    n_views: views returned, the original included (TPT: 64).
    scale, ratio: the crop's area fraction and aspect-ratio ranges (TPT:
      torchvision's defaults, (0.08, 1) and (3/4, 4/3)).
    flip: random horizontal flips.
    augmix_views: AugMix on top of the crops.
    severity: AugMix's op level.

  Returns:
    `[n_views, H, W, C]`, the original first.
  """
  if image.ndim != 3:
    raise ValueError(f'tpt_views takes one [H, W, C] image, got {image.shape}')
  if n_views < 1:
    raise ValueError(f'tpt_views: n_views must be >= 1, got {n_views}')

  def view(k):
    k_crop, k_flip, k_mix = jax.random.split(k, 3)
    v = random_resized_crop(k_crop, image, scale=scale, ratio=ratio)
    if flip:
      v = jnp.where(jax.random.uniform(k_flip) < 0.5, v[:, ::-1], v)
    if augmix_views:
      v = augmix(k_mix, v, severity=severity, fill=0.0)
    return v.astype(image.dtype)

  if n_views == 1:
    return image[None]
  views = jax.vmap(view)(jax.random.split(key, n_views - 1))
  return jnp.concatenate([image[None], views], axis=0)


def affine_warp(
  image: jax.Array,
  *,
  angle: jax.Array | float = 0.0,
  scale: jax.Array | float = 1.0,
  shift: jax.Array | tuple[float, float] = (0.0, 0.0),
  fill: float = 0.0,
) -> jax.Array:
  """Rotates (degrees, counter-clockwise), scales and shifts (pixels, x then
  y) one `[H, W, C]` image about its centre; bilinear, `fill` outside."""
  h, w = image.shape[:2]
  theta = jnp.deg2rad(angle)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij')
  px = xx - cx - shift[0]
  py = yy - cy - shift[1]
  # Inverse map: source = R(-angle) (p - t) / scale (image y points down).
  src_x = (cos * px - sin * py) / scale + cx
  src_y = (sin * px + cos * py) / scale + cy
  return _bilinear(image, src_y, src_x, fill=fill, mode='zeros')
