"""The embedded digits: real data, deterministic splits, the natural shift."""

import numpy as np
from absl.testing import absltest

from tta_jax.data.images import digits


class DigitsTest(absltest.TestCase):
  def test_splits(self):
    d = digits.load()
    self.assertEqual(
      (len(d.train), len(d.val), len(d.test), len(d.uci)),
      (3500, 500, 1000, 1797),
    )
    for src in (d.train, d.val, d.test, d.uci):
      self.assertEqual(src.images.shape[1:], digits.IMAGE_SHAPE)
      self.assertEqual(src.images.dtype, np.float32)
      self.assertGreaterEqual(src.images.min(), 0.0)
      self.assertLessEqual(src.images.max(), 1.0)
    # Stratified and disjoint (no image appears in two splits).
    np.testing.assert_array_equal(np.bincount(d.test.labels), [100] * 10)
    keys = [{x.tobytes() for x in s.images} for s in (d.train, d.val, d.test)]
    self.assertEmpty(keys[0] & keys[1])
    self.assertEmpty(keys[0] & keys[2])
    self.assertEmpty(keys[1] & keys[2])

  def test_deterministic_and_seeded(self):
    a, b = digits.load(seed=0), digits.load(seed=0)
    np.testing.assert_array_equal(a.test.images, b.test.images)
    c = digits.load(seed=1)
    self.assertFalse(np.array_equal(a.test.labels, c.test.labels))

  def test_uci_digits_are_framed_like_mnist(self):
    d = digits.load()
    # MNIST centres a 20x20 digit in 28x28: the 4-pixel border is empty.
    self.assertEqual(d.uci.images[:, :4].max(), 0.0)
    self.assertEqual(d.uci.images[:, :, -4:].max(), 0.0)
    self.assertGreater(d.uci.images[:, 4:24, 4:24].mean(), 0.05)

  def test_bad_sizes(self):
    with self.assertRaisesRegex(ValueError, 'sum to <= 5000'):
      digits.load(train=4000, val=1000, test=1000)


if __name__ == '__main__':
  absltest.main()
