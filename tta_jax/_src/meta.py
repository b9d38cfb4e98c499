"""Meta-learning through adaptation: `unroll` and the nested-grad train step.

An episode is a stacked batch dict `{'image': [T, B, ...], 'label': [T, B],
'mask'?: [T, B]}` from one shifted domain. `meta_loss` runs `adapter.init`,
scans `adapter.step` over the episode and scores each step's logits against
the labels, which only this module ever sees. `make_meta_train_step` takes
`jax.grad` of that loss with respect to the method's meta-parameters; the
inner gradients a method takes inside `step` (Tent's update, a generator's
layer-wise gradients) sit inside the outer one, so second-order terms flow
unless `first_order=True` is passed down to the methods.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax._src import base, losses

Episode = Mapping[str, jax.Array]


def unroll(
  adapter: base.Adapter,
  state: base.AdaptState,
  episode: Episode,
  *,
  meta: Any = None,
  remat: bool = False,
  **extra_args: Any,
) -> tuple[base.AdaptState, base.StepOutput]:
  """Runs `adapter.step` over the leading axis of `episode` with `lax.scan`.

  Labels are dropped before the steps see the batches.

  Returns:
    The final state and the stacked `StepOutput` (logits `[T, B, K]`).
  """
  inputs = {k: v for k, v in episode.items() if k != 'label'}

  def body(state, batch):
    return adapter.step(state, batch, meta=meta, **extra_args)

  if remat:
    body = jax.checkpoint(body)
  return jax.lax.scan(body, state, inputs)


def meta_loss(
  meta: Any,
  adapter: base.Adapter,
  variables: Mapping[str, Any],
  episode: Episode,
  rng: jax.Array,
  *,
  first_order: bool = False,
  remat: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Supervised cross-entropy of the logits the adapter scores on `episode`."""
  state = adapter.init(variables, rng)
  _, out = unroll(
    adapter, state, episode, meta=meta, remat=remat, first_order=first_order
  )
  labels = episode['label']
  mask = episode.get('mask')
  xent = losses.cross_entropy(out.logits, labels)
  loss = losses.masked_mean(xent, mask)
  correct = (jnp.argmax(out.logits, -1) == labels).astype(jnp.float32)
  return loss, {'loss': loss, 'accuracy': losses.masked_mean(correct, mask)}


class MetaTrainState(NamedTuple):
  meta: Any  # the meta-parameters (generator weights, log learning rates)
  opt_state: optax.OptState  # of meta_tx over `meta`
  rng: jax.Array  # base key; per-step key = fold_in(rng, step)
  step: jax.Array  # int32 scalar


def init_meta_train_state(
  meta: Any, meta_tx: optax.GradientTransformation, rng: jax.Array
) -> MetaTrainState:
  return MetaTrainState(meta, meta_tx.init(meta), rng, jnp.zeros([], jnp.int32))


def make_meta_train_step(
  adapter: base.Adapter,
  meta_tx: optax.GradientTransformation,
  *,
  first_order: bool = False,
  remat: bool = True,
  loss_fn: Callable = meta_loss,
) -> Callable:
  """Returns a jitted `(MetaTrainState, variables, episode) -> (state, m)`.

  Args:
    adapter: the method whose `step` takes `meta`.
    meta_tx: the optimizer of the meta-parameters.
    first_order: stop the methods' inner gradients (FOMAML).
    remat: recompute each step's activations in the backward pass
      (`jax.checkpoint` around the scanned body): memory O(1) in T.
    loss_fn: `(meta, adapter, variables, episode, rng, *, first_order,
      remat) -> (loss, metrics)`; `meta_loss` by default.

  The source `variables` are an argument, not a closure constant, so they
  are not baked into the compiled program.
  """

  def train_step(state: MetaTrainState, variables, episode):
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(
      state.meta,
      adapter,
      variables,
      episode,
      rng,
      first_order=first_order,
      remat=remat,
    )
    updates, opt_state = meta_tx.update(grads, state.opt_state, state.meta)
    new_meta = optax.apply_updates(state.meta, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return state._replace(
      meta=new_meta, opt_state=opt_state, step=state.step + 1
    ), metrics

  return jax.jit(train_step)
