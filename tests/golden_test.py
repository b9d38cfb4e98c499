"""Golden tests: methods against hand-written references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from tta_jax import methods, models, testing as test_utils
from tta_jax._src import losses, params as params_lib


def _conv_same_np(x, kernel):
  """NHWC 'SAME' (pad 1) 3x3 cross-correlation in numpy."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, w, kernel.shape[-1]))
  for i in range(3):
    for j in range(3):
      out += np.einsum(
        'bhwc,cd->bhwd', xp[:, i : i + h, j : j + w], kernel[i, j]
      )
  return out


class TentGoldenTest(absltest.TestCase):
  def test_one_step_is_adam_on_entropy_gradient(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    batch = test_utils.fake_batch(0, 16, labels=False)
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    adapter = methods.tent.tent(apply_fn, optax.adam(lr, b1=b1, b2=b2, eps=eps))
    state = adapter.init(variables, jax.random.key(0))
    new_state, out = jax.jit(adapter.step)(state, batch)

    params = variables['params']
    mask = params_lib.bn_affine(params, variables['batch_stats'])
    trainable, frozen = params_lib.split(params, mask)

    def entropy(trainable):
      logits = apply_fn(
        params_lib.merge(trainable, frozen),
        variables['batch_stats'],
        batch['image'],
        use_batch_stats=True,
      ).logits
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.sum(jnp.exp(logp) * logp, -1)), logits

    (_, logits0), grads = jax.value_and_grad(entropy, has_aux=True)(trainable)

    def adam_by_hand(p, g):
      m = (1 - b1) * g / (1 - b1)  # bias-corrected first moment at t=1
      v = (1 - b2) * g**2 / (1 - b2)
      return p - lr * m / (np.sqrt(v) + eps)

    expected = params_lib.merge(
      jax.tree.map(adam_by_hand, trainable, grads), frozen
    )
    test_utils.assert_trees_close(new_state.params, expected, 1e-5, 1e-6)
    # The scored logits are the pre-update ones.
    np.testing.assert_allclose(out.logits, logits0, rtol=1e-5, atol=1e-6)
    # Tent keeps no statistics.
    self.assertTrue(
      test_utils.trees_equal(new_state.batch_stats, variables['batch_stats'])
    )

  def test_zero_learning_rate_changes_nothing(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    adapter = methods.tent.tent(apply_fn, optax.sgd(0.0))
    state = adapter.init(variables, jax.random.key(0))
    for i in range(2):
      state, _ = adapter.step(state, test_utils.fake_batch(i, 8))
    self.assertTrue(test_utils.trees_equal(state.params, variables['params']))


class NormGoldenTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    _, self.apply_fn, self.variables = test_utils.tiny_bn_net(1)
    self.batch = test_utils.fake_batch(3, 32, labels=False)

  def _first_bn_input(self):
    kernel = np.asarray(self.variables['params']['conv1']['kernel'])
    return _conv_same_np((self.batch['image'] - 0.5) / 0.5, kernel)

  def test_batch_statistics_equal_numpy(self):
    out = self.apply_fn(
      self.variables['params'],
      self.variables['batch_stats'],
      self.batch['image'],
      use_batch_stats=True,
    )
    x = self._first_bn_input()
    np.testing.assert_allclose(
      out.batch_stats['bn1']['mean'], x.mean((0, 1, 2)), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
      out.batch_stats['bn1']['var'], x.var((0, 1, 2)), rtol=1e-4, atol=1e-5
    )

  def test_norm_predicts_with_batch_statistics(self):
    adapter = methods.norm.norm(self.apply_fn)
    state = adapter.init(self.variables, jax.random.key(0))
    _, out = adapter.step(state, self.batch)
    ref = self.apply_fn(
      self.variables['params'],
      self.variables['batch_stats'],
      self.batch['image'],
      use_batch_stats=True,
    )
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-6)

  def test_a_model_without_bn_is_refused(self):
    adapter = methods.norm.norm(self.apply_fn)
    variables = {**self.variables, 'batch_stats': {}}  # a LayerNorm model
    with self.assertRaisesRegex(ValueError, 'no BN statistics'):
      adapter.init(variables, jax.random.key(0))

  def test_prior_strength_weights_source_by_n_over_n_plus_batch(self):
    adapter = methods.norm.norm(self.apply_fn, prior_strength=16.0)
    state = adapter.init(self.variables, jax.random.key(0))
    _, out = adapter.step(state, self.batch)
    self.assertAlmostEqual(float(out.metrics['source_weight']), 16 / 48)
    ref = self.apply_fn(
      self.variables['params'],
      self.variables['batch_stats'],
      self.batch['image'],
      bn_mode=models.BNMode(source_weight=16 / 48),
    )
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-6)

  def test_ema_updates_running_statistics(self):
    m = 0.1
    adapter = methods.norm.norm(self.apply_fn, momentum=m)
    state = adapter.init(self.variables, jax.random.key(0))
    state, out = adapter.step(state, self.batch)
    x = self._first_bn_input()
    s0 = self.variables['batch_stats']['bn1']
    np.testing.assert_allclose(
      state.batch_stats['bn1']['mean'],
      (1 - m) * s0['mean'] + m * x.mean((0, 1, 2)),
      rtol=1e-4,
      atol=1e-5,
    )
    ref = self.apply_fn(
      self.variables['params'], state.batch_stats, self.batch['image']
    )
    np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-6)


class BatchNormLayerTest(absltest.TestCase):
  """Our call-time BN against flax's own BatchNorm."""

  def test_matches_flax_batchnorm(self):
    x = jax.random.normal(jax.random.key(0), (6, 5, 5, 3)) * 2 + 1
    ours = models.BatchNorm()
    theirs = nn.BatchNorm(use_running_average=False, epsilon=1e-5)
    v = ours.init(jax.random.key(1), x)
    v_flax = theirs.init(jax.random.key(1), x)
    scale = jnp.array([0.5, 2.0, -1.0])
    v['params']['scale'] = v_flax['params']['scale'] = scale
    y, _ = ours.apply(v, x, models.BATCH, mutable=['batch_stats'])
    y_flax, _ = theirs.apply(v_flax, x, mutable=['batch_stats'])
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)
    stats = {'mean': jnp.array([1.0, 2, 3]), 'var': jnp.array([1.0, 4, 9])}
    y = ours.apply({**v, 'batch_stats': stats}, x)
    y_flax = nn.BatchNorm(use_running_average=True).apply(
      {'params': v_flax['params'], 'batch_stats': stats}, x
    )
    np.testing.assert_allclose(y, y_flax, rtol=1e-5, atol=1e-5)


class LossesGoldenTest(absltest.TestCase):
  def test_cross_entropy_matches_optax(self):
    logits = jax.random.normal(jax.random.key(0), (7, 4))
    labels = jnp.array([0, 1, 2, 3, 0, 1, 2])
    np.testing.assert_allclose(
      losses.cross_entropy(logits, labels),
      optax.softmax_cross_entropy_with_integer_labels(logits, labels),
      rtol=1e-6,
    )


if __name__ == '__main__':
  absltest.main()
