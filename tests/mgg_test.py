"""MGG: the gradient memory layer, the learned optimiser, the method, and
its pre-training (the checks of the method's specification)."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.flatten_util import ravel_pytree

from tta_jax import models, testing as test_utils
from tta_jax._src import checkpoint, losses, params as params_lib
from tta_jax.data import sources
from tta_jax.methods import mgg
from tta_jax.models.generators import gradient_memory as gm
from tta_jax.trainers import base as trainers_base, mgg as mgg_trainer

STAGES = ('stage1', 'stage2', 'stage3')


def _phi(seed=0, hidden=8, **overrides):
  module = gm.GradientMemory(hidden=hidden)
  phi = module.init(
    jax.random.key(seed), jnp.zeros((1, 2)), module.empty_memory(1)
  )['params']
  r = np.random.default_rng(seed)
  # Non-trivial LayerNorm affines and gates (the init has ones and zeros).
  phi = jax.tree.map(
    lambda x: x + 0.3 * r.normal(size=x.shape).astype(x.dtype), phi
  )
  return {**phi, **{k: jnp.asarray(v) for k, v in overrides.items()}}


def _tiny_meta(apply_fn, variables, seed=0):
  images = test_utils.fake_batch(100 + seed, 64)['image']
  mean, std = mgg.source_statistics(
    apply_fn, variables, images, features=STAGES
  )
  return {**mgg.init_meta(jax.random.key(seed), mean, std), 'phi': _phi(seed)}


# ---------------------------------------------------------------------------
# The gradient memory layer.


def test_primal_form_equals_dual_form():
  with jax.enable_x64(True):
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), _phi(1))
    r = np.random.default_rng(0)
    x = jnp.asarray(r.normal(size=2))
    w = jnp.asarray(r.normal(size=(8, 8)) * 0.3)
    b = jnp.asarray(r.normal(size=8) * 0.3)
    u, w_new, b_new = gm.gml_step(p, x, w, b)
    # TTT's dual form for mini-batch 1: q W - eta (q . k) G + b - eta G.
    q, k, v = x @ p['q_proj'], x @ p['k_proj'], x @ p['v_proj']
    eta = (
      jax.nn.sigmoid(
        x @ p['learnable_ttt_lr_weight'] + p['learnable_ttt_lr_bias']
      )
      / 8
      * max(0.0, 1.0 + float(p['learnable_token_idx']))
    )
    ln = (p['ttt_norm_weight'], p['ttt_norm_bias'])
    g = gm.ln_l2_grad(k @ w + b, v - k, *ln)
    z = q @ w - eta * (q @ k) * g + b - eta * g
    h = q + gm.layer_norm(z, *ln)
    h = gm.layer_norm(h, p['post_norm_weight'], p['post_norm_bias'])
    dual = jnp.tanh(h @ p['o_proj'])[0]
    np.testing.assert_allclose(u, dual, rtol=0, atol=1e-10)
    np.testing.assert_allclose(w_new, w - eta * jnp.outer(k, g), atol=1e-12)
    np.testing.assert_allclose(b_new, b - eta * g, atol=1e-12)
    assert abs(float(u)) > 1e-3  # not a degenerate comparison


def test_closed_form_layer_norm_backward_equals_jax_grad():
  with jax.enable_x64(True):
    r = np.random.default_rng(1)
    z, t = (jnp.asarray(r.normal(size=(5, 8))) for _ in range(2))
    scale, bias = jnp.asarray(r.normal(size=8)), jnp.asarray(r.normal(size=8))
    loss = lambda z: (
      0.5 * jnp.sum(jnp.square(gm.layer_norm(z, scale, bias) - t))
    )
    np.testing.assert_allclose(
      gm.ln_l2_grad(z, t, scale, bias), jax.grad(loss)(z), atol=1e-10
    )


def test_memory_is_frozen_when_the_inner_step_size_is_zero():
  module = gm.GradientMemory()
  phi = _phi(2, learnable_token_idx=-1.0)  # max(0, 1 + s) = 0: eta = 0
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)), jnp.float32)
  memory = module.apply({'params': phi}, 6, method='initial_memory')
  u0, _ = module.apply({'params': phi}, x, memory)
  for _ in range(4):
    u, new = module.apply({'params': phi}, x, memory)
    np.testing.assert_array_equal(new.w, memory.w)
    np.testing.assert_array_equal(new.b, memory.b)
    np.testing.assert_array_equal(u, u0)  # a fixed map of x
    memory = new
  _, moved = module.apply({'params': _phi(2)}, x, memory)  # eta > 0
  assert not np.array_equal(moved.w, memory.w)


# ---------------------------------------------------------------------------
# The learned optimiser.


def _grads(seed, shape=(3, 4)):
  r = np.random.default_rng(seed)
  return {
    'a': jnp.asarray(r.normal(size=shape), jnp.float32),
    'b': {'c': jnp.asarray(r.normal(size=5) * 1e-3, jnp.float32)},
  }


def _run(tx, n=5, adjust=None):
  params = _grads(99)
  state = tx.init(params)
  if adjust is not None:
    state = adjust(state)
  for i in range(n):
    updates, state = tx.update(_grads(i), state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_u_equals_m_tilde_reproduces_adam_with_the_t_plus_1_convention():
  lr = 1e-2
  adam_slot = mgg.Generator(
    generate=lambda x, g, memory: (x[:, 0], memory),
    initial_memory=lambda n: (),
    empty_memory=lambda n: (),
  )
  ours = optax.chain(mgg.scale_by_learned(adam_slot), optax.scale(-lr))
  ref = optax.adam(lr, b1=0.9, b2=0.99, eps=1e-8)
  # optax's step t divides by 1 - b^t; MGG's by 1 - b^(t + 1): start the
  # reference's counter at 1.
  shifted = lambda s: (s[0]._replace(count=jnp.ones([], jnp.int32)), *s[1:])
  test_utils.assert_trees_close(
    _run(ours), _run(ref, adjust=shifted), rtol=1e-6, atol=1e-7
  )
  # Without the shift they differ: the convention is really t + 1.
  assert not test_utils.trees_equal(_run(ours), _run(ref))


def test_u_equals_g_reproduces_sgd():
  sgd_slot = mgg.Generator(
    generate=lambda x, g, memory: (g, memory),
    initial_memory=lambda n: (),
    empty_memory=lambda n: (),
  )
  ours = optax.chain(mgg.scale_by_learned(sgd_slot), optax.scale(-0.1))
  test_utils.assert_trees_close(
    _run(ours), _run(optax.sgd(0.1)), rtol=1e-6, atol=1e-7
  )


def test_updates_are_bounded_by_the_step_size():
  lr = 1e-3
  tx = mgg.mgg_optimizer(_phi(3), lr)
  params = _grads(7)
  state = tx.init(params)
  for i in range(5):
    huge = jax.tree.map(lambda g: 1e6 * g, _grads(i))
    updates, state = tx.update(huge, state, params)
    for leaf in jax.tree.leaves(updates):
      assert np.all(np.abs(np.asarray(leaf)) <= lr)
  assert int(state.inner_state[0].count) == 5


def test_permuting_coordinates_permutes_the_updates():
  tx = mgg.mgg_optimizer(_phi(4), 1e-2)
  r = np.random.default_rng(0)
  grads = [jnp.asarray(r.normal(size=64), jnp.float32) for _ in range(4)]
  perm = r.permutation(64)
  s1, s2 = tx.init(grads[0]), tx.init(grads[0])
  for g in grads:
    u1, s1 = tx.update(g, s1)
    u2, s2 = tx.update(g[perm], s2)
    np.testing.assert_allclose(u2, u1[perm], rtol=1e-6, atol=1e-9)


def test_memory_restarts_from_the_learned_initial_state():
  phi = _phi(5)
  tx = mgg.scale_by_mgg(phi)
  state = tx.init(jnp.zeros(3))
  _, state = tx.update(jnp.ones(3), state)
  initial = gm.GradientMemory().apply(
    {'params': phi}, 3, method='initial_memory'
  )
  # One written step away from W1, b1 (not from the zeros of init).
  fresh = tx.init(jnp.zeros(3))._replace(memory=initial)
  _, expected = tx.update(jnp.ones(3), fresh)
  np.testing.assert_array_equal(state.memory.w, expected.memory.w)


# ---------------------------------------------------------------------------
# The method.


def _adapter(**kw):
  _, apply_fn, variables = test_utils.tiny_bn_net(0)
  adapter = mgg.mgg(apply_fn, features=STAGES, learning_rate=1e-2, **kw)
  return adapter, apply_fn, variables


def test_method_steps_are_bounded_and_reset_is_bit_identical():
  adapter, apply_fn, variables = _adapter()
  meta = _tiny_meta(apply_fn, variables)
  step = jax.jit(adapter.step)
  state0 = adapter.init(variables, jax.random.key(0))

  def run():
    state, logits = state0, []
    for i in range(4):
      old = state.params
      state, out = step(
        state, test_utils.fake_batch(i, 16, labels=False), meta=meta
      )
      logits.append(np.asarray(out.logits))
      delta = jax.tree.map(lambda a, b: np.abs(a - b), state.params, old)
      assert max(float(d.max()) for d in jax.tree.leaves(delta)) <= 1e-2 + 1e-7
    return logits

  first, second = run(), run()  # the runner's reset keeps state0
  for a, b in zip(first, second, strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], first[3])  # adaptation happened


def test_non_finite_gradient_is_skipped_and_counted():
  adapter, apply_fn, variables = _adapter()
  meta = _tiny_meta(apply_fn, variables)
  step = jax.jit(adapter.step)
  state = adapter.init(variables, jax.random.key(0))
  state, _ = step(state, test_utils.fake_batch(0, 16, labels=False), meta=meta)
  # An Inf pixel is masked out before the step (the input policy): the
  # update goes on from the other rows.
  bad = test_utils.fake_batch(1, 16, labels=False)
  bad['image'][3, 2, 2, 0] = np.inf
  _, out = step(state, bad, meta=meta)
  assert float(out.metrics['invalid_rows']) == 1.0
  assert float(out.metrics['skipped']) == 0.0
  # A finite row that overflows the batch statistics makes the gradient
  # non-finite: MGG's optimiser skips the batch and counts it.
  bad = test_utils.fake_batch(1, 16, labels=False)
  bad['image'][3] = 3e38
  new, out = step(state, bad, meta=meta)
  assert float(out.metrics['invalid_rows']) == 0.0
  assert float(out.metrics['skipped']) == 1.0
  assert float(out.metrics['n_skipped']) == 1.0
  assert test_utils.trees_equal(new.params, state.params)
  assert int(new.opt_state.inner_state[0].count) == 1
  for leaf in jax.tree.leaves(new):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert np.all(np.isfinite(leaf))
  new, out = step(new, test_utils.fake_batch(2, 16, labels=False), meta=meta)
  assert float(out.metrics['skipped']) == 0.0
  assert int(new.opt_state.inner_state[0].count) == 2


def test_meta_from_another_model_or_generator_is_refused():
  adapter, apply_fn, variables = _adapter()
  meta = _tiny_meta(apply_fn, variables)
  batch = test_utils.fake_batch(0, 16, labels=False)
  state = adapter.init(variables, jax.random.key(0))
  other = {**meta, 'source_mean': jnp.zeros(9216), 'source_std': jnp.ones(9216)}
  with pytest.raises(ValueError, match=r'\(9216,\).*\(28,\).*another model'):
    adapter.step(state, batch, meta=other)
  wide = {**meta, 'phi': _phi(0, hidden=16)}
  with pytest.raises(ValueError, match=r'\(16, 16\).*\(8, 8\)'):
    adapter.step(state, batch, meta=wide)
  with pytest.raises(ValueError, match='needs meta'):
    adapter.step(state, batch)


def test_foa_discrepancy_unbiased_masked_and_safe_on_dead_features():
  r = np.random.default_rng(0)
  f = r.normal(size=(6, 4)).astype(np.float32)
  mu_s, sd_s = r.normal(size=4), r.uniform(0.5, 2, size=4)
  want = (
    np.sum((f[:4].std(0, ddof=1) - sd_s) ** 2)
    + np.sum((f[:4].mean(0) - mu_s) ** 2)
  ) / 64
  mask = np.arange(6) < 4
  got = losses.foa_discrepancy(
    f, jnp.asarray(mu_s, jnp.float32), jnp.asarray(sd_s, jnp.float32), mask
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)
  dead = jnp.asarray(f).at[:, 1].set(0.0)  # a ReLU unit off for all rows
  g = jax.grad(lambda x: losses.foa_discrepancy(x, jnp.zeros(4), jnp.ones(4)))(
    dead
  )
  assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------------
# The ViT (LayerNorm) and MGG on it.


def test_vit_contract_and_layer_norm_mask():
  module = models.build(
    'digits_vit', num_classes=5, width=16, depth=2, num_heads=2
  )
  apply_fn = models.make_apply_fn(module, (8, 8, 1))
  variables = models.init_variables(module, (8, 8, 1), jax.random.key(0))
  assert variables['batch_stats'] == {}
  out = apply_fn(variables['params'], {}, jnp.zeros((3, 8, 8, 1)))
  assert out.logits.shape == (3, 5)
  assert out.features['pre_logits'].shape == (3, 16)
  assert out.features['block_cls'].shape == (3, 2 * 16)
  np.testing.assert_array_equal(
    out.features['block_cls'][:, -16:], out.features['pre_logits']
  )
  mask = mgg.norm_affine(variables['params'], {})
  assert params_lib.selected_paths(variables['params'], mask) == [
    f'{m}/{leaf}'
    for m in ('blocks_0/norm1', 'blocks_0/norm2', 'blocks_1/norm1')
    + ('blocks_1/norm2', 'norm')
    for leaf in ('bias', 'scale')
  ]


# ---------------------------------------------------------------------------
# Pre-training.


def _tiny_vit():
  module = models.build(
    'digits_vit', num_classes=5, width=8, depth=1, num_heads=2
  )
  apply_fn = models.make_apply_fn(module, (8, 8, 1))
  variables = models.init_variables(module, (8, 8, 1), jax.random.key(1))
  return module, apply_fn, variables


def _domain(name, seed, n):
  b = test_utils.fake_batch(seed, n)
  return sources.Domain(name, sources.ArraySource(b['image'], b['label']))


def _context(tmp_path, *, model=None, **hparams):
  module, apply_fn, variables = model or test_utils.tiny_bn_net(0)
  settings = dict(
    epochs=2,
    num_images=8,
    stats_images=32,
    val_batch_size=8,
    val_examples=16,
  )
  settings.update(hparams)
  return trainers_base.TrainContext(
    model_config={'name': 'tiny'},
    module=module,
    apply_fn=apply_fn,
    variables=variables,
    input_shape=test_utils.TINY_SHAPE,
    num_classes=test_utils.TINY_CLASSES,
    source_domains=[_domain('source', 0, 64)],
    val_domains=[],
    shifted_domains=[_domain('speckle', 1, 24), _domain('blur', 2, 24)],
    hparams=ml_collections.ConfigDict(settings),
    method_kwargs={'features': STAGES} if model is None else {},
    source_recipe={},
    seed=0,
    rng=jax.random.key(0),
    checkpointer=checkpoint.StateCheckpointer(tmp_path / 'ckpt'),
    cache_dir=None,
    log_every=0,
  )


def test_truncated_meta_gradient_matches_finite_differences():
  _, apply_fn, variables = _tiny_vit()  # 3 LayerNorms, 5 classes
  settings = mgg_trainer.method_settings({})
  with jax.enable_x64(True):
    f64 = lambda t: jax.tree.map(
      lambda x: (
        jnp.asarray(x, jnp.float64)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
        else x
      ),
      t,
    )
    variables = f64(variables)
    theta0, frozen = params_lib.split(
      variables['params'], mgg.norm_affine(variables['params'], {})
    )
    lr = 0.05
    x1, x2 = (
      jnp.asarray(test_utils.fake_batch(i, 4)['image'], jnp.float64)
      for i in (3, 4)
    )
    out = apply_fn(variables['params'], {}, x1)
    d = out.features['block_cls'].shape[-1]
    mean, std = jnp.zeros(d), jnp.ones(d)
    phi = f64(_phi(6))
    # SGD(1) on phi: phi_new = phi - dJ/dphi.
    step = mgg_trainer.make_train_step(
      apply_fn, frozen, {}, settings, lr, optax.sgd(1.0)
    )
    module = gm.GradientMemory()
    n = sum(x.size for x in jax.tree.leaves(theta0))
    carry = f64(mgg_trainer._fresh_carry(theta0, module, n))
    sgd = optax.sgd(1.0).init(phi)
    p1, _, carry, _, _ = step(phi, sgd, carry, x1, mean, std)
    test_utils.assert_trees_close(p1, phi, rtol=0, atol=0)  # nothing to judge
    p2, *_ = step(p1, sgd, carry, x2, mean, std)
    grad = jax.tree.map(jnp.subtract, p1, p2)

    def loss(theta, images):
      out = apply_fn(params_lib.merge(theta, frozen), {}, images)
      return jnp.mean(
        losses.softmax_entropy(out.logits)
      ) + 0.4 * losses.foa_discrepancy(out.features['block_cls'], mean, std)

    g1, unravel = ravel_pytree(jax.grad(loss)(theta0, x1))
    x, _, _ = mgg.adam_features(g1, 0 * g1, 0 * g1, jnp.zeros([], int))

    @jax.jit  # ten evaluations below: compile once
    def objective(phi):  # J(phi) = L(theta_0 - lr u_phi(x_1, W1, b1); X_2)
      memory = module.apply({'params': phi}, n, method='initial_memory')
      u, _ = module.apply({'params': phi}, x, memory)
      theta1 = jax.tree.map(lambda p, d: p - lr * d, theta0, unravel(u))
      return loss(theta1, x2)

    for name, index in (
      ('W1', (0, 1)),
      ('q_proj', (1, 3)),
      ('o_proj', (2, 0)),
      ('learnable_ttt_lr_bias', ()),
      ('post_norm_bias', (4,)),
    ):
      h = 1e-5
      bump = lambda s: {**p1, name: p1[name].at[index].add(s * h)}
      fd = (objective(bump(1)) - objective(bump(-1))) / (2 * h)
      np.testing.assert_allclose(grad[name][index], fd, rtol=1e-5, atol=1e-12)
      assert abs(float(fd)) > 1e-9, name


def test_pretraining_reloads_bit_identically_and_resumes(tmp_path, caplog):
  ctx = _context(tmp_path / 'a', epochs=2)
  result = mgg_trainer.train(ctx)
  assert set(result.meta) == {'phi', 'source_mean', 'source_std'}
  assert result.metrics['num_adapted'] == 2 * (4 + 4 + 8 + 16)
  assert 1 <= result.metrics['best_epoch'] <= 2
  assert np.isfinite(result.metrics['loss'])
  # Saved and restored as the runner does (orbax, no template): bit-equal.
  path = (tmp_path / 'meta').absolute()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, checkpoint.to_storable(result.meta))
  ckptr.wait_until_finished()
  loaded = ocp.StandardCheckpointer().restore(path)
  assert test_utils.trees_equal(
    jax.tree.map(np.asarray, loaded), jax.tree.map(np.asarray, result.meta)
  )
  # Interrupted after 1 epoch, resumed to 2: the same phi.
  ctx2 = _context(tmp_path / 'b', epochs=1)
  mgg_trainer.train(ctx2)
  with caplog.at_level(logging.INFO, logger='absl'):
    resumed = mgg_trainer.train(ctx2._replace(hparams=ctx.hparams))
  assert 'mgg: resuming pre-training at epoch 1' in caplog.text
  assert test_utils.trees_equal(resumed.meta, result.meta)


def test_parity_and_reset_modes_differ(tmp_path):
  # Parity keeps the drifted parameters into epoch 2; reset restarts them.
  phis = [
    mgg_trainer.train(
      _context(
        tmp_path / str(reset),
        reset_params_each_epoch=reset,
        eval_every=100,  # select the last epoch
      )
    ).meta['phi']
    for reset in (False, True)
  ]
  assert not test_utils.trees_equal(*phis)


def test_trainer_needs_shifted_domains(tmp_path):
  ctx = _context(tmp_path)._replace(shifted_domains=[])
  with pytest.raises(ValueError, match='shifted domains'):
    mgg_trainer.train(ctx)
