"""SAR against a hand-written SAM step, and its model recovery."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from tests import eata_test
from tta_jax import testing as test_utils
from tta_jax._src import losses, params as params_lib
from tta_jax.methods import sar as sar_lib

A, B, C, U = eata_test.A, eata_test.B, eata_test.C, eata_test.U
_rows = eata_test._rows
LINEAR = eata_test.LINEAR_VARIABLES


class SamStepTest(absltest.TestCase):
  def test_update_is_a_hand_written_sam_step(self):
    lr, rho, margin = 0.1, 0.2, 0.97
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    batch = test_utils.fake_batch(3, 16, labels=False)
    adapter = sar_lib.sar(
      apply_fn, optax.sgd(lr, momentum=0.9), margin_e0=margin, rho=rho
    )
    state = adapter.init(variables, jax.random.key(0))
    new_state, out = jax.jit(adapter.step)(state, batch)

    params, stats = variables['params'], variables['batch_stats']
    theta, frozen = params_lib.split(
      params, params_lib.bn_affine(params, stats)
    )

    @jax.jit
    def forward(trainable):
      return apply_fn(
        params_lib.merge(trainable, frozen),
        stats,
        batch['image'],
        use_batch_stats=True,
      ).logits

    def mean_entropy(trainable, rows):
      return losses.softmax_entropy(forward(trainable))[rows].mean()

    e0 = margin * math.log(test_utils.TINY_CLASSES)
    logits = forward(theta)
    mask1 = np.asarray(losses.softmax_entropy(logits)) < e0
    g1 = jax.grad(mean_entropy)(theta, mask1)
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(g1)))
    eps = jax.tree.map(lambda g: rho * g / (norm + 1e-12), g1)
    perturbed = jax.tree.map(jnp.add, theta, eps)
    e2 = np.asarray(losses.softmax_entropy(forward(perturbed)))
    mask2 = mask1 & (e2 < e0)
    # Both filters bite on this batch.
    self.assertTrue(0 < mask2.sum() < mask1.sum() < 16)
    g2 = jax.grad(mean_entropy)(perturbed, mask2)
    # First SGD-momentum step from theta (not theta + eps): theta - lr g2.
    expected = jax.tree.map(lambda p, g: p - lr * g, theta, g2)

    test_utils.assert_trees_close(
      new_state.params, params_lib.merge(expected, frozen), 1e-4, 1e-6
    )
    np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-6)
    self.assertEqual(float(out.metrics['n_reliable']), mask1.sum())
    self.assertEqual(float(out.metrics['n_selected']), mask2.sum())
    loss2 = e2[mask2].mean()
    np.testing.assert_allclose(out.metrics['loss_second'], loss2, rtol=1e-5)
    # The first second-loss value sets the EMA.
    np.testing.assert_allclose(new_state.extra.ema, loss2, rtol=1e-5)
    self.assertTrue(bool(new_state.extra.has_ema))
    self.assertTrue(test_utils.trees_equal(new_state.batch_stats, stats))


class RecoveryTest(absltest.TestCase):
  """On the linear model of eata_test, whose logits are set row by row."""

  BATCH = _rows(A * 0.6, B * 0.7, U, C * 0.55)

  def _adapter(self, **kwargs):
    return sar_lib.sar(
      eata_test._linear_apply_fn, optax.sgd(0.1, momentum=0.9), **kwargs
    )

  def _moved_state(self, adapter, step):
    """Two steps in: parameters moved and a nonzero momentum buffer."""
    state = adapter.init(LINEAR, jax.random.key(0))
    for _ in range(2):
      state, out = step(state, self.BATCH)
      self.assertEqual(float(out.metrics['recovered']), 0.0)
    self.assertFalse(test_utils.trees_equal(state.params, LINEAR['params']))
    return state

  def test_recovery_exactly_when_ema_crosses_the_threshold(self):
    adapter = self._adapter()
    step = jax.jit(adapter.step)
    state = self._moved_state(adapter, step)
    state0 = adapter.init(LINEAR, jax.random.key(0))
    _, out = step(state, self.BATCH)
    loss2 = float(out.metrics['loss_second'])
    self.assertGreater(loss2, 0.0)
    for target in (0.2 + 1e-3, 0.2 - 1e-3):
      ema = (target - 0.1 * loss2) / 0.9  # 0.9 ema + 0.1 loss2 = target
      s = state._replace(extra=state.extra._replace(ema=jnp.float32(ema)))
      new, out = step(s, self.BATCH)
      if target > 0.2:
        self.assertEqual(float(out.metrics['recovered']), 0.0)
        np.testing.assert_allclose(new.extra.ema, target, rtol=1e-5)
        self.assertTrue(bool(new.extra.has_ema))
        self.assertFalse(test_utils.trees_equal(new.params, state0.params))
      else:
        self.assertEqual(float(out.metrics['recovered']), 1.0)
        self.assertTrue(test_utils.trees_equal(new.params, state0.params))
        # The base optimizer's state survives (the official sar.py).
        self.assertFalse(
          test_utils.trees_equal(new.opt_state, state0.opt_state)
        )
        self.assertFalse(bool(new.extra.has_ema))
        self.assertEqual(float(new.extra.ema), 0.0)

  def test_first_value_sets_the_ema_and_can_trigger_recovery(self):
    state0 = self._adapter().init(LINEAR, jax.random.key(0))
    _, out = self._adapter().step(state0, self.BATCH)
    loss2 = float(out.metrics['loss_second'])
    for delta, recovered in ((-1e-3, 0.0), (1e-3, 1.0)):
      adapter = self._adapter(reset_constant=loss2 + delta)
      new, out = adapter.step(state0, self.BATCH)
      self.assertEqual(float(out.metrics['recovered']), recovered)
      moved = not test_utils.trees_equal(new.params, state0.params)
      self.assertEqual(moved, not recovered)

  def test_recovery_can_restore_the_optimizer_state_too(self):
    adapter = self._adapter(restore_optimizer_on_recovery=True)
    step = jax.jit(adapter.step)
    state = self._moved_state(adapter, step)
    state0 = adapter.init(LINEAR, jax.random.key(0))
    s = state._replace(extra=state.extra._replace(ema=jnp.float32(0.0)))
    new, out = step(s, self.BATCH)
    self.assertEqual(float(out.metrics['recovered']), 1.0)
    self.assertTrue(test_utils.trees_equal(new.params, state0.params))
    self.assertTrue(test_utils.trees_equal(new.opt_state, state0.opt_state))

  def test_official_ema_survives_recovery(self):
    adapter = self._adapter(reset_constant=10.0, clear_ema_on_recovery=False)
    state0 = adapter.init(LINEAR, jax.random.key(0))
    new, out = adapter.step(state0, self.BATCH)
    self.assertEqual(float(out.metrics['recovered']), 1.0)
    self.assertTrue(test_utils.trees_equal(new.params, state0.params))
    self.assertTrue(bool(new.extra.has_ema))
    np.testing.assert_allclose(new.extra.ema, out.metrics['loss_second'])

  def test_empty_selection_keeps_ema_but_momentum_moves(self):
    adapter = self._adapter()
    step = jax.jit(adapter.step)
    state = self._moved_state(adapter, step)
    # Nothing reliable: zero gradients, the EMA is kept, and SGD's momentum
    # alone moves the parameters (as sar.py's zero-gradient step does).
    new, out = step(state, _rows(U, U, A, mask=[1, 1, 0]))
    self.assertEqual(float(out.metrics['n_reliable']), 0.0)
    for value in out.metrics.values():
      self.assertTrue(np.isfinite(value))
    self.assertTrue(test_utils.trees_equal(new.extra, state.extra))
    trace = state.opt_state[0].trace['bn']
    expected = jax.tree.map(
      lambda p, t: p - 0.1 * 0.9 * t, state.params['bn'], trace
    )
    test_utils.assert_trees_close(new.params['bn'], expected, 1e-6, 1e-7)


if __name__ == '__main__':
  absltest.main()
