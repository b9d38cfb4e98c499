"""Checks of user input that `jit` cannot do for us.

Shapes and dtypes are checked at trace time by `models.make_apply_fn`.
Values are not visible under `jit`: `check_batch` validates a host batch
before it is transferred (the runners call it on every batch), and `checked`
wraps an adapter so that a non-finite batch or non-finite logits raise.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from tta_jax._src import base


def check_batch(
  batch: Mapping[str, np.ndarray], index: int, *, allow_nonfinite=False
) -> None:
  """Raises ValueError if host batch `index` is malformed.

  Non-finite pixels raise too unless `allow_nonfinite` (the default input
  policy of every method masks such rows out instead, see
  `base.guard_step`).
  """
  if 'image' not in batch:
    raise ValueError(f'batch {index} has no "image" entry: {sorted(batch)}')
  image = np.asarray(batch['image'])
  if image.ndim != 4:
    raise ValueError(
      f'batch {index}: images must be [B, H, W, C], got {image.shape}'
    )
  if image.shape[0] == 0:
    raise ValueError(f'batch {index} is empty')
  if not np.issubdtype(image.dtype, np.floating):
    raise TypeError(
      f'batch {index}: images must be floating point, got {image.dtype}'
    )
  if allow_nonfinite:
    return
  finite = np.isfinite(image).reshape(image.shape[0], -1).all(axis=1)
  if not finite.all():
    rows = np.flatnonzero(~finite)[:5].tolist()
    raise ValueError(
      f'batch {index} contains NaN or Inf pixels (rows {rows}); '
      "non-finite images are rejected (config.nonfinite='raise'); "
      "'skip' masks such rows out and scores them as errors"
    )


def checked(adapter: base.Adapter) -> base.Adapter:
  """An adapter whose `step` raises on non-finite images or logits.

  The returned `step` is already compiled (`jit` of a `checkify`-ed step):
  call it directly. It raises `JaxRuntimeError` naming what was non-finite,
  instead of letting NaNs flow into the adapted state.
  """

  def body(state, batch, meta):
    checkify.check(
      jnp.all(jnp.isfinite(batch['image'])), 'input images contain NaN or Inf'
    )
    new_state, out = adapter.step(state, batch, meta=meta)
    checkify.check(
      jnp.all(jnp.isfinite(out.logits)), 'the step produced non-finite logits'
    )
    return new_state, out

  compiled = jax.jit(checkify.checkify(body, errors=checkify.user_checks))

  def step_fn(state, batch, *, meta=None, **extra_args):
    del extra_args
    err, result = compiled(state, batch, meta)
    err.throw()
    return result

  return base.Adapter(adapter.init, step_fn)


def tree_all_finite(tree) -> bool:
  """Host-side: True if every leaf of `tree` is finite."""
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))
