"""MEMO: per-sample marginal-entropy adaptation, vmapped over the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from tta_jax import models, testing as test_utils
from tta_jax._src import augment
from tta_jax.methods import memo

LR, N_AUG, B = 0.05, 4, 3
BN_MODE = models.BNMode(source_weight=0.9, ddof=1)


class MemoTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    _, apply_fn, cls.variables = test_utils.tiny_bn_net(0)
    cls.apply_fn = staticmethod(apply_fn)
    cls.x = test_utils.fake_batch(0, B, labels=False)['image']
    cls.adapter = memo.memo(apply_fn, optax.sgd(LR), num_augmentations=N_AUG)
    cls.step = staticmethod(jax.jit(cls.adapter.step))
    cls.state0 = cls.adapter.init(cls.variables, jax.random.key(0))

  def test_batch_equals_hand_computed_per_sample_loop(self):
    _, out = self.step(self.state0, {'image': self.x})
    params, stats = self.variables['params'], self.variables['batch_stats']
    apply_fn = self.apply_fn

    @jax.jit
    def by_hand(image, key):
      keys = jax.random.split(jax.random.fold_in(key, 0), N_AUG)
      views = jax.vmap(augment.memo_augment, (0, None))(keys, image)

      def marginal_entropy(p):
        logits = apply_fn(p, stats, views, bn_mode=BN_MODE).logits
        mean_prob = jnp.mean(jax.nn.softmax(logits), axis=0)
        return -jnp.sum(mean_prob * jnp.log(mean_prob))

      h, grads = jax.value_and_grad(marginal_entropy)(params)
      adapted = jax.tree.map(lambda p, g: p - LR * g, params, grads)
      pred = apply_fn(adapted, stats, image[None], bn_mode=BN_MODE).logits
      return pred[0], h

    key = jax.random.fold_in(jax.random.key(0), 0)  # rng, step 0
    preds, entropies = zip(
      *(by_hand(self.x[i], jax.random.fold_in(key, i)) for i in range(B)),
      strict=True,
    )
    np.testing.assert_allclose(
      out.logits, np.stack(preds), rtol=1e-4, atol=1e-5
    )
    self.assertAlmostEqual(
      float(out.metrics['loss']), float(np.mean(entropies)), places=5
    )
    # The adaptation did something: source predictions differ.
    source = apply_fn(params, stats, self.x[:1], bn_mode=BN_MODE).logits
    self.assertFalse(np.allclose(out.logits[:1], source, atol=1e-5))

  def test_episodic(self):
    state, out1 = self.step(self.state0, {'image': self.x})
    state, out2 = self.step(state, {'image': self.x})
    self.assertEqual(int(state.step), 2)
    self.assertTrue(test_utils.trees_equal(state.params, self.state0.params))
    self.assertTrue(
      test_utils.trees_equal(state.opt_state, self.state0.opt_state)
    )
    # Fresh views each step, from the same source parameters.
    self.assertFalse(np.allclose(out1.logits, out2.logits))

  def test_sequential_samples_equal_one_vmapped_call(self):
    # samples_per_call=1: a lax.map over single points, the per-sample loop
    # on the device.
    sequential = memo.memo(
      self.apply_fn,
      optax.sgd(LR),
      num_augmentations=N_AUG,
      samples_per_call=1,
    )
    _, a = self.step(self.state0, {'image': self.x})
    _, b = jax.jit(sequential.step)(self.state0, {'image': self.x})
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.metrics['loss'], b.metrics['loss'], rtol=1e-6)

  def test_default_shapes(self):
    adapter = memo.memo(self.apply_fn, optax.sgd(0.005))  # 32 views
    state = adapter.init(self.variables, jax.random.key(0))
    batch = test_utils.fake_batch(0, 16, labels=False)
    new, out = jax.eval_shape(adapter.step, state, batch)
    self.assertEqual(out.logits.shape, (16, test_utils.TINY_CLASSES))
    self.assertEqual(jax.tree.structure(new), jax.tree.structure(state))


if __name__ == '__main__':
  absltest.main()
