"""EATA / ETA against hand computations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl.testing import absltest

from tta_jax import models, testing as test_utils
from tta_jax._src import losses, params as params_lib
from tta_jax.methods import eata as eata_lib

K = 4
E0 = 0.4 * math.log(K)


def _linear_apply_fn(params, batch_stats, images, **kwargs):
  """logits = x * scale + bias (x: the K pixels of a [B, 1, 1, K] image).

  The 'bn' module owns batch statistics, so `bn_affine` adapts exactly
  (scale, bias); the identity `head` only sizes EATA's moving average. With
  these logits the filters can be set up row by row.
  """
  del batch_stats, kwargs
  x = images.reshape(images.shape[0], -1)
  z = x * params['bn']['scale'] + params['bn']['bias']
  logits = z @ params['head']['kernel'] + params['head']['bias']
  return models.ModelOutput(logits, {'pre_logits': z}, {})


LINEAR_VARIABLES = {
  'params': {
    'bn': {'scale': jnp.ones(K), 'bias': jnp.zeros(K)},
    'head': {'kernel': jnp.eye(K), 'bias': jnp.zeros(K)},
  },
  'batch_stats': {'bn': {'mean': jnp.zeros(K), 'var': jnp.ones(K)}},
}


def _rows(*logits, mask=None):
  """A batch whose linear-model logits (at the initial params) are `logits`."""
  images = np.asarray(logits, np.float32).reshape(len(logits), 1, 1, K)
  batch = {'image': images}
  if mask is not None:
    batch['mask'] = np.asarray(mask, bool)
  return batch


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _entropy(z):
  p = _softmax(z)
  return -(p * np.log(p)).sum(-1)


A, B, C, D = np.eye(K) * 6.0  # confident rows, one per class
U = np.zeros(K)  # uniform: entropy ln K > E0


class EataFilterTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    # lr 0: the logits stay the hand-built ones across steps.
    self.adapter = eata_lib.eta(_linear_apply_fn, optax.sgd(0.0))
    self.step = jax.jit(self.adapter.step)

  def test_reliable_redundant_and_padding_rows(self):
    state = self.adapter.init(LINEAR_VARIABLES, jax.random.key(0))
    # First batch: no moving average yet, so every reliable row is selected;
    # the padding row (confident, novel) never is.
    batch1 = _rows(A, A, U, B, C, mask=[1, 1, 1, 0, 1])
    state, out = self.step(state, batch1)
    self.assertEqual(float(out.metrics['n_reliable']), 3)
    self.assertEqual(float(out.metrics['n_selected']), 3)
    m1 = _softmax([A, A, C]).mean(0)
    np.testing.assert_allclose(state.extra.probs, m1, rtol=1e-6)
    self.assertTrue(bool(state.extra.initialised))
    np.testing.assert_allclose(out.logits, batch1['image'].reshape(5, K))

    # Second batch: A and C are redundant with m (|cos| > 0.05), B and D are
    # novel; U is unreliable; the padded B does not count.
    p = _softmax([B, A, D, U, C, B])
    cos = p @ m1 / (np.linalg.norm(p, axis=1) * np.linalg.norm(m1))
    np.testing.assert_array_less(np.abs(cos[[0, 2]]), 0.05)
    self.assertTrue(np.all(np.abs(cos[[1, 4]]) > 0.05))
    batch2 = _rows(B, A, D, U, C, B, mask=[1, 1, 1, 1, 1, 0])
    state, out = self.step(state, batch2)
    self.assertEqual(float(out.metrics['n_reliable']), 4)
    self.assertEqual(float(out.metrics['n_selected']), 2)
    m2 = 0.9 * m1 + 0.1 * _softmax([B, D]).mean(0)
    np.testing.assert_allclose(state.extra.probs, m2, rtol=1e-6)
    # The loss: mean over the selected rows of exp(E0 - E) E.
    e = _entropy([B, D])
    np.testing.assert_allclose(
      out.metrics['loss'], np.mean(np.exp(E0 - e) * e), rtol=1e-5
    )

  def test_nothing_reliable_on_first_batch_leaves_m_unset(self):
    state = self.adapter.init(LINEAR_VARIABLES, jax.random.key(0))
    state, out = self.step(state, _rows(U, U, A, mask=[1, 1, 0]))
    self.assertEqual(float(out.metrics['n_selected']), 0)
    self.assertFalse(bool(state.extra.initialised))
    # The next batch then initialises m without the redundancy filter.
    state, out = self.step(state, _rows(A, A, U))
    self.assertEqual(float(out.metrics['n_selected']), 2)
    np.testing.assert_allclose(state.extra.probs, _softmax(A), rtol=1e-6)


class EataUpdateTest(absltest.TestCase):
  def test_update_is_sgd_on_detached_reweighted_entropy(self):
    lr = 0.5
    adapter = eata_lib.eta(_linear_apply_fn, optax.sgd(lr))
    state = adapter.init(LINEAR_VARIABLES, jax.random.key(0))
    rows = np.stack([A * 0.6, B * 0.7, U, C * 0.55])
    new_state, _ = jax.jit(adapter.step)(state, _rows(*rows))
    selected = _entropy(rows) < E0
    self.assertEqual(selected.tolist(), [True, True, False, True])
    weight = np.exp(E0 - _entropy(rows[selected]))  # a constant

    def loss(bn):
      z = jnp.asarray(rows[selected], jnp.float32) * bn['scale'] + bn['bias']
      return jnp.mean(weight * losses.softmax_entropy(z))

    bn = LINEAR_VARIABLES['params']['bn']
    grads = jax.grad(loss)(bn)
    expected = jax.tree.map(lambda p, g: p - lr * g, bn, grads)
    test_utils.assert_trees_close(
      new_state.params['bn'], expected, rtol=1e-5, atol=1e-6
    )

  def test_no_update_when_nothing_survives_the_filters(self):
    source = np.random.default_rng(0).normal(size=(6, 1, 1, K)) * 3
    adapter = eata_lib.eata(
      _linear_apply_fn,
      optax.sgd(0.1, momentum=0.9),
      source_images=source.astype(np.float32),
    )
    step = jax.jit(adapter.step)
    state = adapter.init(LINEAR_VARIABLES, jax.random.key(0))
    state, out = step(state, _rows(A * 0.6, C * 0.6))
    self.assertEqual(float(out.metrics['n_selected']), 2)
    self.assertFalse(
      test_utils.trees_equal(state.params, LINEAR_VARIABLES['params'])
    )
    # Nothing reliable (the confident row is padding), then reliable but
    # redundant rows: no step, although momentum and the Fisher term alone
    # would move the parameters.
    for batch, n_reliable in [
      (_rows(U, U, B, mask=[1, 1, 0]), 0),
      (_rows(A * 0.6, C * 0.6), 2),
    ]:
      new_state, out = step(state, batch)
      self.assertEqual(float(out.metrics['n_reliable']), n_reliable)
      self.assertEqual(float(out.metrics['n_selected']), 0)
      self.assertTrue(test_utils.trees_equal(new_state.params, state.params))
      self.assertTrue(
        test_utils.trees_equal(new_state.opt_state, state.opt_state)
      )
      self.assertTrue(test_utils.trees_equal(new_state.extra, state.extra))
      self.assertEqual(int(new_state.step), int(state.step) + 1)


class FisherTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    _, self.apply_fn, self.variables = test_utils.tiny_bn_net(0)
    self.source = test_utils.fake_batch(5, 20, labels=False)['image']

  def test_fisher_matches_hand_computation(self):
    adapter = eata_lib.eata(
      self.apply_fn,
      optax.sgd(1e-3),
      source_images=self.source,
      fisher_batch_size=8,
    )
    state = jax.jit(adapter.init)(self.variables, jax.random.key(0))
    params, stats = self.variables['params'], self.variables['batch_stats']
    trainable, frozen = params_lib.split(
      params, params_lib.bn_affine(params, stats)
    )

    def xent(trainable, images):
      logits = self.apply_fn(
        params_lib.merge(trainable, frozen), stats, images, use_batch_stats=True
      ).logits
      labels = jnp.argmax(logits, -1)
      return losses.cross_entropy(logits, labels).mean()

    # Batches of 8, 8 and a last partial batch of 4; divide by 3 batches.
    total = jax.tree.map(jnp.zeros_like, trainable)
    grad_fn = jax.jit(jax.grad(xent))
    for lo in (0, 8, 16):
      g = grad_fn(trainable, self.source[lo : lo + 8])
      total = jax.tree.map(lambda t, g: t + g**2, total, g)
    expected = jax.tree.map(lambda t: t / 3, total)
    test_utils.assert_trees_close(
      state.extra.fisher, expected, rtol=1e-4, atol=1e-10
    )
    self.assertTrue(test_utils.trees_equal(state.extra.anchor, trainable))
    self.assertGreater(
      min(float(jnp.max(f)) for f in jax.tree.leaves(expected)), 0.0
    )


class FisherPenaltyTest(absltest.TestCase):
  """On the linear model: EATA vs ETA isolates the anti-forgetting term."""

  STREAM = (
    _rows(A * 0.6, C * 0.6, U),
    _rows(B, A * 0.6, U, D),
    _rows(C * 0.7, D * 0.8, U, A, mask=[1, 1, 1, 0]),
  )

  def test_penalty_gradient(self):
    """EATA's update = ETA's update - lr 2 alpha F (theta - theta*)."""
    lr, alpha = 0.1, 50.0
    source = np.random.default_rng(0).normal(size=(10, 1, 1, K)) * 3
    eata = eata_lib.eata(
      _linear_apply_fn,
      optax.sgd(lr),
      fisher_alpha=alpha,
      source_images=source.astype(np.float32),
      fisher_batch_size=4,
    )
    eta = eata_lib.eta(_linear_apply_fn, optax.sgd(lr))
    s_eata = eata.init(LINEAR_VARIABLES, jax.random.key(0))
    s_eta = eta.init(LINEAR_VARIABLES, jax.random.key(0))
    self.assertGreater(
      min(float(jnp.min(f)) for f in jax.tree.leaves(s_eata.extra.fisher)), 0
    )
    eata_step, eta_step = jax.jit(eata.step), jax.jit(eta.step)
    b1, b2 = self.STREAM[:2]
    # Step 1 at theta = theta*: the penalty's gradient vanishes.
    s_eata, _ = eata_step(s_eata, b1)
    s_eta, _ = eta_step(s_eta, b1)
    self.assertTrue(test_utils.trees_equal(s_eata.params, s_eta.params))
    # Step 2 from the same point, with the same selection.
    theta = s_eata.params['bn']
    s_eata, o_eata = eata_step(s_eata, b2)
    s_eta, o_eta = eta_step(s_eta, b2)
    self.assertEqual(float(o_eata.metrics['n_selected']), 2)
    self.assertEqual(float(o_eta.metrics['n_selected']), 2)
    penalty_step = jax.tree.map(
      lambda f, p, a: -lr * 2 * alpha * f * (p - a),
      s_eata.extra.fisher['bn'],
      theta,
      s_eata.extra.anchor['bn'],
    )
    diff = jax.tree.map(jnp.subtract, s_eata.params['bn'], s_eta.params['bn'])
    test_utils.assert_trees_close(diff, penalty_step, rtol=1e-4, atol=1e-7)
    self.assertGreater(
      max(float(jnp.max(jnp.abs(d))) for d in jax.tree.leaves(penalty_step)),
      1e-4,
    )

  def test_eta_is_eata_without_fisher(self):
    opt = optax.sgd(0.1, momentum=0.9)
    eta = eata_lib.eta(_linear_apply_fn, opt)
    eata0 = eata_lib.eata(_linear_apply_fn, opt, fisher_alpha=0.0)
    s1 = eta.init(LINEAR_VARIABLES, jax.random.key(0))
    s2 = eata0.init(LINEAR_VARIABLES, jax.random.key(0))
    eta_step, eata0_step = jax.jit(eta.step), jax.jit(eata0.step)
    counts = []
    for batch in self.STREAM:
      s1, o1 = eta_step(s1, batch)
      s2, o2 = eata0_step(s2, batch)
      np.testing.assert_array_equal(o1.logits, o2.logits)
      counts.append(float(o1.metrics['n_selected']))
    self.assertEqual(counts, [2, 2, 0])
    self.assertTrue(test_utils.trees_equal(s1, s2))
    self.assertEqual(s1.extra.fisher, {})


class EataArgsTest(absltest.TestCase):
  def test_restricted_logits_need_num_classes(self):
    def first_three(*args, **kwargs):  # a class subset (ImageNet-R style)
      out = _linear_apply_fn(*args, **kwargs)
      return out._replace(logits=out.logits[:, :3])

    batch = _rows(A, B, D)  # D is uniform over the three kept classes
    adapter = eata_lib.eta(first_three, optax.sgd(0.1))
    state = adapter.init(LINEAR_VARIABLES, jax.random.key(0))
    with self.assertRaisesRegex(ValueError, 'num_classes'):
      adapter.step(state, batch)
    adapter = eata_lib.eta(first_three, optax.sgd(0.1), num_classes=3)
    state, out = adapter.step(
      adapter.init(LINEAR_VARIABLES, jax.random.key(0)), batch
    )
    self.assertEqual(state.extra.probs.shape, (3,))
    self.assertEqual(float(out.metrics['n_reliable']), 2)

  def test_fisher_needs_source_images(self):
    with self.assertRaisesRegex(ValueError, 'source_images'):
      eata_lib.eata(_linear_apply_fn, optax.sgd(1e-3))


if __name__ == '__main__':
  absltest.main()
