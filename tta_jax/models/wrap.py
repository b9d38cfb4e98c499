"""Bring your own model: a stock flax Linen module as the library's `ApplyFn`.

Methods call `apply_fn(params, batch_stats, images, *, use_batch_stats,
bn_mode, mask)` and read `ModelOutput(logits, features, batch_stats)`. The
library's own models take `bn_mode` and `mask` directly; a stock module
(the flax examples' `nn.BatchNorm(use_running_average=not train)`, a
`train` argument, logits out) cannot. `wrap` closes the gap without
touching the module's code or its variables:

- the module is always called in evaluation mode (`train=False`: dropout
  off), and every `nn.BatchNorm` call is intercepted
  (`flax.linen.intercept_methods`) and computed by the library's
  `BatchNorm` with the layer's own `scale`, `bias` and running `mean` /
  `var`: source statistics, the test batch's, or any `BNMode` mix, with
  `mask` keeping padding rows out of the statistics. Stock train-mode BN
  could do none of that: it has no mixing with the source statistics, it
  returns momentum-updated running averages rather than the statistics
  it normalised with, and it needs a bound `axis_name` when the module
  sets one (as the flax ImageNet example does);
- `features['pre_logits']` is the input of the last `nn.Dense` whose output
  has the logits' shape (found by interception, no `sow` needed); values
  the module sows into the `intermediates` collection are features under
  their '/'-joined path; `features=` adds module outputs by path;
- `num_classes` is read from the logits' shape, `head` is the classifier's
  module path, and `norm_affine` selects the scale and bias of every norm
  layer (BatchNorm, LayerNorm, GroupNorm, RMSNorm, InstanceNorm): Tent,
  EATA and SAR adapt BN affines by default (`params.bn_affine`); for a
  LayerNorm model pass `adapt=model.norm_affine`.
"""

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from tta_jax import models as models_lib
from tta_jax.models.vision import layers

__all__ = ['WrappedModel', 'wrap']

# The value of `train_kwarg` that means evaluation mode: True for these,
# False for `train`-like names.
_EVAL_TRUE = ('use_running_average', 'deterministic')
_NORMS = tuple(
  getattr(nn, n)
  for n in ('BatchNorm', 'LayerNorm', 'GroupNorm', 'RMSNorm', 'InstanceNorm')
  if hasattr(nn, n)
)


def _pool(x: jax.Array) -> jax.Array:
  """`[B, ..., D]` -> `[B, D]` by averaging the middle (spatial) axes."""
  return x if x.ndim <= 2 else jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


def _split_output(out) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits, or the library's `(logits, features)` pair."""
  if isinstance(out, tuple | list) and len(out) == 2:
    logits, feats = out
    if isinstance(feats, Mapping):
      return logits, dict(feats)
  if not hasattr(out, 'ndim') or out.ndim != 2:
    raise ValueError(
      'wrap: the module must return logits [B, K] (or (logits, features)); '
      f'got {jax.tree.map(lambda a: getattr(a, "shape", a), out)}'
    )
  return out, {}


def _sown(intermediates) -> dict[str, jax.Array]:
  """`self.sow('intermediates', name, x)` values, by '/'-joined path."""
  flat = traverse_util.flatten_dict(dict(intermediates or {}))
  return {'/'.join(k): v[-1] for k, v in flat.items()}


def _batch_norm(module: nn.BatchNorm, x, mode, mask):
  """A stock `nn.BatchNorm` call computed by the library's `BatchNorm`."""
  path = '/'.join(module.path)
  if not isinstance(module.axis, int):
    raise NotImplementedError(
      f'wrap: BatchNorm {path} normalises over axes {module.axis}; only one '
      'feature axis is supported'
    )
  if mask is not None and mode is not None and x.shape[0] != mask.shape[0]:
    raise ValueError(
      f'wrap: BatchNorm {path} sees a leading axis of {x.shape[0]} but the '
      f'mask has {mask.shape[0]} rows; its input must be batch-major'
    )
  axis = module.axis % x.ndim
  c = x.shape[axis]
  dtype = module.param_dtype
  params = {
    'scale': (
      module.get_variable('params', 'scale')
      if module.use_scale
      else jnp.ones((c,), dtype)
    ),
    'bias': (
      module.get_variable('params', 'bias')
      if module.use_bias
      else jnp.zeros((c,), dtype)
    ),
  }
  stats = {
    'mean': module.get_variable('batch_stats', 'mean'),
    'var': module.get_variable('batch_stats', 'var'),
  }
  bn = layers.BatchNorm(epsilon=module.epsilon, param_dtype=dtype)
  variables = {'params': params, 'batch_stats': stats}
  x = jnp.moveaxis(x, axis, -1)
  if mode is None:
    y = bn.apply(variables, x)
  else:
    y, new = bn.apply(variables, x, mode, mask, mutable=['batch_stats'])
    if module.is_mutable_collection('batch_stats'):
      for name, value in new['batch_stats'].items():
        module.put_variable('batch_stats', name, value)
  y = jnp.moveaxis(y, -1, axis)
  return y if module.dtype is None else y.astype(module.dtype)


class _Tracer:
  """One forward's interceptor: BN statistics, features, norm paths."""

  def __init__(self, mode, mask, feature_paths: Mapping[str, str]):
    self.mode, self.mask = mode, mask
    self.by_path = {v: k for k, v in feature_paths.items()}
    self.dense: list[tuple[str, jax.Array, jax.Array]] = []
    self.features: dict[str, jax.Array] = {}
    self.norms: set[tuple[str, ...]] = set()

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(module, _NORMS):
      self.norms.add(tuple(module.path))
    if isinstance(module, nn.BatchNorm) and not module.is_initializing():
      out = _batch_norm(module, args[0], self.mode, self.mask)
    else:
      out = next_fun(*args, **kwargs)
    path = '/'.join(module.path)
    if isinstance(module, nn.Dense):
      self.dense.append((path, args[0], out))
    if path in self.by_path and hasattr(out, 'ndim'):
      self.features[self.by_path[path]] = _pool(out)
    return out

  def head(self, logits) -> tuple[str | None, jax.Array | None]:
    """The classifier: the last Dense whose output has the logits' shape."""
    for path, x, out in reversed(self.dense):
      if out.shape == logits.shape:
        return path, _pool(x) if x.ndim > 2 else x
    return None, None


class WrappedModel:
  """A stock Linen module as an `ApplyFn`; build it with `wrap`.

  Attributes:
    module: the wrapped module.
    input_shape: `(H, W, C)`.
    num_classes: K, from the logits' shape.
    head: '/'-joined path of the classifier (`nn.Dense`), or None.
    feature_names: the keys of `ModelOutput.features`.
    norm_paths: '/'-joined paths of the normalisation layers.
  """

  def __init__(
    self,
    module: nn.Module,
    input_shape: Sequence[int],
    call_kwargs: Mapping[str, Any],
    features: Mapping[str, str],
  ):
    self.module = module
    self.input_shape = tuple(input_shape)
    self._call_kwargs = dict(call_kwargs)
    self._feature_paths = dict(features)
    self._norms: frozenset[tuple[str, ...]] = frozenset()
    traced = []

    def forward(variables, images):
      out, tracer = self._forward(
        variables['params'], variables['batch_stats'], images, None, None
      )
      traced.append((tracer, out.logits))
      return out

    abstract = jax.eval_shape(self.init, jax.random.key(0))
    out = jax.eval_shape(
      forward,
      abstract,
      jax.ShapeDtypeStruct((2, *self.input_shape), jnp.float32),
    )
    tracer, logits = traced[0]
    self._norms = frozenset(tracer.norms)
    self.num_classes = int(out.logits.shape[-1])
    self.head = tracer.head(logits)[0]
    self.feature_names = tuple(sorted(out.features))
    self.norm_paths = tuple(sorted('/'.join(p) for p in self._norms))
    missing = sorted(set(self._feature_paths) - set(out.features))
    if missing:
      raise ValueError(
        f'wrap: no module at the paths of features {missing}; paths are '
        "'/'-joined module names, e.g. 'ResNetBlock_3' or 'stage/conv'"
      )

  def init(self, rng: jax.Array) -> dict[str, Any]:
    """Fresh `{'params', 'batch_stats'}` for images of `input_shape`."""
    dummy = jnp.zeros((1, *self.input_shape), jnp.float32)
    variables = self.module.init(rng, dummy, **self._call_kwargs)
    return {
      'params': variables['params'],
      'batch_stats': variables.get('batch_stats', {}),
    }

  def norm_affine(self, params, batch_stats):
    """Mask function: `scale` and `bias` of every normalisation layer."""
    del batch_stats
    flat = traverse_util.flatten_dict(dict(params))
    return traverse_util.unflatten_dict(
      {k: k[:-1] in self._norms and k[-1] in ('scale', 'bias') for k in flat}
    )

  def __call__(
    self,
    params,
    batch_stats,
    images,
    *,
    use_batch_stats: bool = False,
    bn_mode: layers.BNMode | None = None,
    mask: jax.Array | None = None,
    feature_shift=None,
  ):
    models_lib._check_images(images, self.input_shape)
    if mask is not None and mask.shape != images.shape[:1]:
      raise ValueError(
        f'mask shape {mask.shape} does not match batch {images.shape[:1]}'
      )
    if feature_shift is not None:
      raise ValueError(
        'feature_shift (Meta-TTT shift synthesis) needs a library model '
        'with the stem hook (tta_jax.models.build); a wrapped module has none'
      )
    if bn_mode is None and use_batch_stats:
      bn_mode = layers.BATCH
    return self._forward(params, batch_stats, images, bn_mode, mask)[0]

  def _forward(self, params, batch_stats, images, bn_mode, mask):
    tracer = _Tracer(bn_mode, mask, self._feature_paths)
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    mutable = ['intermediates']
    if bn_mode is not None and batch_stats:
      mutable.append('batch_stats')
    with nn.intercept_methods(tracer):
      out, state = self.module.apply(
        variables, images, mutable=mutable, **self._call_kwargs
      )
    logits, features = _split_output(out)
    pre_logits = tracer.head(logits)[1]
    if pre_logits is not None:
      features.setdefault('pre_logits', pre_logits)
    features.update(_sown(state.get('intermediates')))
    features.update(tracer.features)
    new_stats = state.get('batch_stats', batch_stats)
    return models_lib.ModelOutput(logits, features, new_stats), tracer


def wrap(
  module: nn.Module,
  input_shape: Sequence[int],
  *,
  train_kwarg: str | None = 'train',
  features: Mapping[str, str] | None = None,
  call_kwargs: Mapping[str, Any] | None = None,
) -> WrappedModel:
  """Turns a stock flax Linen classifier into the library's `ApplyFn`.

  Example, with a module written the way the flax examples write them
  (`nn.BatchNorm(use_running_average=not train)`, logits out) and the
  variables it was trained with:

    model = tta_jax.models.wrap(ResNet18(num_classes=10), (32, 32, 3))
    variables = {'params': params, 'batch_stats': batch_stats}
    tent = tta_jax.methods.tent.tent(model, optax.adam(1e-3))
    eata = tta_jax.methods.eata.eta(model, optax.adam(1e-3))
    t3a = tta_jax.methods.t3a.t3a(model, head=model.head)

  Args:
    module: a Linen module whose `__call__(x, <train_kwarg>=...)` returns
      logits `[B, K]` (or the library's `(logits, features)`); images are
      `[B, H, W, C]` floats.
    input_shape: `(H, W, C)`; images are checked against it.
    train_kwarg: the keyword of `__call__` that switches training mode; the
      module always gets the evaluation value (False; True for
      `use_running_average` and `deterministic`). None: the call takes no
      such keyword.
    features: extra `ModelOutput.features`, `{name: module path}`: the
      module's output, averaged over the spatial axes (`'stage3':
      'ResNetBlock_7'`).
    call_kwargs: other fixed keyword arguments of every call.

  Returns:
    A `WrappedModel`: `model(params, batch_stats, images, *,
    use_batch_stats=False, bn_mode=None, mask=None) -> ModelOutput`, with
    `num_classes`, `head`, `feature_names`, `norm_affine` (a mask function)
    and `init(rng)`. What is not supported: BatchNorm over several feature
    axes; BatchNorm whose input is not batch-major when a `mask` is given;
    `feature_shift` (Meta-TTT's stem hook); the `axis_name` of a BN layer
    is ignored (under `jit` the batch is already the global one).
  """
  kwargs = dict(call_kwargs or {})
  if train_kwarg is not None:
    params = inspect.signature(module.__call__).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if train_kwarg not in params and not takes_any:
      raise ValueError(
        f'wrap: {type(module).__name__}.__call__ has no argument '
        f'{train_kwarg!r} (it takes {list(params)}); pass the right '
        'train_kwarg, or train_kwarg=None'
      )
    kwargs[train_kwarg] = train_kwarg in _EVAL_TRUE
  return WrappedModel(module, input_shape, kwargs, features or {})
