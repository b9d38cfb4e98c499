"""Source pretraining: warm start from a checkpoint with another head."""

import pathlib
import tempfile

import jax
import numpy as np
from absl.testing import absltest
from flax import traverse_util

from tta_jax import models
from tta_jax._src import checkpoint
from tta_jax.trainers import source

SHAPE = (28, 28, 1)


def _variables(num_classes, seed, **model):
  module = models.build('digits_cnn', num_classes=num_classes, width=4, **model)
  return models.init_variables(module, SHAPE, jax.random.key(seed))


class WarmStartTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(tempfile.mkdtemp()) / 'init'
    self.saved = _variables(5, seed=1)  # an "ImageNet" model: 5 classes
    checkpoint.save_variables(
      self.dir,
      self.saved,
      {
        'model': {'name': 'digits_cnn', 'width': 4},
        'num_classes': 5,
        'input_shape': list(SHAPE),
      },
    )

  def test_copies_what_fits_and_keeps_the_new_head(self):
    fresh = _variables(10, seed=0)
    out = source.warm_start(fresh, self.dir, {'name': 'digits_cnn'})
    flat_out = traverse_util.flatten_dict(out)
    flat_saved = traverse_util.flatten_dict(self.saved)
    flat_fresh = traverse_util.flatten_dict(fresh)
    self.assertEqual(set(flat_out), set(flat_fresh))
    kept = []
    for path, leaf in flat_out.items():
      if flat_saved[path].shape == leaf.shape:
        np.testing.assert_array_equal(leaf, flat_saved[path])
      else:  # the 10-way classifier: its own init
        np.testing.assert_array_equal(leaf, flat_fresh[path])
        kept.append(path)
    self.assertNotEmpty(kept)
    self.assertTrue(all(p[0] == 'params' for p in kept))
    self.assertLess(len(kept), len(flat_out) // 2)

  def test_errors(self):
    fresh = _variables(10, seed=0)
    with self.assertRaisesRegex(ValueError, "holds a 'digits_cnn'"):
      source.warm_start(fresh, self.dir, {'name': 'resnet18'})
    with self.assertRaisesRegex(FileNotFoundError, 'holds no checkpoint'):
      source.warm_start(fresh, self.dir.parent / 'nothing', {'name': 'x'})


if __name__ == '__main__':
  absltest.main()
