"""Meta-learning through `unroll`: second-order gradients and a toy run."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest
from sklearn.datasets import load_digits

import tta_jax as tj
from tta_jax import methods, models, testing as test_utils
from tta_jax.trainers import base as trainers_base


def _tent_sgd(apply_fn):
  return methods.tent.tent(
    apply_fn, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
  )


class SecondOrderTest(absltest.TestCase):
  def test_meta_gradient_matches_finite_differences(self):
    with jax.enable_x64(True):
      _, apply_fn, variables = test_utils.tiny_bn_net(2)
      variables = jax.tree.map(lambda x: x.astype(jnp.float64), variables)
      episode = test_utils.stack_batches(
        [test_utils.fake_batch(i, 12) for i in range(3)]
      )
      episode['image'] = episode['image'].astype(np.float64)
      adapter = _tent_sgd(apply_fn)

      def loss(log_lr, first_order=False):
        return tj.meta_loss(
          {'log_learning_rate': log_lr},
          adapter,
          variables,
          episode,
          jax.random.key(0),
          first_order=first_order,
        )[0]

      x = jnp.float64(np.log(0.5))
      grad = jax.grad(loss)(x)
      eps = 1e-4
      fd = (loss(x + eps) - loss(x - eps)) / (2 * eps)
      np.testing.assert_allclose(grad, fd, rtol=1e-5)
      # The nested derivative is live: first-order differs measurably.
      fo = jax.grad(functools.partial(loss, first_order=True))(x)
      self.assertGreater(abs(float(fo - grad)), 1e-3 * abs(float(grad)))

  def test_remat_gives_the_same_gradient(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(2)
    episode = test_utils.stack_batches(
      [test_utils.fake_batch(i, 12) for i in range(3)]
    )
    adapter = _tent_sgd(apply_fn)
    grads = [
      jax.grad(
        lambda m, r=remat: tj.meta_loss(
          m, adapter, variables, episode, jax.random.key(0), remat=r
        )[0]
      )({'log_learning_rate': jnp.log(0.5)})
      for remat in (False, True)
    ]
    test_utils.assert_trees_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@functools.lru_cache(maxsize=1)
def _trained_digits_net():
  """A width-8 BN net trained on the 8x8 UCI digits (a few seconds)."""
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], y[order]
  module = models.build('digits_cnn', num_classes=10, width=8)
  apply_fn = models.make_apply_fn(module, (8, 8, 1))
  v = models.init_variables(module, (8, 8, 1), jax.random.key(0))
  tx = optax.adam(3e-3)
  opt = tx.init(v['params'])

  @jax.jit
  def train_step(v, opt, xb, yb):
    def loss(p):
      out = apply_fn(p, v['batch_stats'], xb, use_batch_stats=True)
      return tj.losses.cross_entropy(out.logits, yb).mean(), out.batch_stats

    (_, stats), g = jax.value_and_grad(loss, has_aux=True)(v['params'])
    updates, opt = tx.update(g, opt, v['params'])
    ema = jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, v['batch_stats'], stats)
    return {
      'params': optax.apply_updates(v['params'], updates),
      'batch_stats': ema,
    }, opt

  r = np.random.default_rng(1)
  for _ in range(300):
    idx = r.integers(0, 1200, 64)
    v, opt = train_step(v, opt, x[idx], y[idx])
  return apply_fn, v, x, y


def _shifted_episode(x, y, seed, steps=16, batch=32):
  """Low contrast, an offset and pixel noise: a toy covariate shift."""
  r = np.random.default_rng(seed)
  idx = r.integers(0, len(x), steps * batch)
  img = np.clip(0.4 * x[idx] + 0.3 + r.normal(0, 0.15, x[idx].shape), 0, 1)
  return {
    'image': img.astype(np.float32).reshape(steps, batch, 8, 8, 1),
    'label': y[idx].reshape(steps, batch),
  }


class LogProgressTest(absltest.TestCase):
  def test_floats_back_and_stops_on_non_finite(self):
    metrics = {'loss': jnp.ones([])}
    out = trainers_base.log_progress('m', 5, 10, metrics, 1.0, 'x')
    self.assertEqual(out, {'loss': 1.0})
    with self.assertRaisesRegex(
      FloatingPointError, r'm: non-finite .* step 5: .*nan.*; lower lr'
    ):
      trainers_base.log_progress(
        'm', 5, 10, {'loss': jnp.array(np.nan)}, 1.0, 'lower lr'
      )


class MetaLearnTentLearningRateTest(absltest.TestCase):
  """Meta-learn Tent's learning rate through the unrolled stream."""

  @pytest.mark.slow
  def test_meta_training_finds_a_better_learning_rate(self):
    apply_fn, variables, x, y = _trained_digits_net()
    adapter = methods.tent.tent(
      apply_fn, optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
    )
    held_out = [_shifted_episode(x, y, 1000 + i) for i in range(3)]
    loss_at = jax.jit(
      lambda meta, e: tj.meta_loss(
        meta, adapter, variables, e, jax.random.key(0)
      )[0]
    )

    def held_out_loss(meta):
      return np.mean([float(loss_at(meta, e)) for e in held_out])

    meta_tx = optax.adam(0.3)
    state = tj.init_meta_train_state(
      {'log_learning_rate': jnp.log(0.1)}, meta_tx, jax.random.key(0)
    )
    before = held_out_loss(state.meta)
    train_step = tj.make_meta_train_step(adapter, meta_tx)
    for i in range(12):
      state, metrics = train_step(state, variables, _shifted_episode(x, y, i))
      self.assertTrue(np.isfinite(float(metrics['loss'])))
    after = held_out_loss(state.meta)
    lr = float(jnp.exp(state.meta['log_learning_rate']))
    # lr 0.1 over-adapts on this shift (entropy minimisation on wrong
    # pseudo-labels); the meta-gradient must pull it down and help.
    self.assertLess(lr, 0.05)
    self.assertLess(after, before - 0.2)


if __name__ == '__main__':
  absltest.main()
