"""The gradient-step core shared by the gradient-based methods.

Every gradient method does the same five things around its own loss: split
the adapted leaves off `state.params` (its mask), write meta-learned
hyperparameters into the optimizer state, take `value_and_grad` with
respect to the adapted leaves only, let the optimizer update them, and
merge them back. `split` / `value_and_grad` / `update` / `commit` are those
pieces; `masked_grad_step` chains them for the common one-gradient case, so
a method file states only its loss and what it does besides.
"""

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tta_jax._src import base, params as params_lib


def inner_value_and_grad(
  fun: Callable, *, has_aux: bool = False, first_order: bool = False
) -> Callable:
  """`jax.value_and_grad` whose gradient is a constant when `first_order`.

  Methods use this for the gradient they take inside `step`, so a
  meta-learner can choose first-order (FOMAML-style) meta-gradients.
  """
  vg = jax.value_and_grad(fun, has_aux=has_aux)

  def wrapped(*args, **kwargs):
    value, grads = vg(*args, **kwargs)
    if first_order:
      grads = jax.lax.stop_gradient(grads)
    return value, grads

  return wrapped


def inject_meta_hyperparams(
  opt_state: optax.OptState, meta: Mapping[str, jax.Array] | None
) -> optax.OptState:
  """Writes `meta['log_<name>']` as `exp(.)` into injected hyperparameters.

  The optax meta-learning pattern: build the method's optimizer with
  `optax.inject_hyperparams(optax.adam)(learning_rate=...)` and meta-learn
  `meta = {'log_learning_rate': ...}`. Other `meta` entries are ignored.
  """
  if not meta:
    return opt_state
  names = {k[4:]: v for k, v in meta.items() if k.startswith('log_')}
  if not names:
    return opt_state
  if not hasattr(opt_state, 'hyperparams'):
    raise ValueError(
      f'meta {sorted(meta)} sets optimizer hyperparameters, which needs an '
      'optimizer built with optax.inject_hyperparams(...)'
    )
  hyper = dict(opt_state.hyperparams)
  for name, log_value in names.items():
    if name not in hyper:
      raise ValueError(
        f'meta sets {name!r}; injected hyperparameters: {sorted(hyper)}'
      )
    hyper[name] = jnp.exp(log_value).astype(jnp.asarray(hyper[name]).dtype)
  return opt_state._replace(hyperparams=hyper)


def init_state(
  variables: base.Variables,
  rng: jax.Array,
  *,
  adapt: params_lib.MaskFn,
  optimizer: optax.GradientTransformation,
  who: str,
  extra: Any = (),
) -> base.AdaptState:
  """The initial state of a gradient method: optimizer state over `adapt`.

  Fails (naming `who`) when the mask selects no parameter.
  """
  trainable, _ = params_lib.split_by(
    adapt, variables['params'], variables['batch_stats'], who=who
  )
  return base.init_state(
    variables, rng, opt_state=optimizer.init(trainable), extra=extra
  )


class Split(NamedTuple):
  """The adapted leaves of a state, the rest, and the optimizer state."""

  trainable: Any  # the adapted leaves (the optimizer's subset)
  frozen: Any  # every other leaf of `state.params`
  opt_state: optax.OptState  # meta hyperparameters already injected

  def merge(self, trainable: Any) -> Any:
    """The full parameter tree with `trainable` as the adapted leaves."""
    return params_lib.merge(trainable, self.frozen)


def split(
  state: base.AdaptState, adapt: params_lib.MaskFn, meta: Any = None
) -> Split:
  trainable, frozen = params_lib.split(
    state.params, adapt(state.params, state.batch_stats)
  )
  return Split(
    trainable, frozen, inject_meta_hyperparams(state.opt_state, meta)
  )


def value_and_grad(
  loss_fn: Callable,
  parts: Split,
  *,
  has_aux: bool = False,
  first_order: bool = False,
) -> Callable:
  """`fn(trainable, *args) -> (value, grads)` of `loss_fn(params, *args)`.

  `loss_fn` takes the full parameter tree; the gradient is with respect
  to the adapted leaves only (frozen leaves get none).
  """

  def on_trainable(trainable, *args):
    return loss_fn(parts.merge(trainable), *args)

  return inner_value_and_grad(
    on_trainable, has_aux=has_aux, first_order=first_order
  )


def update(
  optimizer: optax.GradientTransformation,
  grads: Any,
  opt_state: optax.OptState,
  trainable: Any,
) -> tuple[Any, optax.OptState]:
  """One optimizer step: `(new trainable, new optimizer state)`.

  Named `optimizer` in the compiled program's metadata, so that profiles
  can tell its cost apart (benchmarks/step_profile.py).
  """
  with jax.named_scope('optimizer'):
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


def batch_forward(apply_fn: Callable, params: Any, state, batch):
  """The model on `batch` with test-batch BN statistics, padding masked."""
  return apply_fn(
    params,
    state.batch_stats,
    batch['image'],
    use_batch_stats=True,
    mask=batch.get('mask'),
  )


class GradStep(NamedTuple):
  """What `masked_grad_step` computed."""

  value: Any  # loss_fn's value: the loss, or (loss, aux) with has_aux
  grads: Any  # over the adapted leaves
  trainable: Any  # the adapted leaves after the optimizer step
  opt_state: optax.OptState  # the optimizer state after it


def masked_grad_step(
  loss_fn: Callable,
  parts: Split,
  optimizer: optax.GradientTransformation,
  *,
  has_aux: bool = False,
  first_order: bool = False,
) -> GradStep:
  """`value_and_grad` of `loss_fn(params)` at `parts`, then `update`."""
  value, grads = value_and_grad(
    loss_fn, parts, has_aux=has_aux, first_order=first_order
  )(parts.trainable)
  trainable, opt_state = update(
    optimizer, grads, parts.opt_state, parts.trainable
  )
  return GradStep(value, grads, trainable, opt_state)


def commit(
  state: base.AdaptState,
  parts: Split,
  trainable: Any,
  opt_state: optax.OptState,
  *,
  keep: jax.Array | None = None,
  **fields: Any,
) -> base.AdaptState:
  """The next state: `trainable` merged back, the step counted.

  With `keep` (a bool scalar) the update is taken only where it is True
  (the leaves and the optimizer state stay as they were otherwise).
  `fields` replace other state fields (`extra=...`).
  """
  if keep is not None:
    take = lambda new, old: jnp.where(keep, new, old)
    trainable = jax.tree.map(take, trainable, parts.trainable)
    opt_state = jax.tree.map(take, opt_state, parts.opt_state)
  return state._replace(
    params=parts.merge(trainable),
    opt_state=opt_state,
    step=state.step + 1,
    **fields,
  )


def sharpness_aware_value_and_grad(
  loss_fn: Callable, *, rho: float, weight: float = 1.0
) -> Callable:
  """`fn(params) -> (loss, g)`: the first-order SAM gradient of `loss_fn`.

  With `g0 = grad loss(p)` and `eps = rho * g0 / (||g0|| + 1e-12)` (the
  norm global over every leaf, `eps` a constant: no second-order term),
  `g = (1 - weight) * g0 + weight * grad loss(p + eps)`: the gradient of
  `loss(p) + weight * [loss(p + eps) - loss(p)]`, the loss plus `weight`
  times its sharpness in the `rho`-ball. `weight = 1` is SAM (Foret et
  al., ICLR 2021); `rho = 0` gives the plain gradient. `loss` is the
  unperturbed loss. Two forward and backward passes.
  """
  vg = jax.value_and_grad(loss_fn)

  def fn(params):
    loss, g0 = vg(params)
    scale = rho / (optax.tree.norm(g0) + 1e-12)
    eps = jax.tree.map(lambda g: jax.lax.stop_gradient(g * scale), g0)
    _, g1 = vg(jax.tree.map(jnp.add, params, eps))
    if weight == 1.0:
      return loss, g1
    return loss, jax.tree.map(
      lambda a, b: (1.0 - weight) * a + weight * b, g0, g1
    )

  return fn
