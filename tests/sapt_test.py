"""SAPT (TLLA's source stage): the SAM gradient in closed form, rho = 0 is
CoOp, only the context learns, the rho grid selects on held-out data."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tta_jax import models, testing
from tta_jax._src import checkpoint, grad_step, params as params_lib
from tta_jax.data import sources
from tta_jax.models import vlm
from tta_jax.trainers import base, coop, sapt

SHAPE = (28, 28, 1)


def test_sam_gradient_closed_form_on_a_quadratic():
  """l(p) = 1/2 p'Ap + b'p over a two-leaf tree: g0 = Ap + b,
  eps = rho g0 / ||g0|| (global norm), g1 = A(p + eps) + b."""
  r = np.random.default_rng(0)
  m = r.normal(size=(5, 5))
  a = m @ m.T + np.eye(5)
  b = r.normal(size=5)
  p = {'x': r.normal(size=3), 'y': r.normal(size=2)}

  def flat(tree):
    return jnp.concatenate([tree['x'], tree['y']])

  def loss(tree):
    v = flat(tree)
    return 0.5 * v @ a @ v + b @ v

  v = flat(p)
  g0 = a @ v + b
  eps = 0.3 * g0 / np.linalg.norm(g0)
  np.testing.assert_allclose(np.linalg.norm(eps), 0.3)
  g1 = a @ (v + eps) + b
  for weight in (1.0, 0.5, 0.0):
    value, g = grad_step.sharpness_aware_value_and_grad(
      loss, rho=0.3, weight=weight
    )(p)
    np.testing.assert_allclose(value, loss(p), rtol=1e-6)
    np.testing.assert_allclose(
      flat(g), (1 - weight) * g0 + weight * g1, rtol=1e-5
    )
  _, g = grad_step.sharpness_aware_value_and_grad(loss, rho=0.0)(p)
  np.testing.assert_allclose(flat(g), g0, rtol=1e-6)


@functools.cache
def _tiny():
  if not vlm.bert.available():
    pytest.skip(f'all-MiniLM-L6-v2 missing: {vlm.bert.INSTALL_HINT}')
  module = vlm.digits_classifier(
    10, width=4, text_config=dict(width=32, layers=1, heads=2, mlp_dim=64)
  )
  variables = models.init_variables(module, SHAPE, jax.random.key(0))
  return module, models.make_apply_fn(module, SHAPE), variables


def _digits(n, seed):
  """Blobs of ink whose row says the class."""
  r = np.random.default_rng(seed)
  labels = np.tile(np.arange(10), n // 10).astype(np.int32)
  images = np.zeros((len(labels), *SHAPE), np.float32)
  for i, k in enumerate(labels):
    y, x = 4 + 2 * k, 4 + r.integers(0, 16)
    images[i, y : y + 6, x : x + 6] = 1.0
  return sources.ArraySource(images, labels)


HP = dict(
  shots=3,
  epochs=3,
  batch_size=10,
  learning_rate=0.5,
  momentum=0.9,
  weight_decay=5e-4,
  warmup_epochs=1,
  warmup_lr=1e-5,
  crop_scale=(0.5, 1.0),
  flip=False,
  rho=0.0,
  sharpness_weight=1.0,
  rho_grid=(),
)


def _ctx(directory, val=True, **hp):
  module, apply_fn, variables = _tiny()
  return base.TrainContext(
    model_config={'name': 'vlm_digits'},
    module=module,
    apply_fn=apply_fn,
    variables=variables,
    input_shape=SHAPE,
    num_classes=10,
    source_domains=[sources.Domain('source', _digits(100, 0))],
    val_domains=[sources.Domain('source', _digits(20, 1))] if val else [],
    shifted_domains=[],
    hparams=ml_collections.ConfigDict({**HP, **hp}),
    method_kwargs={},
    source_recipe={},
    seed=0,
    rng=jax.random.key(0),
    checkpointer=checkpoint.StateCheckpointer(directory),
    cache_dir=None,
    log_every=0,
  )


def _context(result):
  return result.variables['params']['prompt']['ctx']


def test_rho_zero_is_coop_and_rho_moves_the_context_only(tmp_path):
  _, _, init = _tiny()
  plain = coop.train(_ctx(tmp_path / 'coop'))
  zero = sapt.train(_ctx(tmp_path / 'sapt0'))
  np.testing.assert_allclose(_context(zero), _context(plain), atol=1e-6)
  assert zero.metrics['rho'] == 0.0
  sam = sapt.train(_ctx(tmp_path / 'sapt', rho=0.5))
  assert np.abs(np.asarray(_context(sam) - _context(plain))).max() > 1e-4
  mask = vlm.context_mask(init['params'], {})
  _, frozen0 = params_lib.split(init['params'], mask)
  _, frozen = params_lib.split(sam.variables['params'], mask)
  assert testing.trees_equal(frozen0, frozen)
  assert sam.metrics['context_norm'] > 0


def test_rho_grid_selects_on_the_held_out_split(tmp_path):
  result = sapt.train(_ctx(tmp_path / 'grid', rho_grid=(0.0, 5.0)))
  table = result.metrics['rho_grid']
  assert set(table) == {'0', '5'}
  best = max(
    table, key=lambda k: (table[k]['accuracy'], -table[k]['cross_entropy'])
  )
  assert result.metrics['rho'] == float(best)
  # The chosen run is the one trained with that rho alone.
  alone = sapt.train(_ctx(tmp_path / 'alone', rho=float(best)))
  np.testing.assert_allclose(_context(result), _context(alone), atol=1e-6)
  _, apply_fn, _ = _tiny()
  acc, nll = sapt.evaluate(apply_fn, result.variables, _digits(20, 1))
  assert acc == table[best]['accuracy']
  np.testing.assert_allclose(nll, table[best]['cross_entropy'], rtol=1e-5)
  with pytest.raises(ValueError, match='held-out source split'):
    sapt.train(_ctx(tmp_path / 'none', val=False, rho_grid=(0.1, 0.5)))
  with pytest.raises(ValueError, match='>= 0'):
    sapt.train(_ctx(tmp_path / 'neg', rho=-0.1))


def test_random_sharpness():
  _, apply_fn, variables = _tiny()
  data = _digits(20, 3)[np.arange(20)]
  kw = dict(n_directions=4, key=jax.random.key(0))
  flat = sapt.random_sharpness(
    apply_fn, variables, data['image'], data['label'], rho=0.0, **kw
  )
  assert flat == 0.0
  sharp = sapt.random_sharpness(
    apply_fn, variables, data['image'], data['label'], rho=1.0, **kw
  )
  assert np.isfinite(sharp) and sharp != 0.0


# Trains CoOp and SAPT for a few more epochs: a statistical check.
@pytest.mark.slow
def test_sapt_finds_a_flatter_context_than_coop(tmp_path):
  hp = dict(epochs=8, learning_rate=0.2)
  plain = coop.train(_ctx(tmp_path / 'coop', **hp))
  sam = sapt.train(_ctx(tmp_path / 'sapt', rho=1.0, **hp))
  _, apply_fn, _ = _tiny()
  data = _digits(100, 0)[np.arange(100)]
  kw = dict(rho=1.0, n_directions=32, key=jax.random.key(3))
  sharp = {
    name: sapt.random_sharpness(
      apply_fn, r.variables, data['image'], data['label'], **kw
    )
    for name, r in (('coop', plain), ('sapt', sam))
  }
  loss = {
    name: sapt.evaluate(apply_fn, r.variables, _digits(100, 0))[1]
    for name, r in (('coop', plain), ('sapt', sam))
  }
  assert sharp['sapt'] <= sharp['coop']
  assert loss['sapt'] <= 1.5 * loss['coop']
