"""`layers.max_pool`: nn.max_pool's values and derivatives, scatter-free."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized

from tta_jax.models.vision import layers

# (window, strides, padding): the digits CNN's and ResNet's stem pools.
CASES = (
  ('non_overlapping', (2, 2), (2, 2), ((0, 0), (0, 0))),
  ('overlapping_padded', (3, 3), (2, 2), ((1, 1), (1, 1))),
)


def _inputs(shape, seed=0):
  # Half-integers after a ReLU: many ties, at zero and above it.
  x = jax.random.normal(jax.random.key(seed), shape)
  return jax.nn.relu(jnp.round(2 * x) / 2)


class MaxPoolTest(parameterized.TestCase):
  @parameterized.named_parameters(*CASES)
  def test_values_and_gradients_equal_nn_max_pool(self, window, strides, pad):
    x = _inputs((3, 12, 10, 5))
    ref = lambda x: nn.max_pool(x, window, strides, padding=pad)
    new = lambda x: layers.max_pool(x, window, strides, pad)
    np.testing.assert_array_equal(new(x), ref(x))
    y, vjp_ref = jax.vjp(ref, x)
    g = jax.random.normal(jax.random.key(1), y.shape)
    (want,), (got,) = vjp_ref(g), jax.vjp(new, x)[1](g)
    if window == strides:  # one window per input: the same sums, exactly
      np.testing.assert_array_equal(got, want)
    else:  # overlapping windows add in another order
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

  def test_ties_go_to_the_first_maximum(self):
    x = jnp.ones((1, 2, 2, 1))
    grad = jax.grad(lambda x: layers.max_pool(x, (2, 2), (2, 2)).sum())(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[1, 0], [0, 0]])

  def test_second_order(self):
    # Nested reverse mode (meta-training) runs; max pooling is piecewise
    # linear, so the Hessian-vector product of a linear read-out is zero.
    x = _inputs((2, 4, 4, 3))
    f = lambda x: jnp.sum(layers.max_pool(x, (2, 2), (2, 2)) ** 2)
    hvp = jax.grad(lambda x: jnp.vdot(jax.grad(f)(x), x))(x)
    ref = lambda x: jnp.sum(nn.max_pool(x, (2, 2), (2, 2)) ** 2)
    want = jax.grad(lambda x: jnp.vdot(jax.grad(ref)(x), x))(x)
    np.testing.assert_allclose(hvp, want, rtol=1e-6)

  def test_rejects_a_non_2d_window(self):
    with self.assertRaisesRegex(ValueError, '2-D window'):
      layers.max_pool(jnp.ones((1, 4, 4, 1)), (2,), (2,))


if __name__ == '__main__':
  absltest.main()
