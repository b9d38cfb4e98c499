"""MGG (MGTTA): test-time adaptation with a learned optimiser.

The optimiser is pluggable: `scale_by_learned(Generator)` is an optax
`GradientTransformation` that turns each gradient coordinate g into
Adam-style features x = [m~, g~] and lets a coordinate-wise generator map
them (and its per-coordinate memory) to an update direction u. MGG's
generator is the gradient memory layer
(`tta_jax.models.generators.gradient_memory`); `mgg_optimizer(phi, lr)` is
`theta <- theta - lr * u` with non-finite gradients skipped, usable as the
optimizer of any gradient method here (`tent(apply_fn, mgg_optimizer(phi))`).

The method `mgg` is MGTTA's test-time loop: each batch takes one gradient of
FOA's loss (prediction entropy + lambda times the feature-statistics
discrepancy against source statistics), one generator step, and scores the
logits computed before the update. The meta-parameters arrive as
`step(..., meta={'phi', 'source_mean', 'source_std'})` (`init_meta`, or
the pre-training in `tta_jax.trainers.mgg`); the generator never learns at
test time, only its memory evolves. Reset per domain is the runner's job.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from tta_jax._src import base, grad_step, losses, params as params_lib
from tta_jax.models.generators import gradient_memory as gm

# LayerNorm affines (`norm1`, `norm`, flax's `LayerNorm_0`) and BN affines.
LAYER_NORM_AFFINE = params_lib.by_regex(
  r'(^|/)(norm[^/]*|LayerNorm_\d+)/(scale|bias)$'
)
norm_affine = params_lib.union(params_lib.bn_affine, LAYER_NORM_AFFINE)
NEVER_GIVE_UP = int(np.iinfo(np.int32).max)  # optax.apply_if_finite


class Generator(NamedTuple):
  """The learned-optimiser slot (coordinate-wise, N adapted scalars)."""

  generate: Callable  # (x [N, 2], g [N], memory) -> (u [N], memory)
  initial_memory: Callable  # n -> the memory at a domain start
  empty_memory: Callable  # n -> zeros of the memory's shapes (for init)


class MggState(NamedTuple):
  count: jax.Array  # int32: updates taken in this domain (t)
  mu: jax.Array  # [N] first moment of the gradients
  nu: jax.Array  # [N] second moment
  memory: Any  # the generator's per-coordinate memory


def adam_features(g, mu, nu, count, *, b1=0.9, b2=0.99, eps=1e-8):
  """MGG's inputs `[m~, g~]` ([N, 2]) and the new moments `(mu, nu)`.

  The official code counts the step t = count + 1 before it is used, then
  bias-corrects with the exponent t + 1: the first step divides by
  1 - b^2, not 1 - b. Reproduced exactly.
  """
  mu = b1 * mu + (1 - b1) * g
  nu = b2 * nu + (1 - b2) * jnp.square(g)
  t = (count + 2).astype(g.dtype)  # (count + 1) + 1
  m_hat = mu / (1 - b1**t)
  denom = jnp.sqrt(nu / (1 - b2**t)) + eps
  return jnp.stack([m_hat / denom, g / denom], -1), mu, nu


def scale_by_learned(
  generator: Generator, *, b1=0.9, b2=0.99, eps=1e-8
) -> optax.GradientTransformation:
  """Gradients -> update directions u (not scaled; chain a -lr scale).

  All leaves are flattened into one vector of N coordinates; the generator
  sees each coordinate independently. The memory restarts from
  `generator.initial_memory` whenever `count == 0` (init or a reset state).
  """

  def init_fn(params):
    n = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    zeros = jnp.zeros((n,), jnp.float32)
    count = jnp.zeros([], jnp.int32)
    return MggState(count, zeros, zeros, generator.empty_memory(n))

  def update_fn(updates, state, params=None):
    del params
    g, unravel = ravel_pytree(updates)
    x, mu, nu = adam_features(
      g, state.mu, state.nu, state.count, b1=b1, b2=b2, eps=eps
    )
    fresh = state.count == 0
    memory = jax.tree.map(
      lambda m0, m: jnp.where(fresh, m0, m),
      generator.initial_memory(g.size),
      state.memory,
    )
    u, memory = generator.generate(x, g, memory)
    return unravel(u), MggState(state.count + 1, mu, nu, memory)

  return optax.GradientTransformation(init_fn, update_fn)


def make_generator(phi, *, generator: str = 'gml', hidden: int = 8):
  """The `Generator` of a `gradient_memory` network with weights `phi`."""
  module = gm.build(generator, hidden=hidden)
  return Generator(
    generate=lambda x, g, memory: module.apply({'params': phi}, x, memory),
    initial_memory=lambda n: module.apply(
      {'params': phi}, n, method='initial_memory'
    ),
    empty_memory=module.empty_memory,
  )


def scale_by_mgg(phi, *, generator='gml', hidden=8, b1=0.9, b2=0.99, eps=1e-8):
  """MGG's update directions u in (-1, 1) (see `scale_by_learned`)."""
  gen = make_generator(phi, generator=generator, hidden=hidden)
  return scale_by_learned(gen, b1=b1, b2=b2, eps=eps)


def mgg_optimizer(
  phi, learning_rate: float = 1e-3, **kwargs
) -> optax.GradientTransformation:
  """`theta <- theta - learning_rate * u`; a batch with non-finite gradients
  changes nothing and is counted (`optax.apply_if_finite`, never giving up).

  The state is `ApplyIfFiniteState(..., inner_state=(MggState, ...))`:
  m, v, t and the memory (2 + 72 floats per coordinate at d = 8).
  """
  inner = optax.chain(scale_by_mgg(phi, **kwargs), optax.scale(-learning_rate))
  return optax.apply_if_finite(inner, NEVER_GIVE_UP)


def init_meta(rng, source_mean, source_std, *, generator='gml', hidden=8):
  """`meta` for `mgg`: freshly initialised phi and the source statistics."""
  module = gm.build(generator, hidden=hidden)
  phi = module.init(rng, jnp.zeros((1, 2)), module.empty_memory(1))['params']
  return {
    'phi': phi,
    'source_mean': jnp.asarray(source_mean, jnp.float32),
    'source_std': jnp.asarray(source_std, jnp.float32),
  }


def feature_vector(features: Mapping[str, jax.Array], keys: Sequence[str]):
  """The model's named features `keys`, concatenated: [B, D]."""
  missing = [k for k in keys if k not in features]
  if missing:
    raise ValueError(
      f'mgg: the model returns no features {missing}; it has '
      f'{sorted(features)} (set `features`)'
    )
  flat = [features[k].reshape(features[k].shape[0], -1) for k in keys]
  return jnp.concatenate(flat, -1)


def source_statistics(
  apply_fn, variables, images, *, features=('block_cls',), batch_size=256
):
  """(mean, unbiased std) of `feature_vector` over clean `images` ([D] each).

  The source model as trained (running BN statistics), in float64.
  """
  if len(images) < 2:
    raise ValueError(f'source_statistics needs >= 2 images, got {len(images)}')
  fn = jax.jit(
    lambda x: feature_vector(
      apply_fn(variables['params'], variables['batch_stats'], x).features,
      features,
    )
  )
  feats = np.concatenate(
    [
      np.asarray(fn(images[i : i + batch_size]), np.float64)
      for i in range(0, len(images), batch_size)
    ]
  )
  return feats.mean(0).astype(np.float32), feats.std(0, ddof=1).astype(
    np.float32
  )


def check_meta(meta, expected_phi, feature_dim: int, who: str = 'mgg'):
  """Refuses meta-parameters made for another generator or model."""
  if not isinstance(meta, Mapping) or not {'phi', 'source_mean'} <= set(meta):
    raise ValueError(
      f"{who} needs meta={{'phi', 'source_mean', 'source_std'}} "
      '(mgg.init_meta, or pre-training with the mgg trainer)'
    )
  got = {
    '/'.join(str(getattr(k, 'key', k)) for k in path): np.shape(x)
    for path, x in jax.tree_util.tree_flatten_with_path(meta['phi'])[0]
  }
  want = {
    '/'.join(str(getattr(k, 'key', k)) for k in path): tuple(x.shape)
    for path, x in jax.tree_util.tree_flatten_with_path(expected_phi)[0]
  }
  if got != want:
    diff = sorted(set(got) ^ set(want)) or [
      k for k in want if got[k] != want[k]
    ]
    k = diff[0]
    raise ValueError(
      f'{who}: the generator weights in meta have {k} of shape '
      f'{got.get(k)}, this generator needs {want.get(k)}: the MGG '
      'checkpoint was made for another generator'
    )
  for name in ('source_mean', 'source_std'):
    if np.shape(meta[name]) != (feature_dim,):
      raise ValueError(
        f'{who}: meta[{name!r}] has shape {np.shape(meta[name])}, but this '
        f"model's features have shape ({feature_dim},): the MGG checkpoint "
        'was made for another model'
      )


def mgg(
  apply_fn,
  *,
  learning_rate: float = 1e-3,
  fitness_lambda: float = 0.4,
  features: Sequence[str] = ('block_cls',),
  divisor: float = 64.0,
  adapt: params_lib.MaskFn = norm_affine,
  generator: str = 'gml',
  hidden: int = 8,
  b1: float = 0.9,
  b2: float = 0.99,
  eps: float = 1e-8,
) -> base.Adapter:
  """MGTTA (Deng et al., AAAI 2025): FOA's loss, MGG's updates.

  Each step, with test-batch BN statistics (LayerNorm models have none):
  L = mean entropy + `fitness_lambda` * FOA discrepancy of the concatenated
  `features` against meta's source statistics; g = dL/dtheta over the
  `adapt`ed leaves; theta <- theta - `learning_rate` * MGG(g); a batch with
  non-finite g is skipped (metric `skipped`; `n_skipped` counts them).

  Args:
    apply_fn: the model's `ApplyFn`.
    learning_rate: alpha at test time (run.sh: 1e-3; main.py's default 5e-3).
    fitness_lambda: FOA's lambda (0.4; 0.2 suggested for ImageNet-R).
    features: `ModelOutput.features` keys whose concatenation is F. ViTs
      here return 'block_cls' (each block's CLS token, normalised by the
      next block's norm1 or the final norm, as MGTTA); the digits CNN has
      'stage1'..'stage3'.
    divisor: FOA's constant divisor (64, whatever the batch size).
    adapt: mask of the adapted leaves (every norm-layer affine).
    generator, hidden: the generator network ('gml' or the 'mlp' ablation).
    b1, b2, eps: the Adam-style feature preprocessing.

  Returns:
    An `Adapter`; `step` needs `meta` (see the module docstring).

  References:
    Deng et al., Learning to Generate Gradients for Test-Time Adaptation
    via Test-Time Training Layers, AAAI 2025 (arXiv 2412.16901).
  """
  features = tuple(features)
  module = gm.build(generator, hidden=hidden)
  expected_phi = jax.eval_shape(
    lambda: module.init(
      jax.random.key(0), jnp.zeros((1, 2)), module.empty_memory(1)
    )['params']
  )
  kwargs = dict(generator=generator, hidden=hidden, b1=b1, b2=b2, eps=eps)

  def init_fn(variables, rng):
    tx = mgg_optimizer(None, learning_rate, **kwargs)  # phi: at step time
    return grad_step.init_state(
      variables, rng, adapt=adapt, optimizer=tx, who='mgg'
    )

  def step_fn(state, batch, *, meta=None, first_order=False, **extra_args):
    del extra_args
    if meta is None:
      check_meta(meta, expected_phi, 0)
    parts = grad_step.split(state, adapt)
    mask = batch.get('mask')

    def loss_fn(params):
      out = grad_step.batch_forward(apply_fn, params, state, batch)
      feats = feature_vector(out.features, features)
      check_meta(meta, expected_phi, feats.shape[-1])
      entropy = losses.masked_mean(losses.softmax_entropy(out.logits), mask)
      disc = losses.foa_discrepancy(
        feats, meta['source_mean'], meta['source_std'], mask, divisor=divisor
      )
      return entropy + fitness_lambda * disc, (out.logits, entropy, disc)

    (loss, (logits, entropy, disc)), grads = grad_step.value_and_grad(
      loss_fn, parts, has_aux=True, first_order=first_order
    )(parts.trainable)
    tx = mgg_optimizer(meta['phi'], learning_rate, **kwargs)
    trainable, opt_state = grad_step.update(
      tx, grads, parts.opt_state, parts.trainable
    )
    new_state = grad_step.commit(state, parts, trainable, opt_state)
    metrics = {
      'loss': loss,
      'entropy': entropy,
      'discrepancy': disc,
      'skipped': (~opt_state.last_finite).astype(jnp.float32),
      'n_skipped': opt_state.total_notfinite.astype(jnp.float32),
    }
    return new_state, base.StepOutput(logits, metrics)

  return base.adapter(init_fn, step_fn, adapt)
