"""Core types: an adaptation method is a pair of pure functions.

`Adapter(init, step)` mirrors optax's `GradientTransformation(init, update)`:
`init` builds a pure-data `AdaptState` from the source variables, `step`
consumes one unlabeled test batch and returns the next state together with the
logits that are scored for that batch. Functions live in the factory's
closure, never in the state, so the state can be jitted, donated, scanned,
vmapped and checkpointed as it is.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

Params = Any  # A nested dict of arrays (a flax 'params' collection).
Variables = Mapping[str, Params]  # {'params': ..., 'batch_stats': ...}
Batch = Mapping[str, jax.Array]  # {'image': [B, H, W, C], 'mask'?: [B]}


class AdaptState(NamedTuple):
  """Everything that changes while adapting on one test stream."""

  params: Params  # the full 'params' collection; only masked leaves change
  batch_stats: Params  # BN statistics ({} for BN-free models)
  opt_state: optax.OptState  # over the adapted subset only
  rng: jax.Array  # base key, never split; per-step key = fold_in(rng, step)
  step: jax.Array  # int32 scalar: number of step() calls so far
  extra: Any = ()  # method-specific pure-data state (a NamedTuple)


class StepOutput(NamedTuple):
  """What one adaptation step returns besides the next state."""

  logits: jax.Array  # [B, K] the predictions that are scored for this batch
  metrics: Mapping[str, jax.Array]  # scalar diagnostics (loss, n_selected, ...)


class AdaptInitFn(Protocol):
  def __call__(self, variables: Variables, rng: jax.Array) -> AdaptState: ...


class AdaptStepFn(Protocol):
  def __call__(
    self,
    state: AdaptState,
    batch: Batch,
    *,
    meta: Params | None = None,
    **extra_args: Any,
  ) -> tuple[AdaptState, StepOutput]: ...


class Adapter(NamedTuple):
  """A pair of pure functions adapting a model to an unlabeled test stream.

  Attributes:
    init: `init(variables, rng) -> AdaptState`.
    step: `step(state, batch, *, meta=None, **extra_args) -> (state, out)`.
      `batch` holds `'image'` and optionally `'mask'` (False on padding rows);
      `step` never reads labels. `meta` carries meta-learned method parameters
      (generator weights, log learning rates). Extra keyword arguments that a
      method does not know are ignored (`first_order=True` is one: methods
      with an inner gradient stop it for first-order meta-learning).
    adapted: the mask function (`tta_jax.params`) of the parameters `step`
      may change: every other leaf of `state.params` stays bit-identical (the
      contract test checks it). Runners use it to share frozen parameters
      across vmapped streams. None means undeclared (anything may change).
  """

  init: AdaptInitFn
  step: AdaptStepFn
  adapted: Callable[[Params, Params], Params] | None = None


def init_state(
  variables: Variables,
  rng: jax.Array,
  *,
  opt_state: optax.OptState | None = None,
  extra: Any = (),
) -> AdaptState:
  """The state every method starts from: the source variables, step 0.

  `opt_state` defaults to `optax.EmptyState()` (methods without an
  optimizer); `extra` is the method's own state.
  """
  return AdaptState(
    params=variables['params'],
    batch_stats=variables['batch_stats'],
    opt_state=optax.EmptyState() if opt_state is None else opt_state,
    rng=rng,
    step=jnp.zeros([], jnp.int32),
    extra=extra,
  )


# ----------------------------------------------------------------------------
# The input policy every method gets (`adapter`).


def finite_rows(images: jax.Array) -> jax.Array:
  """`[B]` bool: the rows of `images` whose every value is finite."""
  return jnp.all(jnp.isfinite(images.reshape(images.shape[0], -1)), axis=1)


def tree_finite(tree: Any) -> jax.Array:
  """Bool scalar: every floating-point leaf of `tree` is finite."""
  leaves = [
    jnp.all(jnp.isfinite(x))
    for x in jax.tree.leaves(tree)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guard_step(step_fn: AdaptStepFn) -> AdaptStepFn:
  """`step_fn` under the non-finite input policy.

  Rows of `batch['image']` holding a NaN or Inf are zeroed and masked out
  (`mask` False), so they reach no statistic, loss or update; if the next
  state would still hold a non-finite value, the update is skipped (the
  state is kept, only its step count advances). Both are counted in the
  step's metrics: `invalid_rows` and `skipped_update` (0 or 1). With finite
  inputs the step computes exactly what `step_fn` does.
  """

  def step(state, batch, **kwargs):
    if 'image' not in batch:
      raise KeyError(f"the batch has no 'image' entry; it has {sorted(batch)}")
    images = batch['image']
    finite = finite_rows(images)
    if 'mask' in batch:
      mask = batch['mask'].astype(bool)
    else:
      mask = jnp.ones(finite.shape, bool)
    inputs = dict(batch)
    inputs['image'] = jnp.where(
      finite.reshape((-1,) + (1,) * (images.ndim - 1)), images, 0
    ).astype(images.dtype)
    inputs['mask'] = mask & finite
    new_state, out = step_fn(state, inputs, **kwargs)
    # Leaves the step passed through untouched (frozen parameters) are the
    # same objects: they need neither the check nor the select.
    changed = jax.tree.map(lambda n, o: n is not o, new_state, state)
    ok = tree_finite(
      [
        n
        for n, c in zip(
          jax.tree.leaves(new_state), jax.tree.leaves(changed), strict=True
        )
        if c
      ]
    )
    kept = jax.tree.map(
      lambda n, o: n if n is o else jnp.where(ok, n, o), new_state, state
    )
    metrics = dict(out.metrics)
    metrics['invalid_rows'] = jnp.sum(mask & ~finite).astype(jnp.float32)
    metrics['skipped_update'] = (~ok).astype(jnp.float32)
    return kept._replace(step=new_state.step), out._replace(metrics=metrics)

  return step


def adapter(
  init_fn: AdaptInitFn,
  step_fn: AdaptStepFn,
  adapted: Callable[[Params, Params], Params] | None = None,
) -> Adapter:
  """The `Adapter` every method factory returns.

  `init` returns a state that owns its buffers (copies of the variables,
  no two leaves sharing one), so `jax.jit(step, donate_argnums=0)` never
  deletes the caller's arrays; `step` follows the non-finite input policy
  (`guard_step`).
  """

  def init(variables, rng):
    return jax.tree.map(jnp.copy, init_fn(variables, rng))

  return Adapter(init, guard_step(step_fn), adapted)
