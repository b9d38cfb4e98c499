"""Properties of the shared losses."""

import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from tta_jax._src import losses

_logits = hnp.arrays(
  np.float32,
  st.tuples(st.integers(1, 6), st.integers(2, 7)),
  elements=st.floats(-30, 30, width=32),
)


class LossPropertiesTest(absltest.TestCase):
  @settings(max_examples=50, deadline=None)
  @given(logits=_logits)
  def test_entropy_bounds(self, logits):
    h = np.asarray(losses.softmax_entropy(jnp.asarray(logits)))
    self.assertTrue(np.all(h >= -1e-5))
    self.assertTrue(np.all(h <= np.log(logits.shape[1]) + 1e-5))

  @settings(max_examples=50, deadline=None)
  @given(logits=_logits)
  def test_marginal_entropy_at_least_mean_entropy(self, logits):
    # Entropy is concave: H(mean p) >= mean H(p).
    z = jnp.asarray(logits)
    self.assertGreaterEqual(
      float(losses.marginal_entropy(z)) + 1e-5,
      float(jnp.mean(losses.softmax_entropy(z))),
    )

  def test_marginal_entropy_of_an_impossible_class(self):
    # No view gives class 1 any probability: it contributes 0, not NaN.
    z = jnp.array([[0.0, -jnp.inf], [1.0, -jnp.inf]])
    self.assertEqual(float(losses.marginal_entropy(z)), 0.0)

  def test_entropy_extremes(self):
    self.assertAlmostEqual(
      float(losses.softmax_entropy(jnp.zeros(5))), np.log(5), places=5
    )
    self.assertAlmostEqual(
      float(losses.softmax_entropy(jnp.array([100.0, 0, 0]))), 0.0, places=5
    )

  def test_masked_mean(self):
    x = jnp.array([1.0, 2.0, 3.0, 100.0])
    self.assertAlmostEqual(
      float(losses.masked_mean(x, jnp.array([1, 1, 1, 0], bool))), 2.0
    )
    self.assertEqual(float(losses.masked_mean(x, jnp.zeros(4, bool))), 0.0)
    g = jax.grad(lambda x: losses.masked_mean(x, jnp.zeros(4, bool)))(x)
    self.assertTrue(np.all(np.isfinite(g)))

  def test_soft_cross_entropy_reduces_to_entropy(self):
    z = jax.random.normal(jax.random.key(0), (4, 6))
    np.testing.assert_allclose(
      losses.soft_cross_entropy(z, z), losses.softmax_entropy(z), rtol=1e-5
    )


if __name__ == '__main__':
  absltest.main()
