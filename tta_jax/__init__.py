"""tta_jax: test-time adaptation in JAX.

Every method is a factory returning an `Adapter(init, step)` pair of pure
functions over a pure-data `AdaptState`; see `tta_jax.methods`.
"""

from tta_jax import methods, models
from tta_jax._src import losses, meta, params
from tta_jax._src.base import Adapter, AdaptState, StepOutput
from tta_jax._src.meta import (
  MetaTrainState,
  init_meta_train_state,
  make_meta_train_step,
  meta_loss,
  unroll,
)
from tta_jax._src.validation import check_batch, checked

__all__ = [
  'Adapter',
  'AdaptState',
  'StepOutput',
  'MetaTrainState',
  'check_batch',
  'checked',
  'init_meta_train_state',
  'losses',
  'make_meta_train_step',
  'meta',
  'meta_loss',
  'methods',
  'models',
  'params',
  'unroll',
]
__version__ = '0.1.0'
