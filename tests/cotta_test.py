"""CoTTA: mean-teacher target, EMA, stochastic restore, augmentation gate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from tta_jax import models, testing as test_utils
from tta_jax._src import augment, losses
from tta_jax.methods import cotta

K, N_AUG, LR, EMA, AP = 3, 3, 0.1, 0.9, 0.5
CALLS = []  # use_batch_stats of every forward, recorded at trace time


def fake_apply(
  params, batch_stats, images, *, use_batch_stats=False, bn_mode=None, mask=None
):
  """A linear model whose `scale` sets how confident it is."""
  del bn_mode, mask
  CALLS.append(use_batch_stats)
  x = images.reshape(images.shape[0], -1)
  head = params['head']
  logits = head['scale'] * (x @ head['kernel'] + head['bias'])
  return models.ModelOutput(logits, {'pre_logits': x}, batch_stats)


def _params(seed, scale):
  r = np.random.default_rng(seed)
  return {
    'head': {
      'kernel': jnp.asarray(r.normal(size=(64, K)), jnp.float32),
      'bias': jnp.asarray(r.normal(size=(K,)), jnp.float32),
      'scale': jnp.asarray(scale, jnp.float32),
    }
  }


def _logits(params, x):
  return fake_apply(params, {}, x, use_batch_stats=True).logits


_augment = jax.jit(augment.cotta_augment)


def _adapter(**kw):
  return cotta.cotta(
    fake_apply,
    optax.sgd(LR),
    ema_momentum=EMA,
    ap_threshold=AP,
    num_augmentations=N_AUG,
    **kw,
  )


class CottaTest(absltest.TestCase):
  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x = test_utils.fake_batch(0, 4, labels=False)['image']  # [4, 8, 8, 1]
    cls.student = _params(1, 1.0)
    cls.teacher = _params(2, 1.0)
    # A confident source (c > AP) and an unsure one (c < AP).
    cls.sources = {'confident': _params(3, 50.0), 'unsure': _params(3, 1e-3)}
    cls.plain = _adapter(restore_prob=0.0)
    # Also the official CIFAR code's always-compute path, and the teacher's
    # augmented forwards in chunks of 2 (with a remainder of 1).
    cls.restore_all = _adapter(
      restore_prob=1.0, always_augment=True, augmentations_per_call=2
    )
    cls.step_plain = staticmethod(jax.jit(cls.plain.step))
    cls.step_restore = staticmethod(jax.jit(cls.restore_all.step))

  def _state(self, adapter, source):
    state = adapter.init(
      {'params': source, 'batch_stats': {}}, jax.random.key(0)
    )
    state = state._replace(step=jnp.asarray(5, jnp.int32))
    return state._replace(
      params=self.student,
      extra=cotta.CottaState(teacher=self.teacher, source=source),
    )

  def _expected_target(self, source, augmented):
    if not augmented:
      return _logits(self.teacher, self.x)
    key_aug, _ = jax.random.split(jax.random.fold_in(jax.random.key(0), 5))
    views = [_augment(k, self.x) for k in jax.random.split(key_aug, N_AUG)]
    return np.mean([_logits(self.teacher, v) for v in views], axis=0)

  def test_augmentation_gate_and_teacher_target(self):
    for name, source in self.sources.items():
      probs = jax.nn.softmax(_logits(source, self.x))
      c = float(np.mean(np.max(probs, axis=-1)))
      augmented = c < AP
      self.assertEqual(augmented, name == 'unsure')
      expected = self._expected_target(source, augmented)
      for step in (self.step_plain, self.step_restore):
        _, out = step(self._state(self.plain, source), {'image': self.x})
        self.assertAlmostEqual(
          float(out.metrics['anchor_confidence']), c, places=5
        )
        self.assertEqual(float(out.metrics['augmented']), float(augmented))
        # The scored logits are the teacher's (augmentation-averaged) ones.
        np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-5)
        self.assertFalse(np.allclose(out.logits, _logits(self.student, self.x)))
    # Every network normalised with batch statistics.
    self.assertTrue(CALLS and all(CALLS))

  def test_student_step_and_teacher_ema(self):
    source = self.sources['unsure']
    state = self._state(self.plain, source)
    new, out = self.step_plain(state, {'image': self.x})
    target = self._expected_target(source, True)

    def loss_fn(p):
      return jnp.mean(losses.soft_cross_entropy(_logits(p, self.x), target))

    loss, grads = jax.value_and_grad(loss_fn)(self.student)
    self.assertAlmostEqual(float(out.metrics['loss']), float(loss), places=5)
    student = jax.tree.map(lambda p, g: p - LR * g, self.student, grads)
    teacher = jax.tree.map(
      lambda t, s: EMA * t + (1 - EMA) * s, self.teacher, student
    )
    # restore_prob=0: the student is the plain optimizer step.
    test_utils.assert_trees_close(new.params, student, 1e-5, 1e-6)
    test_utils.assert_trees_close(new.extra.teacher, teacher, 1e-5, 1e-6)
    self.assertTrue(test_utils.trees_equal(new.extra.source, source))
    self.assertEqual(int(new.step), 6)

    # restore_prob=1: every entry returns to the source value exactly; the
    # teacher's EMA still saw the updated (pre-restore) student.
    restored, _ = self.step_restore(state, {'image': self.x})
    self.assertTrue(test_utils.trees_equal(restored.params, source))
    test_utils.assert_trees_close(restored.extra.teacher, teacher, 1e-5, 1e-6)

  def test_symmetric_loss(self):
    source = self.sources['confident']
    adapter = _adapter(restore_prob=0.0, symmetric_loss=True)
    _, out = jax.jit(adapter.step)(
      self._state(adapter, source), {'image': self.x}
    )
    z_s, z_t = _logits(self.student, self.x), _logits(self.teacher, self.x)
    p_s, p_t = jax.nn.softmax(z_s), jax.nn.softmax(z_t)
    expected = np.mean(
      -0.5 * np.sum(p_t * jax.nn.log_softmax(z_s), -1)
      - 0.5 * np.sum(p_s * jax.nn.log_softmax(z_t), -1)
    )
    self.assertAlmostEqual(
      float(out.metrics['loss']), float(expected), places=5
    )

  def test_default_shapes_on_the_tiny_net(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    adapter = cotta.cotta(apply_fn, optax.adam(1e-3))  # 32 augmentations
    state = adapter.init(variables, jax.random.key(0))
    batch = test_utils.fake_batch(0, 16, labels=False)
    new, out = jax.eval_shape(adapter.step, state, batch)
    self.assertEqual(out.logits.shape, (16, test_utils.TINY_CLASSES))
    self.assertEqual(jax.tree.structure(new), jax.tree.structure(state))
    # Student, teacher and source: three copies of the parameters.
    for copy in (state.params, state.extra.teacher, state.extra.source):
      self.assertTrue(test_utils.trees_equal(copy, variables['params']))


if __name__ == '__main__':
  absltest.main()
