"""DeYO: the patch shuffle, the PLPD filter and weights, the no-step rule."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tta_jax import testing as test_utils
from tta_jax._src import params as params_lib
from tta_jax.methods import deyo


def test_patch_shuffle_permutes_whole_patches_per_image():
  x = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1)
  y = deyo.patch_shuffle(x, 4, jax.random.key(0))
  for b in range(2):
    patches = lambda im: sorted(
      tuple(np.asarray(im[i : i + 2, j : j + 2, 0]).ravel())
      for i in range(0, 8, 2)
      for j in range(0, 8, 2)
    )
    assert patches(x[b]) == patches(y[b])  # the same 16 patches
  assert not np.array_equal(x, y)
  # Row b's permutation does not depend on the batch size (padding rows).
  np.testing.assert_array_equal(
    deyo.patch_shuffle(x[:1], 4, jax.random.key(0)), y[:1]
  )
  np.testing.assert_array_equal(deyo.patch_shuffle(x, 1, jax.random.key(0)), x)


def _net():
  _, apply_fn, variables = test_utils.tiny_bn_net(0)
  return apply_fn, variables


def test_no_selected_sample_means_no_step():
  apply_fn, variables = _net()
  # margin 0: no sample has entropy below 0, so nothing is reliable.
  tx = optax.sgd(0.1, momentum=0.9)
  adapter = deyo.deyo(apply_fn, tx, margin=0.0)
  state = adapter.init(variables, jax.random.key(0))
  new, out = jax.jit(adapter.step)(
    state, test_utils.fake_batch(0, 16, labels=False)
  )
  assert float(out.metrics['n_reliable']) == 0.0
  assert test_utils.trees_equal(new.params, state.params)
  assert test_utils.trees_equal(new.opt_state, state.opt_state)


def test_loss_is_the_weighted_entropy_of_the_plpd_selection():
  apply_fn, variables = _net()
  batch = test_utils.fake_batch(1, 16, labels=False)
  key = jax.random.key(0)
  adapter = deyo.deyo(apply_fn, optax.sgd(0.0), margin=1.0, plpd_threshold=0.0)
  state = adapter.init(variables, key)
  _, out = adapter.step(state, batch)
  # Reference from the definition, with the same shuffle.
  logits = apply_fn(
    variables['params'],
    variables['batch_stats'],
    batch['image'],
    use_batch_stats=True,
  ).logits
  p = np.asarray(jax.nn.softmax(logits))
  ent = -np.sum(p * np.log(p), -1)
  k = math.log(logits.shape[-1])
  rel = ent < 1.0 * k
  shuffled = deyo.patch_shuffle(batch['image'], 4, jax.random.fold_in(key, 0))
  logits_x = apply_fn(
    variables['params'],
    variables['batch_stats'],
    shuffled,
    use_batch_stats=True,
    mask=jnp.asarray(rel),
  ).logits
  px = np.asarray(jax.nn.softmax(logits_x))
  y = p.argmax(-1)
  plpd = p[np.arange(16), y] - px[np.arange(16), y]
  sel = rel & (plpd > 0.0)
  assert 0 < sel.sum() < 16  # the filter is exercised both ways
  coeff = np.exp(0.4 * k - ent) + np.exp(plpd)
  want = np.sum((ent * coeff)[sel]) / sel.sum()
  np.testing.assert_allclose(out.metrics['loss'], want, rtol=1e-4)
  assert float(out.metrics['n_selected']) == sel.sum()


def test_adapts_bn_affine_only():
  apply_fn, variables = _net()
  adapter = deyo.deyo(
    apply_fn, optax.adam(1e-2), margin=1.0, plpd_threshold=-1.0
  )
  state = adapter.init(variables, jax.random.key(0))
  new, _ = adapter.step(state, test_utils.fake_batch(2, 16, labels=False))
  mask = params_lib.bn_affine(variables['params'], variables['batch_stats'])
  moved, frozen = params_lib.split(new.params, mask)
  moved0, frozen0 = params_lib.split(variables['params'], mask)
  assert test_utils.trees_equal(frozen, frozen0)
  assert not test_utils.trees_equal(moved, moved0)
