"""T3A against hand-computed prototypes and a port of the official code."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from tta_jax import models, testing as test_utils
from tta_jax.methods import t3a as t3a_lib


def _linear_model(kernel, bias):
  """A fake ApplyFn: images [B, 1, 1, D] are the features; a linear head."""

  def apply_fn(params, batch_stats, images, **kwargs):
    del kwargs
    z = images.reshape(images.shape[0], -1)
    logits = z @ params['head']['kernel'] + params['head']['bias']
    return models.ModelOutput(logits, {'pre_logits': z}, batch_stats)

  variables = {
    'params': {
      'head': {
        'kernel': jnp.asarray(kernel, jnp.float32),
        'bias': jnp.asarray(bias, jnp.float32),
      }
    },
    'batch_stats': {},
  }
  return apply_fn, variables


def _images(z):
  z = np.asarray(z, np.float32)
  return z.reshape(z.shape[0], 1, 1, -1)


def _np_normalize(x, axis=-1):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_entropy(logits):
  p = _np_softmax(logits)
  return -np.sum(p * np.log(p), -1)


class OfficialT3A:
  """numpy port of `matsuolab/T3A` `adapt_algorithms.T3A` (keep-all for -1)."""

  def __init__(self, kernel, bias, filter_k):
    w = np.asarray(kernel, np.float64).T
    logits = w @ kernel + bias
    self.kernel, self.bias, self.filter_k = kernel, bias, filter_k
    self.supports, self.labels = w, logits.argmax(1)
    self.ent = _np_entropy(logits)

  def __call__(self, z):
    p = z @ self.kernel + self.bias
    self.supports = np.concatenate([self.supports, z])
    self.labels = np.concatenate([self.labels, p.argmax(1)])
    self.ent = np.concatenate([self.ent, _np_entropy(p)])
    keep = []
    for c in range(self.kernel.shape[1]):
      idx = np.flatnonzero(self.labels == c)
      idx = idx[np.argsort(self.ent[idx], kind='stable')]
      keep.append(idx if self.filter_k == -1 else idx[: self.filter_k])
    keep = np.concatenate(keep)
    self.supports = self.supports[keep]
    self.labels, self.ent = self.labels[keep], self.ent[keep]
    onehot = np.eye(self.kernel.shape[1])[self.labels]
    weights = _np_normalize(self.supports).T @ onehot  # [D, K]
    return z @ _np_normalize(weights, axis=0)


class T3AGoldenTest(parameterized.TestCase):
  def test_hand_computed_first_batch(self):
    apply_fn, variables = _linear_model(np.eye(2), np.zeros(2))
    z = np.array([[3.0, 1.0]])  # predicted 0, lower entropy than e_0's
    for filter_k, w0 in [
      (1, np.array([3.0, 1.0]) / np.sqrt(10)),
      (2, _np_normalize(np.array([1 + 3 / np.sqrt(10), 1 / np.sqrt(10)]))),
    ]:
      adapter = t3a_lib.t3a(apply_fn, filter_k=filter_k)
      state = adapter.init(variables, jax.random.key(0))
      state, out = adapter.step(state, {'image': _images(z)})
      np.testing.assert_allclose(
        out.logits, [[z[0] @ w0, 1.0]], rtol=1e-6, err_msg=str(filter_k)
      )
      np.testing.assert_allclose(
        t3a_lib.classifier_weights(state.extra), [w0, [0.0, 1.0]], rtol=1e-6
      )
    self.assertAlmostEqual(float(out.logits[0, 0]), 3 * w0[0] + w0[1], 5)

  def test_warmup_supports_take_the_classifiers_label(self):
    # w_1 = (1, 0.1) scores higher on class 0 (2.0) than on class 1 (1.01),
    # so, as in the official code, it becomes a support of class 0.
    kernel = np.array([[2.0, 1.0], [0.0, 0.1]])
    apply_fn, variables = _linear_model(kernel, np.zeros(2))
    state = t3a_lib.t3a(apply_fn, filter_k=5).init(variables, jax.random.key(0))
    np.testing.assert_array_equal(state.extra.valid.sum(1), [2, 0])
    w = t3a_lib.classifier_weights(state.extra)
    np.testing.assert_array_equal(w[1], [0.0, 0.0])
    np.testing.assert_allclose(
      w[0], _np_normalize(np.array([1.0, 0.0]) + _np_normalize([1.0, 0.1]))
    )

  def test_filtering_keeps_the_lowest_entropy_supports(self):
    rng = np.random.default_rng(0)
    state = t3a_lib.T3AState(
      supports=jnp.zeros((2, 3, 4)),
      entropy=jnp.zeros((2, 3)),
      valid=jnp.zeros((2, 3), bool),
    )
    feats = rng.normal(size=(8, 4)).astype(np.float32)
    labels = np.array([0, 1, 0, 0, 0, 1, 0, 1])
    ent = np.array([0.5, 0.2, 0.1, 0.9, 0.3, 0.4, 0.05, 0.7], np.float32)
    mask = np.array([True] * 7 + [False])
    new = t3a_lib.add_supports(state, feats, labels, ent, mask)
    # Class 0: rows 6, 2, 4 (entropies .05, .1, .3); class 1: rows 1, 5.
    np.testing.assert_allclose(new.entropy, [[0.05, 0.1, 0.3], [0.2, 0.4, 0]])
    np.testing.assert_array_equal(new.valid, [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_allclose(
      new.supports[0], _np_normalize(feats[[6, 2, 4]]), rtol=1e-6
    )
    np.testing.assert_allclose(
      new.supports[1, :2], _np_normalize(feats[[1, 5]]), rtol=1e-6
    )
    # A later, more confident candidate evicts the worst support of its class.
    newer = t3a_lib.add_supports(
      new, feats[:1], np.array([0]), np.array([0.2], np.float32), mask[:1]
    )
    np.testing.assert_allclose(newer.entropy[0], [0.05, 0.1, 0.2])

  @parameterized.parameters(1, 3, -1)
  def test_stream_matches_the_official_code(self, filter_k):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    head = jax.tree.map(np.asarray, variables['params']['head'])
    ref = OfficialT3A(head['kernel'].astype(np.float64), head['bias'], filter_k)
    adapter = t3a_lib.t3a(apply_fn, filter_k=filter_k, max_supports=64)
    state = adapter.init(variables, jax.random.key(0))
    step = jax.jit(adapter.step)
    for i in range(4):
      batch = test_utils.fake_batch(i, 12, labels=False)
      state, out = step(state, batch)
      z = apply_fn(
        variables['params'], variables['batch_stats'], batch['image']
      ).features['pre_logits']
      expected = ref(np.asarray(z, np.float64))
      np.testing.assert_allclose(out.logits, expected, rtol=1e-4, atol=1e-5)
    self.assertEqual(int(np.sum(state.extra.valid)), len(ref.labels))

  def test_padding_rows_never_become_supports(self):
    _, apply_fn, variables = test_utils.tiny_bn_net(0)
    adapter = t3a_lib.t3a(apply_fn, filter_k=4)
    state0 = adapter.init(variables, jax.random.key(0))
    batch = test_utils.fake_batch(0, 16, labels=False)
    pad = dict(batch, mask=np.arange(16) < 9)
    s_pad, o_pad = adapter.step(state0, pad)
    s_cut, o_cut = adapter.step(state0, {'image': batch['image'][:9]})
    test_utils.assert_trees_close(s_pad, s_cut)
    np.testing.assert_allclose(
      o_pad.logits[:9], o_cut.logits, rtol=1e-5, atol=1e-6
    )
    self.assertTrue(test_utils.trees_equal(s_pad.params, variables['params']))

  def test_class_subset_equals_a_model_of_those_classes(self):
    # On ImageNet-R/-A the runner restricts the logits to 200 classes; T3A
    # then works on those classes' columns of the head, exactly as on a
    # model whose head has only them.
    rng = np.random.default_rng(0)
    kernel, bias = rng.normal(size=(4, 6)), rng.normal(size=6)
    subset = [1, 4, 5]
    full_fn, full_vars = _linear_model(kernel, bias)
    small_fn, small_vars = _linear_model(kernel[:, subset], bias[subset])
    restricted = models.restrict_classes(full_fn, subset)
    z = _images(rng.normal(size=(5, 4)))
    outs = []
    for fn, variables in ((restricted, full_vars), (small_fn, small_vars)):
      adapter = t3a_lib.t3a(fn, filter_k=2)
      state = adapter.init(variables, jax.random.key(0))
      outs.append(adapter.step(state, {'image': z})[1].logits)
    self.assertEqual(outs[0].shape, (5, 3))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6)

    # Logits narrower than the head, by another route: refused.
    def narrowed(*args, **kwargs):
      out = full_fn(*args, **kwargs)
      return out._replace(logits=out.logits[:, :3])

    adapter = t3a_lib.t3a(narrowed, filter_k=2)
    state = adapter.init(full_vars, jax.random.key(0))
    with self.assertRaisesRegex(ValueError, '3 logits but .* 6 classes'):
      adapter.step(state, {'image': z})

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, 'filter_k'):
      t3a_lib.t3a(None, filter_k=0)
    apply_fn, variables = _linear_model(np.eye(2), np.zeros(2))
    with self.assertRaisesRegex(ValueError, 'classifier'):
      t3a_lib.t3a(apply_fn, head='fc').init(variables, jax.random.key(0))


if __name__ == '__main__':
  absltest.main()
