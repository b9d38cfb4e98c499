"""T3A: test-time template adjustment of the linear classifier.

T3A replaces the classifier's weight vectors by class prototypes built from
the test stream. Each class keeps a set of supports, initialised with the
classifier's own weight vector; every test feature joins the supports of the
class the source classifier predicts for it, ranked by the entropy of that
prediction; each class keeps its `filter_k` most confident supports, and the
new classifier is the normalised mean of the normalised supports.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tta_jax._src import base, losses, params as params_lib


class T3AState(NamedTuple):
  supports: jax.Array  # [K, C, D] L2-normalised support features per class
  entropy: jax.Array  # [K, C] entropy of each support's prediction (0: empty)
  valid: jax.Array  # [K, C] bool, False on empty slots


def t3a(
  apply_fn,
  *,
  filter_k: int = 100,
  max_supports: int = 1000,
  head: str = 'head',
  features: str = 'pre_logits',
) -> base.Adapter:
  """T3A (Iwasawa & Matsuo, NeurIPS 2021): prototype classifier adjustment.

  As in the official DomainBed code (`adapt_algorithms.T3A`): the model runs
  in source mode (BN with the source statistics); the supports start as the
  rows of the classifier's weight matrix, labelled with the classifier's
  prediction on them (their argmax, almost always their own class) and ranked
  by its entropy; each test batch first joins the supports (label: source
  argmax, rank: source softmax entropy), the supports are filtered, and only
  then is the batch predicted, with `logits = z @ W_T3A` (unnormalised feature
  z, no bias). Padding rows never join the supports.

  Static shapes: each class has a fixed number C of support slots,
  C = `filter_k`, or `max_supports` when `filter_k = -1` (the paper's "no
  filtering"). With -1 a class that fills its C slots keeps its C lowest-
  entropy supports; the official code instead slices `[:-1]` there, which
  drops each class's highest-entropy support at every step.

  Args:
    apply_fn: the model's `ApplyFn`.
    filter_k: supports kept per class (the paper selects it from
      {1, 5, 20, 50, 100, -1} on validation data; 100 here).
    max_supports: support slots per class when `filter_k = -1`; the support
      bank takes K * C * D floats.
    head: top-level module holding the linear classifier (`kernel` [D, K],
      `bias` [K]).
    features: key of `ModelOutput.features` feeding the classifier.

  On a class-subset benchmark (ImageNet-R/-A: `models.restrict_classes`)
  the classifier's columns are those of the subset, so the supports and
  the prototype classifier have the benchmark's classes only.

  Returns:
    An `Adapter` whose `extra` is a `T3AState`; parameters never change.

  References:
    Iwasawa & Matsuo, Test-Time Classifier Adjustment Module for Model-
    Agnostic Domain Generalization, NeurIPS 2021 (code: matsuolab/T3A).
  """
  if filter_k == -1:
    capacity = max_supports
  elif filter_k >= 1:
    capacity = filter_k
  else:
    raise ValueError(f't3a: filter_k must be -1 or >= 1, got {filter_k}')
  if capacity < 1:
    raise ValueError(f't3a: max_supports must be >= 1, got {max_supports}')

  def init_fn(variables, rng):
    params = variables['params']
    if head not in params or 'kernel' not in params[head]:
      raise ValueError(
        f't3a: no linear classifier {head!r} with a kernel in the params '
        f'(top-level modules: {sorted(params)}).'
      )
    kernel = params[head]['kernel']  # [D, K]
    bias = params[head].get('bias', jnp.zeros(kernel.shape[1], kernel.dtype))
    subset = getattr(apply_fn, 'class_subset', None)
    if subset is not None:  # the benchmark's classes only
      kernel, bias = kernel[:, subset], bias[subset]
    num_classes, dim = kernel.shape[1], kernel.shape[0]
    warmup = kernel.T  # [K, D]: the classifier's weight vectors
    warmup_logits = warmup @ kernel + bias
    empty = T3AState(
      supports=jnp.zeros((num_classes, capacity, dim), kernel.dtype),
      entropy=jnp.zeros((num_classes, capacity), kernel.dtype),
      valid=jnp.zeros((num_classes, capacity), bool),
    )
    extra = add_supports(
      empty,
      warmup,
      jnp.argmax(warmup_logits, axis=-1),
      losses.softmax_entropy(warmup_logits),
      jnp.ones((num_classes,), bool),
    )
    return base.init_state(variables, rng, extra=extra)

  def step_fn(state, batch, *, meta=None, **extra_args):
    del meta, extra_args
    out = apply_fn(state.params, state.batch_stats, batch['image'])
    num_classes = state.extra.supports.shape[0]
    if out.logits.shape[-1] != num_classes:
      raise ValueError(
        f't3a: the model gives {out.logits.shape[-1]} logits but its '
        f'classifier {head!r} has {num_classes} classes (restrict classes '
        'with models.restrict_classes, which T3A follows)'
      )
    z = out.features[features]  # [B, D]
    extra = add_supports(
      state.extra,
      z,
      jnp.argmax(out.logits, axis=-1),
      losses.softmax_entropy(out.logits),
      losses.batch_mask(batch),
    )
    logits = z @ classifier_weights(extra).T
    metrics = {'n_supports': jnp.sum(extra.valid).astype(jnp.float32)}
    return state._replace(step=state.step + 1, extra=extra), base.StepOutput(
      logits, metrics
    )

  return base.adapter(init_fn, step_fn, params_lib.no_params)


def _normalize(x, axis=-1):
  # torch.nn.functional.normalize: x / max(||x||, 1e-12).
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def classifier_weights(state: T3AState) -> jax.Array:
  """The T3A classifier `[K, D]`: normalised sums of normalised supports.

  A class without supports gets a zero row (logit 0), as in the official code.
  """
  sums = jnp.sum(jnp.where(state.valid[..., None], state.supports, 0.0), 1)
  return _normalize(sums)


def add_supports(
  state: T3AState,
  feats: jax.Array,
  labels: jax.Array,
  entropy: jax.Array,
  mask: jax.Array,
) -> T3AState:
  """Adds candidates, then keeps each class's C lowest-entropy supports.

  Args:
    state: the current supports.
    feats: `[B, D]` candidate features (normalised here).
    labels: `[B]` int class of each candidate.
    entropy: `[B]` rank of each candidate (lower is kept first).
    mask: `[B]` bool; False rows are never added.

  Returns:
    The filtered `T3AState` (ties keep the older support, then the earlier
    row).
  """
  num_classes, capacity = state.entropy.shape
  size = feats.shape[0]
  old = jnp.where(state.valid, state.entropy, jnp.inf)  # [K, C]
  mine = (labels[None, :] == jnp.arange(num_classes)[:, None]) & mask[None]
  new = jnp.where(mine, entropy[None, :], jnp.inf)  # [K, B]
  neg, idx = jax.lax.top_k(-jnp.concatenate([old, new], axis=1), capacity)
  kept = jnp.isfinite(neg)  # [K, C]
  from_old = idx < capacity
  old_feats = jnp.take_along_axis(
    state.supports, jnp.minimum(idx, capacity - 1)[..., None], axis=1
  )
  new_feats = _normalize(feats)[jnp.clip(idx - capacity, 0, size - 1)]
  supports = jnp.where(from_old[..., None], old_feats, new_feats)
  return T3AState(
    supports=jnp.where(kept[..., None], supports, 0.0),
    entropy=jnp.where(kept, -neg, 0.0),
    valid=kept,
  )
