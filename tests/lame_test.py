"""LAME against hand-built cases and a numpy port of the official loop."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from tta_jax import testing as test_utils
from tta_jax.methods import lame as lame_lib


def _np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_kernel(x, affinity, knn):
  """The official affinities (fiveai/LAME `src/adaptation/lame.py`)."""
  n = x.shape[0]
  dist = np.linalg.norm(x[None] - x[:, None], axis=-1)
  if affinity == 'knn':
    w = np.zeros((n, n))
    for i in range(n):
      order = np.argsort(dist[i], kind='stable')
      w[i, order[1 : min(knn + 1, n)]] = 1.0
    return w
  if affinity == 'rbf':
    kth = np.sort(dist, axis=-1)[:, min(knn, n) - 1]
    sigma = kth.mean()
    return np.exp(-(dist**2) / (2 * sigma**2))
  return x @ x.T


def _np_laplacian(probs, kernel, max_steps=100):
  unary = -np.log(probs + 1e-10)
  y = _np_softmax(-unary)
  old_e = np.inf
  for i in range(max_steps):
    pairwise = kernel @ y
    y = _np_softmax(-unary + pairwise)
    e = np.sum(unary * y - pairwise * y + y * np.log(np.clip(y, 1e-20, None)))
    if i > 1 and abs(e - old_e) <= 1e-8 * abs(old_e):
      break
    old_e = e
  return y


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


class AffinityTest(absltest.TestCase):
  def setUp(self):
    super().setUp()
    self.x = _np_normalize(np.random.default_rng(0).normal(size=(12, 6)))

  def test_knn_graph_properties(self):
    w = np.asarray(
      lame_lib.knn_affinity(jnp.asarray(self.x), jnp.ones(12, bool), 5)
    )
    np.testing.assert_array_equal(w.sum(1), np.full(12, 5.0))
    np.testing.assert_array_equal(np.diag(w), np.zeros(12))
    self.assertTrue(set(np.unique(w)) <= {0.0, 1.0})
    np.testing.assert_array_equal(w, _np_kernel(self.x, 'knn', 5))
    # Not symmetric by default (the official LAME_FORCE_SYMMETRY=False) ...
    self.assertFalse(np.array_equal(w, w.T))

  def test_force_symmetry(self):
    w = lame_lib.knn_affinity(jnp.asarray(self.x), jnp.ones(12, bool), 3)
    sym = np.asarray(0.5 * (w + w.T))
    np.testing.assert_array_equal(sym, sym.T)
    self.assertTrue(set(np.unique(sym)) <= {0.0, 0.5, 1.0})

  def test_padding_rows_are_nobodys_neighbours(self):
    mask = np.arange(12) < 8
    x = self.x.copy()
    x[8:] = x[0]  # padding rows sit right on top of sample 0
    for name, fn in [
      ('knn', lambda x, m: lame_lib.knn_affinity(x, m, 5)),
      ('rbf', lambda x, m: lame_lib.rbf_affinity(x, m, 5)),
      ('linear', lame_lib.linear_affinity),
    ]:
      w = np.asarray(fn(jnp.asarray(x), jnp.asarray(mask)))
      np.testing.assert_array_equal(w[8:], 0.0, err_msg=name)
      np.testing.assert_array_equal(w[:, 8:], 0.0, err_msg=name)
      cut = np.asarray(fn(jnp.asarray(x[:8]), jnp.ones(8, bool)))
      np.testing.assert_allclose(w[:8, :8], cut, rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(
        cut, _np_kernel(x[:8], name, 5), rtol=1e-5, atol=1e-6, err_msg=name
      )

  def test_fewer_valid_samples_than_neighbours(self):
    mask = np.arange(12) < 3
    w = np.asarray(
      lame_lib.knn_affinity(jnp.asarray(self.x), jnp.asarray(mask), 5)
    )
    np.testing.assert_array_equal(w[:3, :3], 1.0 - np.eye(3))
    self.assertEqual(w.sum(), 6.0)


class LaplacianOptimizationTest(parameterized.TestCase):
  def test_zero_affinity_returns_the_source_prediction(self):
    probs = _np_softmax(np.random.default_rng(1).normal(size=(7, 4)) * 3)
    logits, steps = lame_lib.laplacian_optimization(
      jnp.log(jnp.asarray(probs) + 1e-10), jnp.zeros((7, 7))
    )
    np.testing.assert_allclose(jax.nn.softmax(logits), probs, atol=1e-6)
    # The energy is constant, so the loop stops at the first check (i = 2).
    self.assertEqual(int(steps), 3)

  def test_two_clusters_flip_the_outlier(self):
    rng = np.random.default_rng(2)
    centres = np.eye(8)[:2] * 5.0
    feats = np.concatenate(
      [
        centres[0] + 0.1 * rng.normal(size=(6, 8)),
        centres[1] + 0.1 * rng.normal(size=(6, 8)),
      ]
    )
    feats = _np_normalize(feats)
    probs = np.array([[0.9, 0.1]] * 6 + [[0.1, 0.9]] * 6)
    probs[0] = [0.4, 0.6]  # a cluster-0 sample the model gets wrong
    kernel = lame_lib.knn_affinity(jnp.asarray(feats), jnp.ones(12, bool), 5)
    logits, _ = lame_lib.laplacian_optimization(
      jnp.log(jnp.asarray(probs) + 1e-10), kernel
    )
    np.testing.assert_array_equal(
      np.argmax(logits, -1), np.array([0] * 6 + [1] * 6)
    )
    self.assertEqual(np.argmax(probs[0]), 1)

  @parameterized.parameters('knn', 'rbf', 'linear')
  def test_matches_numpy_port_of_the_official_code(self, affinity):
    rng = np.random.default_rng(3)
    feats = _np_normalize(rng.normal(size=(16, 5))).astype(np.float32)
    probs = _np_softmax(rng.normal(size=(16, 4)) * 2)
    kernel = {
      'knn': lambda: lame_lib.knn_affinity(feats, jnp.ones(16, bool), 5),
      'rbf': lambda: lame_lib.rbf_affinity(feats, jnp.ones(16, bool), 5),
      'linear': lambda: lame_lib.linear_affinity(feats, jnp.ones(16, bool)),
    }[affinity]()
    logits, _ = lame_lib.laplacian_optimization(
      jnp.log(jnp.asarray(probs, jnp.float32) + 1e-10), kernel
    )
    expected = _np_laplacian(probs, _np_kernel(feats, affinity, 5))
    np.testing.assert_allclose(jax.nn.softmax(logits), expected, atol=2e-4)


class LameAdapterTest(absltest.TestCase):
  def test_step_is_the_official_pipeline_and_changes_no_state(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    batch = test_utils.fake_batch(0, 16, labels=False)
    adapter = lame_lib.lame(apply_fn)
    state = adapter.init(variables, jax.random.key(0))
    new_state, out = jax.jit(adapter.step)(state, batch)
    src = apply_fn(
      variables['params'], variables['batch_stats'], batch['image']
    )
    feats = _np_normalize(np.asarray(src.features['pre_logits'], np.float64))
    expected = _np_laplacian(
      _np_softmax(np.asarray(src.logits, np.float64)),
      _np_kernel(feats, 'knn', 5),
    )
    np.testing.assert_allclose(jax.nn.softmax(out.logits), expected, atol=2e-4)
    self.assertTrue(
      test_utils.trees_equal(new_state._replace(step=state.step), state)
    )
    self.assertEqual(int(new_state.step), 1)

  def test_no_laplacian_term_is_the_source_model(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    batch = test_utils.fake_batch(1, 16, labels=False)
    adapter = lame_lib.lame(apply_fn, bound_lambda=0.0)
    _, out = adapter.step(adapter.init(variables, jax.random.key(0)), batch)
    src = apply_fn(
      variables['params'], variables['batch_stats'], batch['image']
    )
    np.testing.assert_allclose(
      jax.nn.softmax(out.logits), jax.nn.softmax(src.logits), atol=1e-6
    )

  def test_padded_rows_are_ignored_for_every_affinity(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    batch = test_utils.fake_batch(2, 16, labels=False)
    pad = dict(batch, mask=np.arange(16) < 10)
    pad['image'] = batch['image'].copy()
    pad['image'][10:] = batch['image'][0]
    for affinity in lame_lib.AFFINITIES:
      adapter = lame_lib.lame(apply_fn, affinity=affinity, force_symmetry=True)
      state = adapter.init(variables, jax.random.key(0))
      _, o_pad = adapter.step(state, pad)
      _, o_cut = adapter.step(state, {'image': batch['image'][:10]})
      np.testing.assert_allclose(
        o_pad.logits[:10],
        o_cut.logits,
        rtol=1e-5,
        atol=1e-5,
        err_msg=affinity,
      )

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, 'affinity'):
      lame_lib.lame(None, affinity='cosine')
    with self.assertRaisesRegex(ValueError, 'knn'):
      lame_lib.lame(None, knn=0)


if __name__ == '__main__':
  absltest.main()
