"""Flax models returning `(logits, features)`, and the `apply_fn` wrapper.

Methods never touch flax: they call
`apply_fn(params, batch_stats, images, *, use_batch_stats, bn_mode, mask)`,
which returns a `ModelOutput` whose `batch_stats` are the statistics this
forward normalised with (the source ones in source mode). `wrap` turns a
stock flax module (`nn.BatchNorm(use_running_average=not train)`, logits
out) into such an `apply_fn`.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from tta_jax.models import vlm
from tta_jax.models.vision import cifar, digits, layers, resnet, vit
from tta_jax.models.vision.layers import BATCH, BatchNorm, BNMode, mixed_bn
from tta_jax.models.wrap import WrappedModel, wrap

__all__ = [
  'BATCH',
  'BNMode',
  'BatchNorm',
  'MODELS',
  'ModelOutput',
  'ApplyFn',
  'build',
  'from_config',
  'init_variables',
  'make_apply_fn',
  'LAST_BN',
  'last_bn',
  'restrict_classes',
  'mixed_bn',
  'layers',
  'with_batch_bn',
  'with_mixed_bn',
  'wrap',
  'WrappedModel',
]


class ModelOutput(NamedTuple):
  logits: jax.Array  # [B, K]
  features: Mapping[str, jax.Array]  # 'stage1'..., 'pre_logits': [B, D]
  batch_stats: Any  # statistics this forward normalised with


ApplyFn = Callable[..., ModelOutput]

MODELS: dict[str, Callable[..., nn.Module]] = {
  'digits_cnn': digits.DigitsCNN,
  'resnet26': lambda **kw: cifar.ResNetCifar(depth=26, **kw),
  'wide_resnet28_2': lambda **kw: cifar.WideResNet(28, 2, **kw),
  'wide_resnet28_10': lambda **kw: cifar.WideResNet(28, 10, **kw),
  'resnet18': resnet.ResNet18,
  'resnet50': resnet.ResNet50,
  # CLIP-style dual encoders as zero-shot / CoOp classifiers.
  'vlm_digits': vlm.digits_classifier,
  'vlm_clip': vlm.clip_classifier,
  # A small ViT for the 28x28 digits (7x7 patches of 4, LayerNorm only).
  'digits_vit': lambda **kw: vit.ViT(
    **{'patch_size': 4, 'width': 64, 'depth': 4, 'num_heads': 4, **kw}
  ),
  # timm's vit_base_patch16_224 (convert its weights with convert.py).
  'vit_base_patch16_224': lambda **kw: vit.ViT(
    **{
      'patch_size': 16,
      'width': 768,
      'depth': 12,
      'num_heads': 12,
      'mean': (0.5,) * 3,
      'std': (0.5,) * 3,
      **kw,
    }
  ),
}


def build(name: str, **kwargs) -> nn.Module:
  """Builds a registered model; unknown names list the valid ones."""
  if name not in MODELS:
    raise ValueError(f'unknown model {name!r}; valid: {sorted(MODELS)}')
  return MODELS[name](**kwargs)


def from_config(model_config: Mapping[str, Any], num_classes: int) -> nn.Module:
  """`build` from a config: `{'name': ..., **keyword arguments}`."""
  kwargs = {k: v for k, v in dict(model_config).items() if k != 'name'}
  return build(model_config['name'], num_classes=num_classes, **kwargs)


def _check_images(images, input_shape: Sequence[int] | None):
  if not hasattr(images, 'shape') or images.ndim != 4:
    raise ValueError(
      'images must be a [B, H, W, C] array, got shape '
      f'{getattr(images, "shape", type(images))}'
    )
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(
      f'images must be floating point in [0, 1], got dtype {images.dtype}'
    )
  if input_shape is not None and tuple(images.shape[1:]) != tuple(input_shape):
    raise ValueError(
      f'images have shape {tuple(images.shape)}; this model expects '
      f'[B, {", ".join(map(str, input_shape))}]'
    )


def make_apply_fn(
  module: nn.Module, input_shape: Sequence[int] | None = None
) -> ApplyFn:
  """Wraps a `(logits, features)` Linen module into an `ApplyFn`.

  Args:
    module: a model whose `__call__(x, *, bn_mode, mask)` returns
      `(logits, features)`.
    input_shape: `(H, W, C)`; when given, every call checks the images
      against it at trace time.

  Returns:
    `apply_fn(params, batch_stats, images, *, use_batch_stats=False,
    bn_mode=None, mask=None) -> ModelOutput`. `use_batch_stats=True` is
    `bn_mode=BATCH` (test-batch statistics); `mask` ([B] bool) keeps padding
    rows out of the statistics. `feature_shift=(w, b)` transforms the stem
    convolution's output per channel (Meta-TTT's shift synthesis). For a
    module with a `class_head` method (the dual encoders), the function
    also has `apply_fn.class_head(params) -> (text_features, scale)`.
  """

  def apply_fn(
    params,
    batch_stats,
    images,
    *,
    use_batch_stats=False,
    bn_mode=None,
    mask=None,
    feature_shift=None,
  ) -> ModelOutput:
    _check_images(images, input_shape)
    if mask is not None and mask.shape != images.shape[:1]:
      raise ValueError(
        f'mask shape {mask.shape} does not match batch {images.shape[:1]}'
      )
    if bn_mode is None and use_batch_stats:
      bn_mode = BATCH
    variables = {'params': params, 'batch_stats': batch_stats}
    # Modules without the shift hook (user models) work unless it is used.
    kwargs = {'mask': mask}
    if feature_shift is not None:
      kwargs['feature_shift'] = feature_shift
    if bn_mode is None:
      logits, feats = module.apply(variables, images, bn_mode=None, **kwargs)
      return ModelOutput(logits, feats, batch_stats)
    (logits, feats), new = module.apply(
      variables, images, bn_mode=bn_mode, mutable=['batch_stats'], **kwargs
    )
    return ModelOutput(logits, feats, new.get('batch_stats', {}))

  if hasattr(module, 'class_head'):
    # Dual encoders: the class text features and logit scale alone (see
    # `vlm.VLMClassifier.class_head`), without an image.
    apply_fn.class_head = lambda params: module.apply(
      {'params': params}, method='class_head'
    )
  return apply_fn


def with_batch_bn(apply_fn: ApplyFn, mode: BNMode) -> ApplyFn:
  """`apply_fn` whose test-batch normalisation is `mode`.

  Calls with `use_batch_stats=True` (and no explicit `bn_mode`) normalise
  with `mode` instead of the batch alone, e.g. Meta-TTT's mixed BN
  (`meta_ttt.mixed_bn(alpha)`) under Tent or BN adaptation.
  """

  def apply(
    params, batch_stats, images, *, use_batch_stats=False, bn_mode=None, **kw
  ):
    if bn_mode is None and use_batch_stats:
      bn_mode = mode
    return apply_fn(params, batch_stats, images, bn_mode=bn_mode, **kw)

  return apply


def with_mixed_bn(apply_fn: ApplyFn, alpha: float | None) -> ApplyFn:
  """`apply_fn` whose test-batch BN is Meta-TTT's mixed BN with weight
  `alpha` on the source statistics (`mixed_bn`); None leaves it as it is.

  The `mixed_bn_alpha` option of the methods that normalise with the test
  batch (Tent, EATA, ETA, SAR, CoTTA): 1 is source BN, 0 test-batch BN.
  """
  if alpha is None:
    return apply_fn
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'mixed_bn_alpha must be in [0, 1], got {alpha}')
  return with_batch_bn(apply_fn, mixed_bn(float(alpha)))


# The BN layer right before global pooling in each model family, most
# specific first: ResNet-50 `layer4_2/bn3` (it also has a `layer4_1/bn2`),
# ResNet-18 `layer4_1/bn2`, WideResNet and ResNet-26 `bn`, DigitsCNN `bn4`.
LAST_BN = ('layer4_2/bn3', 'layer4_1/bn2', 'bn', 'bn4')


def last_bn(batch_stats) -> str:
  """The path of the model's BN layer before pooling (Meta-TTT's psi_max;
  the first of `LAST_BN` the model has)."""
  modules = {'/'.join(k[:-1]) for k in traverse_util.flatten_dict(batch_stats)}
  for path in LAST_BN:
    if path in modules:
      return path
  raise ValueError(
    f'none of {LAST_BN} is a BN layer of this model; name its last BN '
    f'(BN layers: {sorted(modules)[:8]})'
  )


def restrict_classes(apply_fn: ApplyFn, subset) -> ApplyFn:
  """An `apply_fn` whose logits are those of `subset` (ImageNet-R/A).

  Methods then adapt on, and are scored on, the benchmark's classes only,
  as the reference benchmarks do.
  """
  subset = jnp.asarray(subset)

  def restricted(*args, **kwargs):
    out = apply_fn(*args, **kwargs)
    return out._replace(logits=out.logits[:, subset])

  head = getattr(apply_fn, 'class_head', None)
  if head is not None:

    def class_head(params):
      text, scale = head(params)
      return text[subset], scale

    restricted.class_head = class_head
  restricted.class_subset = subset  # for methods that read the head (T3A)
  return restricted


def init_variables(
  module: nn.Module, input_shape: Sequence[int], rng: jax.Array
) -> dict[str, Any]:
  """Initial `{'params', 'batch_stats'}` for images of `input_shape`."""
  dummy = jnp.zeros((1, *input_shape), jnp.float32)
  variables = jax.jit(module.init)(rng, dummy)
  return {
    'params': variables['params'],
    'batch_stats': variables.get('batch_stats', {}),
  }
