"""LAME: Laplacian-regularised maximum likelihood on the outputs.

LAME leaves the model alone. Per batch it takes the source model's class
probabilities p and features, builds an affinity graph W between the
batch's samples, and runs the bound optimisation of the paper,

  z <- softmax(log p + lambda W z),

from z = p until the energy stops decreasing (or `max_steps`). Neighbours in
feature space are pulled towards the same prediction.
"""

import jax
import jax.numpy as jnp

from tta_jax._src import base, losses, params as params_lib

AFFINITIES = ('knn', 'rbf', 'linear')


def lame(
  apply_fn,
  *,
  affinity: str = 'knn',
  knn: int = 5,
  sigma: float | None = None,
  force_symmetry: bool = False,
  bound_lambda: float = 1.0,
  max_steps: int = 100,
  features: str = 'pre_logits',
) -> base.Adapter:
  """LAME (Boudiaf et al., CVPR 2022): output-only Laplacian adjustment.

  The model runs in source mode (BN with the source statistics, as the
  official code and MD's `lame.py` (Marsden & Doebler's benchmark code)
  call `model.eval()`); the chosen
  `features` are L2-normalised; padding rows are neither neighbours nor
  neighbours' neighbours, so they never change the valid rows' outputs.
  Nothing but the step counter changes in the state.

  Args:
    apply_fn: the model's `ApplyFn`.
    affinity: `'knn'` (default, as in the paper: W_ij = 1 if j is one of the
      `knn` nearest neighbours of i, self excluded, not symmetric unless
      `force_symmetry`), `'rbf'` (the official code's default:
      exp(-d^2 / (2 s^2)), s = mean distance to the `knn`-th nearest sample
      counting the sample itself, diagonal included) or `'linear'`
      (W = F F^T).
    knn: neighbours of the kNN graph, and the rank defining the rbf width.
    sigma: a fixed rbf width; None (default) is the official adaptive rule
      (the official `LAME_SIGMA` is read but never used).
    force_symmetry: replace W by (W + W^T) / 2.
    bound_lambda: weight of the Laplacian term (official: 1).
    max_steps: bound-optimisation iterations at most (official: 100); it
      stops earlier when the energy's relative change is <= 1e-8.
    features: key of `ModelOutput.features` that the affinity is built on.

  Returns:
    An `Adapter`. `StepOutput.logits` are the final exponent
    `log(p + 1e-10) + lambda W z`, whose softmax is LAME's assignment z.

  References:
    Boudiaf et al., Parameter-free Online Test-time Adaptation, CVPR 2022
    (code: github.com/fiveai/LAME).
  """
  if affinity not in AFFINITIES:
    raise ValueError(f'lame: affinity must be one of {AFFINITIES}: {affinity}')
  if knn < 1:
    raise ValueError(f'lame: knn must be >= 1, got {knn}')
  if max_steps < 1:
    raise ValueError(f'lame: max_steps must be >= 1, got {max_steps}')

  def kernel_fn(feats, mask):
    if affinity == 'knn':
      kernel = knn_affinity(feats, mask, knn)
    elif affinity == 'rbf':
      kernel = rbf_affinity(feats, mask, knn, sigma)
    else:
      kernel = linear_affinity(feats, mask)
    return 0.5 * (kernel + kernel.T) if force_symmetry else kernel

  def init_fn(variables, rng):
    return base.init_state(variables, rng)

  def step_fn(state, batch, *, meta=None, **extra_args):
    del meta, extra_args
    mask = losses.batch_mask(batch)
    out = apply_fn(state.params, state.batch_stats, batch['image'])
    feats = out.features[features]
    feats = feats / jnp.maximum(
      jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12
    )
    log_p = jnp.log(jax.nn.softmax(out.logits, axis=-1) + 1e-10)
    logits, steps = laplacian_optimization(
      log_p,
      kernel_fn(feats, mask),
      mask,
      bound_lambda=bound_lambda,
      max_steps=max_steps,
    )
    metrics = {'lame_steps': steps.astype(jnp.float32)}
    return state._replace(step=state.step + 1), base.StepOutput(logits, metrics)

  return base.adapter(init_fn, step_fn, params_lib.no_params)


def _sq_distances(x, valid):
  """Squared euclidean distances [N, N] (exact 0 on the diagonal)."""
  gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.diagonal(gram)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  d2 = jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, d2)
  pair = valid[:, None] & valid[None, :]
  return d2, pair


def knn_affinity(x: jax.Array, mask: jax.Array, knn: int) -> jax.Array:
  """W_ij = 1 iff j is among the `knn` nearest valid samples to valid i ≠ j.

  Args:
    x: `[N, D]` features.
    mask: `[N]` bool, False on padding rows.
    knn: neighbours per row (fewer when fewer valid samples exist).

  Returns:
    `[N, N]` float, zero on the diagonal and on padding rows and columns.
  """
  n = x.shape[0]
  d2, pair = _sq_distances(x, mask)
  pair = pair & ~jnp.eye(n, dtype=bool)
  k = min(knn, n - 1)
  if k < 1:
    return jnp.zeros((n, n), x.dtype)
  _, idx = jax.lax.top_k(-jnp.where(pair, d2, jnp.inf), k)  # [N, k]
  real = jnp.take_along_axis(pair, idx, axis=1)
  rows = jnp.arange(n)[:, None]
  return jnp.zeros((n, n), x.dtype).at[rows, idx].set(real.astype(x.dtype))


def rbf_affinity(
  x: jax.Array, mask: jax.Array, knn: int, sigma: float | None = None
) -> jax.Array:
  """exp(-d_ij^2 / (2 s^2)) between valid samples (diagonal included).

  Args:
    x: `[N, D]` features.
    mask: `[N]` bool, False on padding rows.
    knn: with `sigma=None`, s is the mean over valid rows of the distance to
      the `knn`-th nearest valid sample, the sample itself counting as the
      first (the official rule).
    sigma: a fixed width instead.

  Returns:
    `[N, N]` float, zero on padding rows and columns.
  """
  n = x.shape[0]
  d2, pair = _sq_distances(x, mask)
  if sigma is None:
    k = min(knn, n)
    dist = jnp.where(pair, jnp.sqrt(d2), jnp.inf)
    nearest = -jax.lax.top_k(-dist, k)[0]  # [N, k] ascending
    n_valid = jnp.sum(mask.astype(jnp.int32))
    rank = jnp.clip(jnp.minimum(k, n_valid) - 1, 0, k - 1)
    kth = jnp.where(mask, nearest[:, rank], 0.0)
    s = losses.masked_mean(kth, mask)
    s = jnp.maximum(s, 1e-12)
  else:
    s = jnp.asarray(sigma, x.dtype)
  return jnp.where(pair, jnp.exp(-d2 / (2.0 * s**2)), 0.0)


def linear_affinity(x: jax.Array, mask: jax.Array) -> jax.Array:
  """W = X X^T between valid samples (zero on padding rows and columns)."""
  gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(mask[:, None] & mask[None, :], gram, 0.0)


def laplacian_optimization(
  log_probs: jax.Array,
  kernel: jax.Array,
  mask: jax.Array | None = None,
  *,
  bound_lambda: float = 1.0,
  max_steps: int = 100,
) -> tuple[jax.Array, jax.Array]:
  """LAME's bound optimisation, as a `lax.while_loop` with static shapes.

  Iterates z <- softmax(-u + lambda W z), u = -log p, from z = softmax(-u),
  and stops after `max_steps` or once (from the third iteration on) the
  energy E = sum(u z - lambda (lambda W z) z + z log z) changes by at most
  1e-8 of its previous value, as in the official `laplacian_optimization`
  (whose energy indeed weighs the pairwise term by lambda twice). Padding
  rows are left out of E; their rows and columns of `kernel` must be zero.

  Args:
    log_probs: `[N, K]` log p (= -u).
    kernel: `[N, N]` affinities W.
    mask: `[N]` bool, False on padding rows.
    bound_lambda: lambda.
    max_steps: iterations at most.

  Returns:
    `(logits, steps)`: the last exponent `[N, K]` (softmax(logits) is z)
    and the number of iterations run.
  """
  unary = -log_probs
  rows = (
    jnp.ones(unary.shape[:1], unary.dtype)
    if mask is None
    else mask.astype(unary.dtype)
  )[:, None]

  def body(carry):
    i, z, _, old_e, _ = carry
    pairwise = bound_lambda * jnp.matmul(
      kernel, z, precision=jax.lax.Precision.HIGHEST
    )
    exponent = -unary + pairwise
    z = jax.nn.softmax(exponent, axis=-1)
    e = jnp.sum(
      rows
      * (
        unary * z
        - bound_lambda * pairwise * z
        + z * jnp.log(jnp.maximum(z, 1e-20))
      )
    )
    done = (i > 1) & (jnp.abs(e - old_e) <= 1e-8 * jnp.abs(old_e))
    return i + 1, z, exponent, jnp.where(done, old_e, e), done

  def cond(carry):
    i, *_, done = carry
    return (i < max_steps) & ~done

  init = (
    jnp.zeros([], jnp.int32),
    jax.nn.softmax(-unary, axis=-1),
    -unary,
    jnp.asarray(jnp.inf, unary.dtype),
    jnp.zeros([], bool),
  )
  steps, _, logits, _, _ = jax.lax.while_loop(cond, body, init)
  return logits, steps
