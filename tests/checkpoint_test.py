"""Stream checkpoints (`StateCheckpointer`) of states with empty arrays."""

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax import testing as test_utils
from tta_jax._src import checkpoint
from tta_jax.methods import mgg

STAGES = ('stage1', 'stage2', 'stage3')


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  a, b = checkpoint.to_storable(a), checkpoint.to_storable(b)  # keys: data
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_zero_size_arrays_round_trip(tmp_path):
  tree = {
    'w': jnp.arange(6.0).reshape(2, 3),
    'empty': jnp.zeros((4, 0, 0), jnp.float32),
    'ids': np.zeros((0,), np.int32),
    'key': jax.random.key(3),
  }
  ckpt = checkpoint.StateCheckpointer(tmp_path / 'ckpt')
  ckpt.save(0, tree)
  _assert_same(ckpt.restore(tree), tree)
  step, restored = ckpt.restore_latest(tree)
  assert step == 0
  _assert_same(restored, tree)
  ckpt.close()


def test_mgg_memoryless_ablation_state_round_trips(tmp_path):
  # The MLP generator keeps an empty per-coordinate memory, which orbax
  # alone refuses to save ("Cannot save arrays with zero size").
  _, apply_fn, variables = test_utils.tiny_bn_net(0)
  adapter = mgg.mgg(apply_fn, features=STAGES, generator='mlp')
  state = adapter.init(variables, jax.random.key(0))
  sizes = [x.size for x in jax.tree.leaves(state) if hasattr(x, 'size')]
  assert 0 in sizes  # the case under test
  ckpt = checkpoint.StateCheckpointer(tmp_path / 'ckpt')
  ckpt.save(1, state)
  _assert_same(ckpt.restore(state), state)
  ckpt.close()
