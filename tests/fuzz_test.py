"""Fuzzing the input policy: batch shapes, masks, dtypes, non-finite rows.

For the gradient methods whose updates NaNs used to poison (Tent, SAR) and
a statistics-only one (norm), any mix of valid, padded and non-finite rows
keeps the state finite, counts exactly the valid non-finite rows, and gives
finite logits on the valid finite ones.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from tta_jax import methods, testing as test_utils

ADAM = {'name': 'adam', 'learning_rate': 1e-2}
CASES = {
  'tent': {'optimizer': ADAM},
  'sar': {'optimizer': ADAM, 'margin_e0': 1.0},
  'norm': {},
}
ROW_KINDS = ('clean', 'nan', 'inf', '-inf', 'all_nan')


@functools.cache
def _method(name):
  _, apply_fn, variables = test_utils.tiny_bn_net(0)
  adapter = methods.from_config(name, CASES[name], apply_fn)
  return adapter, variables, jax.jit(adapter.step)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
  name=st.sampled_from(sorted(CASES)),
  rows=st.lists(
    st.tuples(st.sampled_from(ROW_KINDS), st.booleans()),
    min_size=2,
    max_size=6,
  ).filter(lambda rs: any(k == 'clean' and v for k, v in rs)),
  dtype=st.sampled_from(['float32', 'float16', 'bfloat16']),
  with_mask=st.booleans(),
)
def test_any_bad_rows_keep_the_state_finite(name, rows, dtype, with_mask):
  adapter, variables, step = _method(name)
  size = len(rows)
  image = test_utils.fake_batch(3, size, labels=False)['image'].copy()
  for i, (kind, _) in enumerate(rows):
    if kind == 'nan':
      image[i, 1, 2, 0] = np.nan
    elif kind == 'inf':
      image[i, 0, 0, 0] = np.inf
    elif kind == '-inf':
      image[i, 4, 4, 0] = -np.inf
    elif kind == 'all_nan':
      image[i] = np.nan
  mask = np.array([valid or not with_mask for _, valid in rows])
  batch = {'image': jnp.asarray(image, dtype)}
  if with_mask:
    batch['mask'] = mask
  state = adapter.init(variables, jax.random.key(0))
  for _ in range(2):
    state, out = step(state, batch)
    for leaf in jax.tree.leaves(state):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert np.all(np.isfinite(leaf))
  bad = np.array([kind != 'clean' for kind, _ in rows])
  assert float(out.metrics['invalid_rows']) == float(np.sum(bad & mask))
  good = ~bad & mask
  assert np.all(np.isfinite(np.asarray(out.logits)[good]))
