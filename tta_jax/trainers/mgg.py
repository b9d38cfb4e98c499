"""MGG pre-training: the generator learns from a few unlabelled shifted images.

MGTTA's recipe (`train_mgg.py`, `run.sh`): a fixed random subset of
`num_images` (128) unlabelled images from shifts disjoint from the test
stream (`ctx.shifted_domains`; on the digits benchmark the four validation
corruptions of the source-val digits), batch 2, 40 epochs, Adam 1e-2 on
phi, the adapted parameters moved by alpha_train = 1e-4 per step.

The meta-objective is one-step truncated: at step t the loss L(theta_{t-1};
X_t) of the new batch is differentiated with respect to the leaf
theta_{t-1} = sg(theta_{t-2}) - alpha_train * u_phi(sg(x_{t-1}),
sg(memory_{t-2})), and that gradient g_t is pushed back through the previous
update only (MGTTA's backward hooks); Adam moves phi; then g_t, with the new
phi, makes the next update. Nothing flows through the memory written by
earlier steps, m, v, or earlier parameters; the learned initial memory
(W1, b1) gets its gradient through the first update of an epoch, which reads
it. Labels are never used, except to report accuracy.

Each epoch restarts m, v, t and the memory. `reset_params_each_epoch`
False is the paper's parity mode (the adapted parameters keep drifting
across all epochs, as `TrainMGG.init_state` leaves them); True (recommended)
restarts them from the source model each epoch. After every `eval_every`
epochs phi is scored by full adaptation (the test-time adapter, reset per
domain, batch `val_batch_size`) on every shifted domain; the best mean
accuracy is kept. Source statistics for FOA's term come from
`stats_images` clean source images and are returned with phi in `meta`.
"""

import inspect
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.flatten_util import ravel_pytree

from tta_jax import methods
from tta_jax._src import losses, params as params_lib
from tta_jax.data import sources
from tta_jax.methods import mgg as mgg_lib
from tta_jax.models.generators import gradient_memory as gm
from tta_jax.trainers import base

DEFAULTS = {
  'epochs': 40,
  'batch_size': 2,
  'num_images': 128,
  'learning_rate': 1e-2,  # Adam on phi
  'train_lr': 1e-4,  # alpha_train
  'reset_params_each_epoch': False,  # False: the paper's parity mode
  'stats_images': 1000,  # clean source images for the source statistics
  'val_batch_size': 64,
  'val_examples': 0,  # per shifted domain; 0: all
  'eval_every': 1,  # epochs
}


class _Carry(NamedTuple):
  theta: Any  # the adapted leaves
  opt: mgg_lib.MggState  # m, v, t, memory of the current epoch
  prev_x: jax.Array  # [N, 2] the previous update's inputs
  prev_memory: Any  # the memory that update read
  prev_fresh: jax.Array  # bool: it read the learned initial memory
  has_prev: jax.Array  # bool: there is a previous update to judge


def method_settings(method_kwargs) -> dict[str, Any]:
  """`mgg`'s keyword arguments, its defaults filled in (masks parsed)."""
  sig = inspect.signature(mgg_lib.mgg)
  out = {
    p.name: p.default
    for p in sig.parameters.values()
    if p.kind == p.KEYWORD_ONLY
  }
  unknown = sorted(set(method_kwargs) - set(out))
  if unknown:
    raise ValueError(f'unknown mgg arguments {unknown}; valid: {sorted(out)}')
  out.update(method_kwargs)
  if isinstance(out['adapt'], str):
    out['adapt'] = methods.mask_from_spec(out['adapt'])
  return out


def make_train_step(apply_fn, frozen, batch_stats, settings, train_lr, tx):
  """The jitted step `(phi, phi_opt, carry, images) -> (..., metrics)`."""
  module = gm.build(settings['generator'], hidden=settings['hidden'])
  adam = dict(b1=settings['b1'], b2=settings['b2'], eps=settings['eps'])
  keys, lam = tuple(settings['features']), settings['fitness_lambda']

  def loss_fn(theta, images, mean, std):
    out = apply_fn(
      params_lib.merge(theta, frozen),
      batch_stats,
      images,
      use_batch_stats=True,
    )
    feats = mgg_lib.feature_vector(out.features, keys)
    entropy = jnp.mean(losses.softmax_entropy(out.logits))
    disc = losses.foa_discrepancy(feats, mean, std, divisor=settings['divisor'])
    return entropy + lam * disc, out.logits

  def step(phi, phi_opt, carry, images, mean, std):
    (loss, logits), g = jax.value_and_grad(loss_fn, has_aux=True)(
      carry.theta, images, mean, std
    )
    g, unravel = ravel_pytree(g)
    n = g.size

    def previous_update(phi):  # u of the last step, as a function of phi
      memory = jax.tree.map(
        lambda m0, m: jnp.where(carry.prev_fresh, m0, m),
        module.apply({'params': phi}, n, method='initial_memory'),
        carry.prev_memory,
      )
      return module.apply({'params': phi}, carry.prev_x, memory)[0]

    _, vjp = jax.vjp(previous_update, phi)
    (phi_grad,) = vjp(-train_lr * g)  # dJ/dtheta_{t-1} . dtheta_{t-1}/dphi
    finite = jnp.isfinite(loss) & jnp.all(jnp.isfinite(g))
    updates, new_phi_opt = tx.update(phi_grad, phi_opt, phi)
    keep = carry.has_prev & finite
    pick = lambda new, old: jax.tree.map(
      lambda a, b: jnp.where(keep, a, b), new, old
    )
    phi, phi_opt = (
      pick(optax.apply_updates(phi, updates), phi),
      pick(new_phi_opt, phi_opt),
    )
    # The next update, with the new phi (MGTTA steps phi first).
    st = carry.opt
    x, mu, nu = mgg_lib.adam_features(g, st.mu, st.nu, st.count, **adam)
    fresh = st.count == 0
    memory = jax.tree.map(
      lambda m0, m: jnp.where(fresh, m0, m),
      module.apply({'params': phi}, n, method='initial_memory'),
      st.memory,
    )
    u, new_memory = module.apply({'params': phi}, x, memory)
    theta = jax.tree.map(lambda p, d: p - train_lr * d, carry.theta, unravel(u))
    new = _Carry(
      theta,
      mgg_lib.MggState(st.count + 1, mu, nu, new_memory),
      x,
      memory,
      fresh,
      jnp.ones([], bool),
    )
    carry = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, carry)
    metrics = {
      'loss': loss,
      'meta_grad_norm': optax.tree.norm(phi_grad),
      'skipped': (~finite).astype(jnp.float32),
    }
    return phi, phi_opt, carry, logits, metrics

  return jax.jit(step)


def _fresh_carry(theta, module, n):
  zeros = jnp.zeros((n,), jnp.float32)
  opt = mgg_lib.MggState(
    jnp.zeros([], jnp.int32), zeros, zeros, module.empty_memory(n)
  )
  return _Carry(
    theta,
    opt,
    jnp.zeros((n, 2), jnp.float32),
    module.empty_memory(n),
    jnp.zeros([], bool),
    jnp.zeros([], bool),
  )


def _subset(domain_sources, n: int, rng) -> dict[str, np.ndarray]:
  pool = sources.ConcatSource(list(domain_sources))
  if n > len(pool):
    raise ValueError(f'mgg: {n} images asked, the domains hold {len(pool)}')
  return pool[np.sort(rng.choice(len(pool), n, replace=False))]


def validation_accuracy(adapter, variables, domains, meta, batch_size: int):
  """Mean accuracy of full adaptation, reset per domain: (mean, per domain)."""
  step = jax.jit(adapter.step)
  accs = []
  for domain in domains:
    state = adapter.init(variables, jax.random.key(0))
    correct = n = 0
    for batch in sources.padded_batches(domain, batch_size):
      state, out = step(
        state, {'image': batch['image'], 'mask': batch['mask']}, meta=meta
      )
      hit = np.asarray(out.logits).argmax(-1) == batch['label']
      correct += int(hit[batch['mask']].sum())
      n += int(batch['mask'].sum())
    accs.append(correct / max(n, 1))
  return float(np.mean(accs)), accs


def train(ctx: base.TrainContext) -> base.TrainResult:
  """Pre-trains MGG (see the module docstring); `meta` = phi + statistics."""
  cfg = {**DEFAULTS, **dict(ctx.hparams or {})}
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise ValueError(f'unknown mgg trainer settings {unknown}')
  if not ctx.shifted_domains:
    raise ValueError(
      'mgg pre-training needs shifted domains disjoint from the test stream '
      '(the validation stream); this benchmark has none'
    )
  settings = method_settings(ctx.method_kwargs)
  adapter = methods.METHODS['mgg'](ctx.apply_fn, **settings)
  module = gm.build(settings['generator'], hidden=settings['hidden'])
  r = np.random.default_rng([ctx.seed, 2412])
  variables = ctx.variables
  params, stats = variables['params'], variables['batch_stats']
  theta0, frozen = params_lib.split_by(
    settings['adapt'], params, stats, who='mgg'
  )
  n = sum(int(np.size(x)) for x in jax.tree.leaves(theta0))

  clean = _subset(
    [d.source for d in ctx.source_domains], cfg['stats_images'], r
  )
  mean, std = mgg_lib.source_statistics(
    ctx.apply_fn, variables, clean['image'], features=settings['features']
  )
  train_data = _subset(
    [d.source for d in ctx.shifted_domains], cfg['num_images'], r
  )
  val = []
  for d in ctx.shifted_domains:
    data = sources.materialize(d.source)
    if cfg['val_examples']:
      data = {k: v[: cfg['val_examples']] for k, v in data.items()}
    val.append(data)

  tx = optax.adam(cfg['learning_rate'])
  phi = mgg_lib.init_meta(
    jax.random.fold_in(ctx.rng, 0),
    mean,
    std,
    **{'generator': settings['generator'], 'hidden': settings['hidden']},
  )['phi']
  step = make_train_step(
    ctx.apply_fn, frozen, stats, settings, cfg['train_lr'], tx
  )
  meta = lambda phi: {'phi': phi, 'source_mean': mean, 'source_std': std}
  state = {
    'phi': phi,
    'phi_opt': tx.init(phi),
    'theta': theta0,
    'best': phi,
    'best_accuracy': np.float64(-1.0),
    'best_epoch': np.int64(0),
    'epoch': np.int64(0),
  }
  saved_at, restored = ctx.checkpointer.restore_latest(state)
  if saved_at is not None:
    state = restored
    logging.info('mgg: resuming pre-training at epoch %d', int(state['epoch']))
  steps = cfg['num_images'] // cfg['batch_size']
  t0, metrics, skipped = time.perf_counter(), {}, 0
  for epoch in range(int(state['epoch']), cfg['epochs']):
    order = np.random.default_rng([ctx.seed, 2412, epoch]).permutation(
      cfg['num_images']
    )
    theta = theta0 if cfg['reset_params_each_epoch'] else state['theta']
    carry = _fresh_carry(theta, module, n)
    phi, phi_opt = state['phi'], state['phi_opt']
    correct = 0
    for s in range(steps):
      idx = order[s * cfg['batch_size'] : (s + 1) * cfg['batch_size']]
      phi, phi_opt, carry, logits, metrics = step(
        phi, phi_opt, carry, train_data['image'][idx], mean, std
      )
      correct += int(
        (np.asarray(logits).argmax(-1) == train_data['label'][idx]).sum()
      )
      skipped += int(metrics['skipped'])
    state.update(phi=phi, phi_opt=phi_opt, theta=carry.theta)
    state['epoch'] = np.int64(epoch + 1)
    done = epoch + 1
    if done % cfg['eval_every'] == 0 or done == cfg['epochs']:
      acc, per = validation_accuracy(
        adapter, variables, val, meta(phi), cfg['val_batch_size']
      )
      if acc > state['best_accuracy']:
        state.update(
          best=phi, best_accuracy=np.float64(acc), best_epoch=np.int64(done)
        )
      logging.info(
        'mgg epoch %d/%d: loss %.4f, train-stream accuracy %.4f, validation '
        'accuracy %.4f %s (best %.4f at epoch %d, %.0fs)',
        done,
        cfg['epochs'],
        float(metrics['loss']),
        correct / (steps * cfg['batch_size']),
        acc,
        np.round(per, 4).tolist(),
        float(state['best_accuracy']),
        int(state['best_epoch']),
        time.perf_counter() - t0,
      )
    ctx.checkpointer.save(done, state)
  out_metrics = {
    'val_accuracy': float(state['best_accuracy']),
    'best_epoch': int(state['best_epoch']),
    'num_adapted': n,
    'skipped_steps': skipped,
    'seconds': time.perf_counter() - t0,
    **{k: float(v) for k, v in metrics.items() if k != 'skipped'},
  }
  return base.TrainResult(meta=meta(state['best']), metrics=out_metrics)
