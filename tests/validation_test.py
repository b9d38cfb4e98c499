"""Bad input fails clearly; permutation equivariance of batch methods."""

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest, parameterized

import tta_jax as tj
from configs import default
from tta_jax import methods, testing as test_utils
from tta_jax._src import params as params_lib
from tta_jax.data import benchmarks
from tta_jax.runners import pretrain

ADAM = {'name': 'adam', 'learning_rate': 1e-3}


class BadInputTest(parameterized.TestCase):
  def setUp(self):
    super().setUp()
    _, self.apply_fn, self.v = test_utils.tiny_bn_net(0)
    self.tent = methods.from_config('tent', {'optimizer': ADAM}, self.apply_fn)
    self.state = self.tent.init(self.v, jax.random.key(0))

  def test_init_fails_when_the_mask_selects_nothing(self):
    adapter = methods.tent.tent(
      self.apply_fn, optax.adam(1e-3), adapt=params_lib.by_regex('^nope')
    )
    with self.assertRaisesRegex(ValueError, 'selects no parameters'):
      adapter.init(self.v, jax.random.key(0))

  @parameterized.parameters(
    ((8, 8, 1), ValueError, r'\[B, H, W, C\]'),
    ((4, 8, 8, 3), ValueError, 'expects'),
    ((4, 9, 9, 1), ValueError, 'expects'),
  )
  def test_step_rejects_wrong_shapes(self, shape, error, regex):
    with self.assertRaisesRegex(error, regex):
      jax.jit(self.tent.step)(self.state, {'image': jnp.zeros(shape)})

  def test_step_rejects_integer_images(self):
    with self.assertRaisesRegex(TypeError, 'floating'):
      self.tent.step(self.state, {'image': jnp.zeros((4, 8, 8, 1), jnp.uint8)})

  def test_checked_reports_non_finite_inputs(self):
    step = tj.checked(self.tent).step
    batch = test_utils.fake_batch(0, 4, labels=False)
    state, _ = step(self.state, batch)  # a clean batch passes
    batch['image'][2, 0, 0, 0] = np.nan
    with self.assertRaisesRegex(Exception, 'NaN or Inf'):
      step(state, batch)

  def test_check_batch_names_the_batch(self):
    batch = test_utils.fake_batch(0, 4)
    tj.check_batch(batch, 0)
    batch['image'][3, 1, 1, 0] = np.inf
    with self.assertRaisesRegex(ValueError, r'batch 7 .*rows \[3\]'):
      tj.check_batch(batch, 7)
    with self.assertRaisesRegex(ValueError, 'empty'):
      tj.check_batch({'image': np.zeros((0, 8, 8, 1), np.float32)}, 1)

  def test_from_config_errors_list_valid_choices(self):
    with self.assertRaisesRegex(ValueError, r"valid: \[.*'tent'"):
      methods.from_config('tentt', {}, self.apply_fn)
    with self.assertRaisesRegex(ValueError, r"unknown config keys \['lr'\]"):
      methods.from_config('tent', {'optimizer': ADAM, 'lr': 1}, self.apply_fn)
    with self.assertRaisesRegex(ValueError, 'needs an `optimizer`'):
      methods.from_config('tent', {}, self.apply_fn)
    with self.assertRaisesRegex(ValueError, 'unknown optax optimizer'):
      methods.from_config(
        'tent', {'optimizer': {'name': 'adamm'}}, self.apply_fn
      )
    with self.assertRaisesRegex(ValueError, 'prior_strength'):
      methods.from_config(
        'norm', {'source_weight': 0.5, 'prior_strength': 3.0}, self.apply_fn
      )

  def test_meta_learning_rate_needs_injected_hyperparams(self):
    batch = test_utils.fake_batch(0, 4, labels=False)
    with self.assertRaisesRegex(ValueError, 'inject_hyperparams'):
      self.tent.step(self.state, batch, meta={'log_learning_rate': 0.0})

  def test_pretraining_needs_a_batch_of_source_examples(self):
    config = default.get_config('small')
    config.pretrain.batch_size = 10**6
    bench = benchmarks.build(config.data, config.setting)
    with self.assertRaisesRegex(ValueError, 'fewer than one batch'):
      pretrain.train(config, bench, pathlib.Path(tempfile.mkdtemp()))


class EquivarianceTest(parameterized.TestCase):
  @parameterized.parameters('norm', 'tent')
  def test_permuting_the_batch_permutes_the_outputs(self, name):
    _, apply_fn, v = test_utils.tiny_bn_net(0)
    config = {'optimizer': ADAM} if name == 'tent' else {}
    adapter = methods.from_config(name, config, apply_fn)
    step = jax.jit(adapter.step)
    batch = test_utils.fake_batch(0, 16, labels=False)
    perm = np.random.default_rng(0).permutation(16)
    s1, o1 = step(adapter.init(v, jax.random.key(0)), batch)
    s2, o2 = step(
      adapter.init(v, jax.random.key(0)), {'image': batch['image'][perm]}
    )
    np.testing.assert_allclose(o1.logits[perm], o2.logits, rtol=1e-4, atol=1e-5)
    test_utils.assert_trees_close(s1.params, s2.params, rtol=1e-4, atol=1e-6)


if __name__ == '__main__':
  absltest.main()
