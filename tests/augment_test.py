"""Device-side augmentations: CoTTA's transform, AugMix and MEMO's views."""

import colorsys
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from PIL import Image, ImageOps

from tta_jax._src import augment


def _images(shape, seed=0):
  return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


@functools.partial(jax.jit, static_argnames=('strength', 'per_example'))
def _cotta(key, images, strength='cifar', per_example=False):
  return augment.cotta_augment(
    key, images, strength=strength, per_example=per_example
  )


NO_NOISE = augment.CottaStrength(noise_std=0.0)


def _draw(**kw):
  """A fixed CoTTA draw; defaults are the identity transform."""
  base = dict(
    factors=jnp.asarray([1.0, 1.0, 1.0, 0.0, 1.0]),
    order=jnp.arange(5),
    angle=jnp.zeros([]),
    shift=jnp.zeros([2]),
    scale=jnp.ones([]),
    sigma=jnp.asarray(1e-3),
    flip=jnp.asarray(False),
  )
  base.update({k: jnp.asarray(v) for k, v in kw.items()})
  return augment._CottaDraw(**base)


_cotta_one = jax.jit(
  lambda image, draw: augment._cotta_one(image, draw, jax.random.key(0), 0.0)
)


class CottaAugmentTest(parameterized.TestCase):
  @parameterized.parameters(((4, 8, 8, 1),), ((2, 16, 16, 3),))
  def test_shape_range_and_keys(self, shape):
    x = _images(shape)
    y = _cotta(jax.random.key(0), x)
    self.assertEqual(y.shape, x.shape)
    self.assertEqual(y.dtype, x.dtype)
    self.assertTrue(np.all((y >= 0.0) & (y <= 1.0)))
    np.testing.assert_array_equal(y, _cotta(jax.random.key(0), x))
    self.assertFalse(np.allclose(y, _cotta(jax.random.key(1), x)))
    self.assertGreater(float(np.mean(np.abs(y - x))), 1e-3)

  def test_zero_strength_is_identity(self):
    x = _images((2, 16, 16, 3))
    y = _cotta(jax.random.key(3), x, strength='none')
    np.testing.assert_allclose(y, x, atol=2e-6)

  def test_one_transform_per_batch_by_default(self):
    x = np.repeat(_images((1, 8, 8, 1)), 4, axis=0)
    y = _cotta(jax.random.key(0), x, strength=NO_NOISE)
    for row in y[1:]:
      np.testing.assert_allclose(row, y[0], atol=1e-6)
    z = _cotta(jax.random.key(0), x, strength=NO_NOISE, per_example=True)
    self.assertFalse(np.allclose(z[1], z[0]))

  def test_rows_are_keyed_by_index(self):
    # A batch padded with extra rows augments its real rows identically.
    x = _images((4, 8, 8, 1))
    full = _cotta(jax.random.key(2), x)
    cut = _cotta(jax.random.key(2), x[:3])
    np.testing.assert_allclose(full[:3], cut, atol=1e-6)

  def test_vmap_over_keys(self):
    x = _images((4, 8, 8, 1))
    keys = jax.random.split(jax.random.key(0), 3)
    stack = jax.vmap(lambda k: _cotta(k, x))(keys)
    self.assertEqual(stack.shape, (3, *x.shape))
    np.testing.assert_allclose(stack[1], _cotta(keys[1], x), atol=1e-6)

  def test_bad_inputs_fail_clearly(self):
    with self.assertRaisesRegex(ValueError, 'strength'):
      augment.cotta_augment(
        jax.random.key(0), _images((1, 8, 8, 1)), strength='strong'
      )
    with self.assertRaisesRegex(ValueError, 'H, W >= 4'):
      augment.cotta_augment(jax.random.key(0), _images((1, 2, 2, 1)))


class CottaComponentsTest(absltest.TestCase):
  """Each part of the CoTTA transform against a numpy reference."""

  def setUp(self):
    super().setUp()
    self.x = _images((6, 6, 3), seed=1)
    self.jitter = jax.jit(augment._color_jitter)

  def _jitter(self, **factors):
    f = dict(brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, gamma=1.0)
    f.update(factors)
    return self.jitter(self.x, _draw(factors=list(f.values())))

  def test_color_ops(self):
    x = self.x
    gray = 0.2989 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    np.testing.assert_allclose(self._jitter(), x, atol=1e-6)
    np.testing.assert_allclose(
      self._jitter(brightness=1.3), np.clip(1.3 * x, 0, 1), atol=1e-6
    )
    np.testing.assert_allclose(
      self._jitter(contrast=0.5), 0.5 * x + 0.5 * gray.mean(), atol=1e-6
    )
    np.testing.assert_allclose(
      self._jitter(saturation=0.0), np.repeat(gray[..., None], 3, -1), atol=1e-6
    )
    np.testing.assert_allclose(self._jitter(gamma=2.0), x**2, atol=1e-6)
    shifted = np.array(
      [
        colorsys.hsv_to_rgb((h + 0.25) % 1.0, s, v)
        for h, s, v in (colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3))
      ]
    ).reshape(x.shape)
    np.testing.assert_allclose(self._jitter(hue=0.25), shifted, atol=1e-5)

  def test_order_matters_and_is_applied(self):
    x = self.x
    factors = [1.5, 1.0, 1.0, 0.0, 2.0]  # brightness then gamma, or reverse
    bg = self.jitter(x, _draw(factors=factors, order=[0, 4, 1, 2, 3]))
    gb = self.jitter(x, _draw(factors=factors, order=[4, 0, 1, 2, 3]))
    np.testing.assert_allclose(bg, np.clip(1.5 * x, 0, 1) ** 2, atol=1e-6)
    np.testing.assert_allclose(gb, np.clip(1.5 * x**2, 0, 1), atol=1e-6)

  def test_grayscale_skips_saturation_and_hue(self):
    g = _images((6, 6, 1))
    out = self.jitter(g, _draw(factors=[1.0, 1.0, 0.0, 0.3, 1.0]))
    np.testing.assert_allclose(out, g, atol=1e-6)

  def test_geometry(self):
    x = _images((8, 8, 2), seed=3)
    np.testing.assert_allclose(_cotta_one(x, _draw()), x, atol=1e-6)
    np.testing.assert_allclose(
      _cotta_one(x, _draw(flip=True)), x[:, ::-1], atol=1e-6
    )
    # A whole-pixel shift of the edge-padded canvas, then the centre crop.
    idx = np.maximum(np.arange(8) - 2, 0)
    np.testing.assert_allclose(
      _cotta_one(x, _draw(shift=[2.0, 0.0])), x[:, idx], atol=1e-6
    )
    rot = _cotta_one(x, _draw(angle=90.0))
    self.assertTrue(
      any(
        np.allclose(rot, np.rot90(x, k, axes=(0, 1)), atol=1e-5) for k in (1, 3)
      )
    )
    # Scale 2 about the centre: output pixel i samples 1.75 + i / 2.
    pos = 1.75 + 0.5 * np.arange(8)
    cols = np.stack(
      [
        [np.interp(pos, np.arange(8), x[r, :, ch]) for ch in range(2)]
        for r in range(8)
      ]
    )  # [8, 2, 8]
    ref = np.stack(
      [
        [np.interp(pos, np.arange(8), cols[:, ch, c]) for ch in range(2)]
        for c in range(8)
      ]
    )  # [8, 2, 8]
    np.testing.assert_allclose(
      _cotta_one(x, _draw(scale=2.0)), ref.transpose(2, 0, 1), atol=1e-5
    )

  def test_blur_matches_numpy(self):
    x = _images((8, 8, 1), seed=4)
    sigma = 0.5
    t = np.arange(-2, 3)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    p = np.pad(x, ((2, 2), (2, 2), (0, 0)), mode='edge')
    rows = sum(k[i] * p[i : i + 8] for i in range(5))
    ref = sum(k[j] * rows[:, j : j + 8] for j in range(5))
    np.testing.assert_allclose(
      _cotta_one(x, _draw(sigma=sigma)), ref, atol=1e-6
    )


_augmix_op = jax.jit(lambda u, x8: augment._augmix_op(u, x8, 3.0, 128.0))


def _u(op, level):
  """Uniforms that pick `op` at `level` (severity 3) with a positive sign."""
  i = augment.AUGMIX_OPS.index(op)
  return jnp.asarray(
    [(i + 0.5) / len(augment.AUGMIX_OPS), (level - 0.1) / (3.0 - 0.1), 0.1]
  )


class AugmixOpsTest(parameterized.TestCase):
  """The AugMix ops against PIL on 8-bit images."""

  def setUp(self):
    super().setUp()
    r = np.random.default_rng(0)
    # Not full range, so autocontrast and equalize have work to do.
    self.img = r.integers(30, 200, size=(12, 12, 3)).astype(np.uint8)
    self.pil = Image.fromarray(self.img)

  def _ours(self, op, level):
    return np.asarray(_augmix_op(_u(op, level), self.img.astype(np.float32)))

  def test_pixel_ops_match_pil(self):
    level = 2.7  # solarize threshold 256 - 69, posterize to 3 bits
    # Autocontrast: the exact map; PIL's float64 rounding sends some maxima
    # to 254 instead of 255.
    lo, hi = self.img.min((0, 1)), self.img.max((0, 1))
    exact = (self.img.astype(int) - lo) * 255 // (hi - lo)
    ours = self._ours('autocontrast', level)
    np.testing.assert_array_equal(ours, exact)
    pil = np.asarray(ImageOps.autocontrast(self.pil)).astype(int)
    self.assertLessEqual(np.max(np.abs(ours - pil)), 1)
    cases = {
      'equalize': ImageOps.equalize(self.pil),
      'solarize': ImageOps.solarize(self.pil, 256 - int(level * 256 / 10)),
      'posterize': ImageOps.posterize(self.pil, 4 - int(level * 4 / 10)),
    }
    for op, ref in cases.items():
      np.testing.assert_array_equal(
        self._ours(op, level), np.asarray(ref), err_msg=op
      )

  @parameterized.parameters(
    'rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y'
  )
  def test_geometric_ops_match_pil(self, op):
    level = 2.9
    if op == 'rotate':
      ref = self.pil.rotate(
        int(level * 3), resample=Image.BILINEAR, fillcolor=(128,) * 3
      )
    else:
      shear = level * 0.3 / 10
      t = int(level * 12 / 3 / 10)
      data = {
        'shear_x': (1, shear, 0, 0, 1, 0),
        'shear_y': (1, 0, 0, shear, 1, 0),
        'translate_x': (1, 0, t, 0, 1, 0),
        'translate_y': (1, 0, 0, 0, 1, t),
      }[op]
      ref = self.pil.transform(
        (12, 12),
        Image.AFFINE,
        data,
        resample=Image.BILINEAR,
        fillcolor=(128,) * 3,
      )
    ours, ref = self._ours(op, level), np.asarray(ref).astype(np.float32)
    # PIL rounds in fixed point; allow one grey level.
    self.assertLessEqual(np.max(np.abs(ours - ref)), 1.0)
    self.assertFalse(np.array_equal(ours, self.img))


_augmix_views = jax.jit(
  lambda key, x: jax.vmap(lambda k: augment.augmix(k, x))(
    jax.random.split(key, 6)
  )
)


@functools.partial(jax.jit, static_argnames='preaugment')
def _memo_views(key, x, preaugment):
  return jax.vmap(lambda k: augment.memo_augment(k, x, preaugment=preaugment))(
    jax.random.split(key, 4)
  )


class AugmixTest(parameterized.TestCase):
  def test_views(self):
    shape = (8, 8, 1)
    x = _images(shape)
    views = _augmix_views(jax.random.key(0), x)
    self.assertEqual(views.shape, (6, *shape))
    self.assertTrue(np.all((views >= 0) & (views <= 1)))
    np.testing.assert_array_equal(views, _augmix_views(jax.random.key(0), x))
    self.assertFalse(np.allclose(views, _augmix_views(jax.random.key(1), x)))
    self.assertFalse(np.allclose(views[0], views[1]))
    # A view is a convex mix of the image and op chains: never far off.
    self.assertLess(float(np.mean(np.abs(views - x))), 0.5)

  @parameterized.parameters('crop', 'resized_crop')
  def test_memo_views(self, preaugment):
    x = _images((16, 16, 3))
    views = _memo_views(jax.random.key(0), x, preaugment)
    self.assertEqual(views.shape, (4, 16, 16, 3))
    self.assertTrue(np.all((views >= 0) & (views <= 1)))
    np.testing.assert_array_equal(
      views, _memo_views(jax.random.key(0), x, preaugment)
    )
    self.assertFalse(np.allclose(views[0], views[1]))

  def test_preaugment_limits(self):
    x = jnp.asarray(_images((16, 16, 3)))
    # RandomResizedCrop with a full-image box is the identity.
    full = jax.jit(augment._random_resized_crop)(
      jnp.asarray([1.0] * 10 + [0.5] * 10 + [0.0, 0.0]), x
    )
    np.testing.assert_allclose(full, x, atol=1e-6)
    # RandomCrop with offsets at the padding is the identity.
    same = augment._random_crop(jnp.asarray([0.5, 0.5]), x, 2)
    np.testing.assert_array_equal(same, x)
    moved = augment._random_crop(jnp.asarray([0.0, 0.99]), x, 2)
    np.testing.assert_array_equal(moved[2:, :14], x[:14, 2:])
    np.testing.assert_array_equal(moved[:2], 0.0)


if __name__ == '__main__':
  absltest.main()
