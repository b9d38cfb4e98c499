"""Meta-TTT: losses, minimax steps, episodic protocol, second-order grads."""

import functools
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl.testing import absltest

from configs import meta_ttt_cifar, meta_ttt_digits
from tta_jax import models, testing as test_utils
from tta_jax._src import losses, params as params_lib
from tta_jax.data.images import corruptions
from tta_jax.methods import meta_ttt
from tta_jax.runners import adapt, train
from tta_jax.trainers import meta_ttt as meta_ttt_trainer


def _alpha_net(seed=0):
  """The tiny digits net with a learnable alpha in every BN layer."""
  apply_fn, variables = _cached_alpha_net(seed)
  return apply_fn, dict(variables)


@functools.lru_cache(maxsize=4)
def _cached_alpha_net(seed):
  module = models.build(
    'digits_cnn', num_classes=5, width=4, bn_alpha_init=0.75
  )
  variables = models.init_variables(
    module, test_utils.TINY_SHAPE, jax.random.key(seed)
  )
  _, _, tiny = test_utils.tiny_bn_net(seed)  # its randomised statistics
  variables['batch_stats'] = tiny['batch_stats']
  return models.make_apply_fn(module, test_utils.TINY_SHAPE), variables


def _sub(params, mask):
  return params_lib.split(params, mask)[0]


class LossTest(absltest.TestCase):
  def test_gem_t_of_one_row_is_entropy(self):
    z = jax.random.normal(jax.random.key(0), (1, 7)) * 3
    np.testing.assert_allclose(
      losses.gem_t(z), losses.softmax_entropy(z)[0], rtol=1e-6
    )
    # Masked GEM-T equals GEM-T of the selected rows (temperature included).
    z = jax.random.normal(jax.random.key(1), (6, 7)) * 3
    mask = jnp.array([True, False, True, True, False, True])
    np.testing.assert_allclose(
      losses.gem_t(z, mask), losses.gem_t(z[mask]), rtol=1e-6
    )
    np.testing.assert_allclose(
      losses.gem_t(z, mask, scale=2.0), losses.gem_t(z[mask], scale=2.0)
    )
    self.assertEqual(float(losses.gem_t(z, jnp.zeros(6, bool))), 0.0)

  def test_gem_t_temperature(self):
    # Two rows: centred logits +-d per class, std over rows = d * sqrt(2).
    z = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
    t = np.sqrt(2.0)
    p = np.exp(2 / t) / (np.exp(2 / t) + 1)
    expected = -(p * np.log(p) + (1 - p) * np.log(1 - p))
    np.testing.assert_allclose(losses.gem_t(z), expected, rtol=1e-6)

  def test_confidence_split_weights(self):
    # Softmax max-probs: row 0 ~0.99 (confident), rows 1-2 ~0.4 (not), row 3
    # confident but padding.
    logits = jnp.array(
      [[6.0, 0.0, 0.0], [0.5, 0.2, 0.0], [0.0, 0.3, 0.4], [9.0, 0.0, 0.0]]
    )
    mask = jnp.array([True, True, True, False])
    s_sup, s_unsup, n_conf = meta_ttt.ssl_loss(logits, mask, threshold=0.8)
    ce0 = losses.cross_entropy(logits[:1], jnp.array([0]))[0]
    np.testing.assert_allclose(s_sup, 2 * (1 / 3) * ce0, rtol=1e-6)
    np.testing.assert_allclose(
      s_unsup, 2 * (2 / 3) * losses.gem_t(logits[1:3]), rtol=1e-6
    )
    self.assertEqual(float(n_conf), 1.0)
    # tau = 0: no split, plain GEM-T with weight 1.
    s_sup, s_unsup, _ = meta_ttt.ssl_loss(logits, mask, threshold=0.0)
    self.assertEqual(float(s_sup), 0.0)
    np.testing.assert_allclose(s_unsup, losses.gem_t(logits[:3]), rtol=1e-6)
    # tau > 1: every row unconfident, weight 2.
    s_sup, s_unsup, _ = meta_ttt.ssl_loss(logits, mask, threshold=1.1)
    self.assertEqual(float(s_sup), 0.0)
    np.testing.assert_allclose(s_unsup, 2 * losses.gem_t(logits[:3]), rtol=1e-6)
    # tau -> 0+: every row confident, weight 2 on the pseudo-label CE.
    s_sup, s_unsup, _ = meta_ttt.ssl_loss(
      logits, mask, threshold=1e-6, loss='entropy'
    )
    self.assertEqual(float(s_unsup), 0.0)
    ce = losses.cross_entropy(logits[:3], jnp.argmax(logits[:3], -1)).mean()
    np.testing.assert_allclose(s_sup, 2 * ce, rtol=1e-6)

  def test_shift_sampler(self):
    key = jax.random.key(0)
    w, b = meta_ttt_trainer.sample_feature_shift(key, 64, 0.0)
    np.testing.assert_array_equal(w, np.ones(64))
    np.testing.assert_array_equal(b, np.zeros(64))
    w, b = meta_ttt_trainer.sample_feature_shift(key, 64, 1.0)
    self.assertTrue(np.all((w >= 0) & (w < 1)) and np.all((b >= 0) & (b < 1)))
    self.assertLen(np.unique(np.asarray(w)), 64)
    w, b = meta_ttt_trainer.sample_feature_shift(key, 20000, 0.3)
    self.assertAlmostEqual(float(np.mean(w != 1)), 0.3, delta=0.02)
    self.assertAlmostEqual(float(np.mean(b != 0)), 0.3, delta=0.02)
    # Weights and biases are masked independently.
    both = np.mean((np.asarray(w) != 1) & (np.asarray(b) != 0))
    self.assertAlmostEqual(float(both), 0.09, delta=0.015)


class AdapterTest(absltest.TestCase):
  def test_mixed_bn_limits_through_the_method(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    batch = test_utils.fake_batch(0, 16, labels=False)
    frozen = dict(max_lr=0.0, min_lr=0.0)
    cases = {
      1.0: apply_fn(**variables, images=batch['image']).logits,
      0.0: apply_fn(
        **variables, images=batch['image'], bn_mode=models.BNMode(ddof=1)
      ).logits,
    }
    for alpha, expected in cases.items():
      adapter = meta_ttt.meta_ttt(apply_fn, alpha=alpha, **frozen)
      state = adapter.init(variables, jax.random.key(0))
      _, out = jax.jit(adapter.step)(state, batch)
      np.testing.assert_allclose(out.logits, expected, rtol=1e-4, atol=1e-5)
    # Outside [0, 1] the mixed variance can be negative: refused.
    with self.assertRaisesRegex(ValueError, r'alpha must be in \[0, 1\]'):
      meta_ttt.meta_ttt(apply_fn, alpha=1.5)
    # The same limits with the learned per-channel alpha of every layer.
    alpha_apply, alpha_vars = _alpha_net(0)
    for alpha, mode in ((1.0, None), (0.0, models.BNMode(ddof=1))):
      params = jax.tree_util.tree_map_with_path(
        lambda path, x, a=alpha: (
          jnp.full_like(x, a) if path[-1].key == 'alpha' else x
        ),
        alpha_vars['params'],
      )
      mixed = alpha_apply(
        params,
        alpha_vars['batch_stats'],
        batch['image'],
        bn_mode=models.mixed_bn(),
      ).logits
      expected = alpha_apply(
        params, alpha_vars['batch_stats'], batch['image'], bn_mode=mode
      ).logits
      np.testing.assert_allclose(mixed, expected, rtol=1e-4, atol=1e-5)

  def test_minimax_moves_the_right_parameters_the_right_way(self):
    apply_fn, variables = _alpha_net()
    params, stats = variables['params'], variables['batch_stats']
    images = test_utils.fake_batch(3, 16, labels=False)['image']
    inner = meta_ttt.make_minimax(apply_fn, threshold=1.1, exclude='bn1')

    def unsup(p):  # 2 x GEM-T of every row: all are unconfident
      out = apply_fn(p, stats, images, bn_mode=inner.bn_mode)
      return float(
        meta_ttt.ssl_loss(out.logits, jnp.ones(16, bool), threshold=1.1)[1]
      )

    groups = inner.groups(params, stats)
    self.assertEqual(
      params_lib.selected_paths(params, groups['max']), ['bn4/bias']
    )
    self.assertEqual(
      params_lib.selected_paths(params, groups['min']),
      ['bn2/bias', 'bn2/scale', 'bn3/bias', 'bn3/scale', 'bn4/scale'],
    )
    after_max, _ = inner.adapt(params, stats, images, phases=('max',))
    self.assertGreater(unsup(after_max), unsup(params))  # entropy up
    not_max = params_lib.difference(
      params_lib.all_params, lambda *_: groups['max']
    )
    self.assertTrue(
      test_utils.trees_equal(
        _sub(after_max, not_max(params, stats)),
        _sub(params, not_max(params, stats)),
      )
    )
    self.assertFalse(test_utils.trees_equal(after_max, params))
    after_min, _ = inner.adapt(after_max, stats, images, phases=('min',))
    self.assertLess(unsup(after_min), unsup(after_max))  # entropy down
    not_min = params_lib.difference(
      params_lib.all_params, lambda *_: groups['min']
    )
    self.assertTrue(
      test_utils.trees_equal(
        _sub(after_min, not_min(params, stats)),
        _sub(after_max, not_min(params, stats)),
      )
    )  # psi_max, the excluded bn1, alpha, convs and head untouched
    # Both steps descend the pseudo-label CE of confident rows.
    inner = meta_ttt.make_minimax(apply_fn, threshold=1e-6, max_lr=0.05)

    def sup(p):
      out = apply_fn(p, stats, images, bn_mode=inner.bn_mode)
      return float(
        meta_ttt.ssl_loss(out.logits, jnp.ones(16, bool), threshold=1e-6)[0]
      )

    after_max, _ = inner.adapt(params, stats, images, phases=('max',))
    self.assertLess(sup(after_max), sup(params))

  def test_paper_groups(self):
    apply_fn, variables = _alpha_net()
    params, stats = variables['params'], variables['batch_stats']
    inner = meta_ttt.make_minimax(apply_fn, groups='paper')
    groups = inner.groups(params, stats)
    self.assertEqual(
      params_lib.selected_paths(params, groups['max']),
      ['bn1/bias', 'bn2/bias', 'bn3/bias', 'bn4/bias'],
    )
    self.assertEqual(
      params_lib.selected_paths(params, groups['min']),
      ['bn1/scale', 'bn2/scale', 'bn3/scale', 'bn4/scale'],
    )
    inner = meta_ttt.make_minimax(apply_fn, minimax=False, adapt_alpha=True)
    self.assertEqual(params_lib.count(inner.groups(params, stats)['max']), 0)
    self.assertIn(
      'bn1/alpha',
      params_lib.selected_paths(params, inner.groups(params, stats)['min']),
    )

  def test_code_groups_maximise_with_the_last_bn_of_each_family(self):
    # ResNet-50 also has ResNet-18's `layer4_1/bn2`: its last BN before
    # pooling is the last block's `bn3`.
    for name, shape, want in (
      ('digits_cnn', (28, 28, 1), 'bn4'),
      ('resnet18', (32, 32, 3), 'layer4_1/bn2'),
      ('resnet50', (32, 32, 3), 'layer4_2/bn3'),
      ('wide_resnet28_2', (32, 32, 3), 'bn'),
    ):
      module = models.build(name, num_classes=10)
      v = jax.eval_shape(
        lambda m=module, s=shape: models.init_variables(m, s, jax.random.key(0))
      )
      inner = meta_ttt.make_minimax(None, alpha=0.5)
      groups = inner.groups(v['params'], v['batch_stats'])
      self.assertEqual(
        params_lib.selected_paths(v['params'], groups['max']),
        [f'{want}/bias'],
        name,
      )
    with self.assertRaisesRegex(ValueError, 'none of .* is a BN layer'):
      models.last_bn({'norm': {'mean': 0, 'var': 1}})

  def test_episodic_and_needs_alpha(self):
    apply_fn, variables = _alpha_net()
    adapter = meta_ttt.meta_ttt(apply_fn)
    step = jax.jit(adapter.step)
    state0 = adapter.init(variables, jax.random.key(0))
    b1, b2 = (test_utils.fake_batch(i, 16, labels=False) for i in (1, 2))
    state1, out1 = step(state0, b1)
    _, out2_after = step(state1, b2)
    _, out2_alone = step(state0, b2)
    np.testing.assert_array_equal(out2_after.logits, out2_alone.logits)
    self.assertTrue(test_utils.trees_equal(state1.params, state0.params))
    self.assertFalse(
      np.allclose(
        out1.logits,
        apply_fn(
          **variables, images=b1['image'], bn_mode=models.mixed_bn()
        ).logits,
      )
    )  # it did adapt
    _, plain_apply, plain = test_utils.tiny_bn_net(0)
    with self.assertRaisesRegex(ValueError, 'alpha'):
      meta_ttt.meta_ttt(plain_apply).init(plain, jax.random.key(0))


class MetaGradientTest(absltest.TestCase):
  def test_second_order_matches_finite_differences(self):
    with jax.enable_x64(True):
      apply_fn, variables = _alpha_net(1)
      f64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
      theta, stats = f64(variables['params']), f64(variables['batch_stats'])
      # A sharper head spreads the confidences, so the split has margins.
      theta['head']['kernel'] = 8.0 * theta['head']['kernel']
      batch = test_utils.fake_batch(4, 12)
      batch = {
        'image': jnp.asarray(batch['image'], jnp.float64),
        'label': jnp.asarray(batch['label']),
      }
      shift = (jnp.linspace(0.5, 1.0, 4), jnp.linspace(0.0, 0.3, 4))
      out = apply_fn(
        theta,
        stats,
        batch['image'],
        bn_mode=models.mixed_bn(),
        feature_shift=shift,
      )
      conf = np.sort(np.asarray(jax.nn.softmax(out.logits).max(-1)))
      gap = int(np.argmax(np.diff(conf)[2:-2])) + 2  # both sides non-empty
      tau = float(conf[gap] + conf[gap + 1]) / 2
      # Shannon entropy: GEM-T's temperature is a stop-gradient constant,
      # which finite differences would see vary.
      inner = meta_ttt.make_minimax(
        apply_fn, threshold=tau, loss='entropy', max_lr=0.5, min_lr=0.5
      )

      def objective(t, first_order=False):
        return meta_ttt_trainer.meta_objective(
          apply_fn, inner, t, stats, batch, shift=shift, first_order=first_order
        )

      # One compiled function each: the value with the split of each phase
      # (confident fractions), and both meta-gradients.
      @jax.jit
      def evaluate(t):
        value, m = objective(t)
        return value, (m['max_confident'], m['min_confident'])

      def grads(t):
        second = jax.grad(objective, has_aux=True)(t)[0]
        first = jax.grad(lambda u: objective(u, True), has_aux=True)(t)[0]
        return second, first

      grad, grad_fo = jax.jit(grads)(theta)
      splits = lambda t: tuple(float(x) for x in evaluate(t)[1])  # noqa: E731
      self.assertBetween(splits(theta)[0], 0.1, 0.9)  # a real split
      rng = np.random.default_rng(0)
      leaves, tree = jax.tree.flatten(theta)
      eps = 1e-6  # float64; small enough to cross no ReLU/max-pool kink
      for _ in range(3):
        v = jax.tree.unflatten(
          tree, [jnp.asarray(rng.normal(size=x.shape)) for x in leaves]
        )
        plus = jax.tree.map(lambda t, d: t + eps * d, theta, v)
        minus = jax.tree.map(lambda t, d: t - eps * d, theta, v)
        self.assertEqual(splits(plus), splits(minus))  # smooth neighbourhood
        fd = (evaluate(plus)[0] - evaluate(minus)[0]) / (2 * eps)
        dot = lambda g: sum(
          float(jnp.vdot(a, b))
          for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v), strict=True)
        )  # noqa: E731
        np.testing.assert_allclose(dot(grad), fd, rtol=1e-5, atol=1e-8)
        # The first-order gradient misses the inner step's Hessian term.
        self.assertGreater(abs(dot(grad_fo) - fd), 1e-3 * abs(fd))


class ConfigTest(absltest.TestCase):
  def test_every_variant_builds(self):
    config = meta_ttt_digits.get_config('alpha_sweep=true')
    names = adapt.validate_config(config)
    self.assertContainsSubset(
      ['meta_ttt_no_meta_alpha_0p25', 'meta_ttt_alpha_init_0p9'], names
    )
    self.assertContainsSubset(
      set(config.meta_methods.split(',')), set(config.meta_train)
    )
    self.assertEqual(config.meta_train.meta_ttt_no_shift.shift_p, 0.0)

  def test_shift_sweep_and_validation_stream(self):
    config = meta_ttt_digits.get_config('shift_sweep,validation')
    adapt.validate_config(config)
    swept = {
      config.meta_train[n].shift_p
      for n in config.meta_methods.split(',')
      if n.startswith('meta_ttt_shift_')
    }
    default = config.meta_train.meta_ttt.shift_p
    self.assertEqual(swept | {default}, set(meta_ttt_digits.SHIFT_PS))
    self.assertNotIn(default, swept)
    self.assertEqual(config.data.target_split, 'val')
    self.assertEqual(
      tuple(config.data.corruptions), corruptions.VALIDATION_CORRUPTIONS
    )
    self.assertEqual(config.results_name, 'validation')

  def test_variants_inherit_the_main_trainer(self):
    config = meta_ttt_cifar.get_config('ablations=true,steps=7')
    for name in ('meta_ttt', 'meta_ttt_fixed_alpha', 'meta_ttt_no_minimax'):
      self.assertEqual(config.meta_train[name].steps, 7)
      self.assertEqual(
        config.meta_train[name].shift_p, meta_ttt_digits.STEM16_SHIFT_P
      )
    self.assertEqual(config.meta_train.meta_ttt_no_shift.shift_p, 0.0)


# Meta-training compiles two second-order steps: ~1-2 min on 2 CPU cores,
# too slow for the default suite (run with `-m slow`).
@pytest.mark.slow
class EndToEndTest(absltest.TestCase):
  def test_small_meta_train_then_adapt(self):
    config = meta_ttt_digits.get_config('small,ablations=false')
    config.methods = 'source,meta_ttt'  # norm and tent have their own tests
    workdir = pathlib.Path(tempfile.mkdtemp())
    train.run(config, workdir)
    metadata = json.loads(
      (workdir / 'meta/meta_ttt/backbone/metadata.json').read_text()
    )
    self.assertEqual(metadata['model']['bn_alpha_init'], 0.75)
    adapt.run(config, workdir)
    results = json.loads((workdir / 'results.json').read_text())
    self.assertEqual(list(results['methods']), ['source', 'meta_ttt'])
    for name in results['methods']:
      self.assertBetween(results['methods'][name]['mean_error'], 0.0, 1.0)

  def test_cifar_config_meta_trains_on_the_clean_train_split(self):
    # configs/meta_ttt_cifar.py end to end on TFDS mock data (the real
    # `tfds.data_source` path), with a tiny CNN in place of WRN-28-10: the
    # source model is pretrained on the train split, then meta-trained.
    config = meta_ttt_cifar.get_config('small')
    config.model = ml_collections.ConfigDict({'name': 'digits_cnn', 'width': 4})
    config.data.loader_kwargs.corruptions = ('fog',)
    config.data.max_examples_per_domain = 16
    config.pretrain.update(epochs=1, batch_size=32)
    workdir = pathlib.Path(tempfile.mkdtemp())
    with tfds.testing.mock_data(num_examples=64):
      train.run(config, workdir)
    metrics = json.loads((workdir / 'meta/meta_ttt/metadata.json').read_text())
    self.assertEqual(metrics['method'], 'meta_ttt')
    self.assertTrue((workdir / 'meta/meta_ttt/backbone/metadata.json').exists())


if __name__ == '__main__':
  absltest.main()
