"""Models: registry, `(logits, features)` contract, BN modes, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from tta_jax import models, testing as test_utils
from tta_jax._src import params as params_lib

# name -> (input shape, parameter count with 10 classes, BN layers)
EXPECTED = {
  'digits_cnn': ((28, 28, 1), None, 4),
  'resnet26': ((32, 32, 3), None, 25),
  'wide_resnet28_2': ((32, 32, 3), 1_467_610, 25),
  'wide_resnet28_10': ((32, 32, 3), 36_479_194, 25),
  'resnet18': ((64, 64, 3), 11_181_642, 20),
  'resnet50': ((64, 64, 3), 23_528_522, 53),
  'digits_vit': ((28, 28, 1), None, 0),
  'vit_base_patch16_224': ((224, 224, 3), 85_806_346, 0),  # timm's, 10 classes
}
# Vision-language classifiers: their heads are class text features, built
# from class names; tests/vlm_test.py and tests/vlm_runner_test.py cover them.
VISION_LANGUAGE = {'vlm_digits', 'vlm_clip'}


class RegistryTest(parameterized.TestCase):
  def test_every_model_is_covered(self):
    self.assertEqual(set(models.MODELS), set(EXPECTED) | VISION_LANGUAGE)

  @parameterized.named_parameters(*[(n, n) for n in EXPECTED])
  def test_structure(self, name):
    shape, n_params, n_bn = EXPECTED[name]
    module = models.build(name, num_classes=10)
    x = jnp.zeros((2, *shape))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    (logits, feats), _ = jax.eval_shape(
      lambda v: module.apply(
        v, x, bn_mode=models.BATCH, mutable=['batch_stats']
      ),
      variables,
    )
    self.assertEqual(logits.shape, (2, 10))
    self.assertIn('pre_logits', feats)
    self.assertIn('head', variables['params'])
    if n_params is not None:  # the PyTorch originals' counts
      self.assertEqual(
        sum(x.size for x in jax.tree.leaves(variables['params'])), n_params
      )
    mask = params_lib.bn_affine(
      variables['params'], variables.get('batch_stats', {})
    )
    self.assertEqual(params_lib.count(mask), 2 * n_bn)

  @parameterized.parameters(
    # OpenAI's CLIP parameter counts plus the 4 x 512 context vectors.
    ('ViT-B/16', 149_620_737 + 4 * 512),
    ('RN50', 102_007_137 + 4 * 512),
  )
  def test_clip_structure(self, arch, n_params):
    module = models.build(
      'vlm_clip', classnames=('cat', 'dog', 'bird'), arch=arch
    )
    x = jnp.zeros((2, 224, 224, 3))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    (logits, feats), _ = jax.eval_shape(
      lambda v: module.apply(
        v, x, bn_mode=models.BATCH, mutable=['batch_stats']
      ),
      variables,
    )
    self.assertEqual(logits.shape, (2, 3))
    self.assertIn('pre_logits', feats)
    self.assertEqual(
      sum(x.size for x in jax.tree.leaves(variables['params'])), n_params
    )

  def test_unknown_model(self):
    with self.assertRaisesRegex(ValueError, 'valid:.*resnet50'):
      models.build('vgg16')


class ApplyTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    _, self.apply_fn, self.v = test_utils.tiny_bn_net(0)
    self.x = jnp.asarray(test_utils.fake_batch(0, 12)['image'])

  def apply(self, **kw):
    return self.apply_fn(self.v['params'], self.v['batch_stats'], self.x, **kw)

  def test_source_weight_one_equals_source_mode(self):
    a = self.apply(bn_mode=models.BNMode(source_weight=1.0))
    b = self.apply()
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    c = self.apply(use_batch_stats=True)
    self.assertFalse(np.allclose(b.logits, c.logits))

  def test_mask_keeps_padding_out_of_statistics(self):
    garbage = jnp.concatenate([self.x[:8], 100.0 * self.x[8:]])
    mask = jnp.arange(12) < 8
    a = self.apply_fn(
      self.v['params'],
      self.v['batch_stats'],
      garbage,
      use_batch_stats=True,
      mask=mask,
    )
    b = self.apply_fn(
      self.v['params'],
      self.v['batch_stats'],
      self.x[:8],
      use_batch_stats=True,
    )
    np.testing.assert_allclose(a.logits[:8], b.logits, rtol=1e-4, atol=1e-5)
    test_utils.assert_trees_close(a.batch_stats, b.batch_stats, 1e-4, 1e-5)

  def test_feature_shift_after_the_stem_conv(self):
    c = 4  # the tiny net's stem width
    ident = self.apply(feature_shift=(jnp.ones(c), jnp.zeros(c)))
    np.testing.assert_allclose(ident.logits, self.apply().logits, rtol=1e-6)
    shifted = self.apply(feature_shift=(jnp.full(c, 0.5), jnp.full(c, 0.2)))
    self.assertFalse(np.allclose(shifted.logits, self.apply().logits))
    per_example = self.apply(
      feature_shift=(jnp.full((12, c), 0.5), jnp.full((12, c), 0.2))
    )
    np.testing.assert_allclose(per_example.logits, shifted.logits, rtol=1e-5)

  def test_input_checks(self):
    with self.assertRaisesRegex(ValueError, r'\[B, H, W, C\]'):
      self.apply_fn(self.v['params'], self.v['batch_stats'], self.x[0])
    with self.assertRaisesRegex(ValueError, 'expects'):
      self.apply_fn(
        self.v['params'], self.v['batch_stats'], jnp.zeros((2, 9, 8, 1))
      )
    with self.assertRaisesRegex(TypeError, 'floating'):
      self.apply_fn(
        self.v['params'],
        self.v['batch_stats'],
        jnp.zeros((2, 8, 8, 1), jnp.uint8),
      )
    with self.assertRaisesRegex(ValueError, 'mask shape'):
      self.apply(mask=jnp.ones(3, bool))


class MixedBNTest(absltest.TestCase):
  """The BN layer's mixing modes (Meta-TTT's mixed BN among them)."""

  def setUp(self):
    super().setUp()
    self.x = jax.random.normal(jax.random.key(0), (5, 4, 4, 3)) * 3 + 2
    self.layer = models.BatchNorm(alpha_init=0.5)
    self.v = self.layer.init(jax.random.key(1), self.x)
    self.v['batch_stats'] = {
      'mean': jnp.array([0.0, 1.0, -1.0]),
      'var': jnp.array([1.0, 0.5, 2.0]),
    }

  def apply_layer(self, alpha, mode):
    v = {
      'params': dict(self.v['params'], alpha=jnp.full(3, alpha)),
      'batch_stats': self.v['batch_stats'],
    }
    return self.layer.apply(v, self.x, mode, mutable=['batch_stats'])

  def test_alpha_one_is_source_and_zero_is_batch_unbiased(self):
    mode = models.BNMode(ddof=1, mixture_variance=True, learned_weight=True)
    y1, _ = self.apply_layer(1.0, mode)
    y_src = self.layer.apply(self.v, self.x)
    np.testing.assert_allclose(y1, y_src, rtol=1e-5, atol=1e-5)
    y0, stats = self.apply_layer(0.0, mode)
    x = np.asarray(self.x).reshape(-1, 3)
    np.testing.assert_allclose(
      stats['batch_stats']['var'], x.var(0, ddof=1), rtol=1e-5
    )
    np.testing.assert_allclose(
      y0,
      (self.x - x.mean(0)) / np.sqrt(x.var(0, ddof=1) + 1e-5),
      rtol=1e-4,
      atol=1e-4,
    )

  def test_mixture_variance_matches_pooled_samples(self):
    # Pooling n_s samples with the source moments and n_t batch samples
    # has exactly the mixture variance for alpha = n_s / (n_s + n_t).
    mode = models.BNMode(mixture_variance=True, learned_weight=True)
    _, stats = self.apply_layer(0.25, mode)
    x = np.asarray(self.x).reshape(-1, 3)
    mu_s = np.asarray(self.v['batch_stats']['mean'])
    var_s = np.asarray(self.v['batch_stats']['var'])
    src = np.concatenate([mu_s + np.sqrt(var_s), mu_s - np.sqrt(var_s)])
    src = np.repeat(src.reshape(2, 3), x.shape[0] // 6, axis=0)
    pooled = np.concatenate([src, x])  # weighted 0.25 : 0.75 below
    w = np.concatenate(
      [np.full(len(src), 0.25 / len(src)), np.full(len(x), 0.75 / len(x))]
    )[:, None]
    mean = (w * pooled).sum(0)
    var = (w * (pooled - mean) ** 2).sum(0)
    np.testing.assert_allclose(stats['batch_stats']['mean'], mean, rtol=1e-5)
    np.testing.assert_allclose(stats['batch_stats']['var'], var, rtol=1e-4)

  def test_learned_weight_needs_alpha(self):
    layer = models.BatchNorm()
    v = layer.init(jax.random.key(0), self.x)
    with self.assertRaisesRegex(ValueError, 'bn_alpha_init'):
      layer.apply(
        v, self.x, models.BNMode(learned_weight=True), mutable=['batch_stats']
      )


if __name__ == '__main__':
  absltest.main()
