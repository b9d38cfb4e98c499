"""PyTorch state dicts -> tta_jax variables (numpy only, no torch import).

Supported layouts, by registered model name:

- `wide_resnet28_10`, `wide_resnet28_2`: RobustBench's `Standard` WRN
  (`conv1`, `block1.layer.0.{bn1,conv1,bn2,conv2,convShortcut}`, final `bn1`,
  `fc`). It has no input normalisation (our default `mean=0, std=1`).
- `resnet26`: TTT's `ResNetCifar` (`yueatsprograms/ttt_cifar_release`, also
  copied by MEMO and TTT++): `conv1`, `layer1.0.{bn1,conv1,bn2,conv2}`,
  final `bn`, `fc`; its shortcut has no parameters. TTT and MEMO train on
  inputs normalised with mean = std = 0.5, which is not our default: build
  the model with `mean=(0.5,) * 3, std=(0.5,) * 3` for their checkpoints.
  BatchNorm checkpoints only (the GroupNorm ones have no running statistics).
- `resnet18`, `resnet50`: torchvision (`conv1`, `bn1`,
  `layer1.0.{conv,bn}{1,2,3}`, `layer1.0.downsample.{0,1}`, `fc`), with
  ImageNet normalisation (our default).
- `vit_base_patch16_224`, `digits_vit`: timm's `VisionTransformer`
  (`patch_embed.proj`, `cls_token`, `pos_embed`,
  `blocks.0.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}`, `norm`,
  `head`), normalised with mean = std = 0.5 as timm's augreg ViT-B/16.
  LayerNorm `weight` -> `scale`; the top-level `cls_token` and `pos_embed`
  keep their shapes.

Conv weights go OIHW -> HWIO, linear weights [out, in] -> [in, out], BN
`weight`/`bias` -> `scale`/`bias`, `running_mean`/`running_var` ->
`batch_stats` `mean`/`var` as they are (both frameworks normalise with the
running variance in eval mode); `num_batches_tracked` is dropped. The
conversion is strict: every tensor is used exactly once and every leaf of
the model is filled with the right shape, or a `ValueError` lists what did
not match.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from tta_jax import models

# Containers that checkpoints wrap their state dict in: RobustBench
# (`state_dict`, `model_state_dict`), TTT (`net`, next to `head` and the
# optimizer), and the common `{'model': ...}`.
WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'net', 'model')
DATA_PARALLEL_PREFIX = 'module.'

# Module-path renames, PyTorch -> tta_jax, tried in order with re.fullmatch.
_WRN = (
  (r'block(\d)\.layer\.(\d+)\.convShortcut', r'block\1_\2/shortcut'),
  (r'block(\d)\.layer\.(\d+)\.(bn[12]|conv[12])', r'block\1_\2/\3'),
  (r'conv1', 'conv1'),
  (r'bn1', 'bn'),
  (r'fc', 'head'),
)
_TTT = (
  (r'layer(\d)\.(\d+)\.(bn[12]|conv[12])', r'layer\1_\2/\3'),
  (r'conv1', 'conv1'),
  (r'bn', 'bn'),
  (r'fc', 'head'),
)
_TORCHVISION = (
  (r'layer(\d)\.(\d+)\.downsample\.0', r'layer\1_\2/downsample_conv'),
  (r'layer(\d)\.(\d+)\.downsample\.1', r'layer\1_\2/downsample_bn'),
  (r'layer(\d)\.(\d+)\.(bn[123]|conv[123])', r'layer\1_\2/\3'),
  (r'conv1', 'conv1'),
  (r'bn1', 'bn1'),
  (r'fc', 'head'),
)
_TIMM_VIT = (
  (r'patch_embed\.proj', 'patch_embed'),
  (r'blocks\.(\d+)\.(norm[12])', r'blocks_\1/\2'),
  (r'blocks\.(\d+)\.attn\.(qkv|proj)', r'blocks_\1/attn/\2'),
  (r'blocks\.(\d+)\.mlp\.(fc[12])', r'blocks_\1/mlp/\2'),
  (r'norm', 'norm'),
  (r'head', 'head'),
)
LAYOUTS = {
  'wide_resnet28_2': _WRN,
  'wide_resnet28_10': _WRN,
  'resnet26': _TTT,
  'resnet18': _TORCHVISION,
  'resnet50': _TORCHVISION,
  'vit_base_patch16_224': _TIMM_VIT,
  'digits_vit': _TIMM_VIT,
}
_LAYOUT_NAMES = {
  id(_WRN): "RobustBench's Standard WideResNet",
  id(_TTT): "TTT's ResNetCifar (BatchNorm)",
  id(_TORCHVISION): 'torchvision ResNet',
  id(_TIMM_VIT): "timm's VisionTransformer",
}
_MAX_LISTED = 20


def _is_array(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
  """The flat `{key: tensor}` dict inside a loaded checkpoint.

  Unwraps `{'state_dict': ...}`, `{'model_state_dict': ...}`, TTT's
  `{'net': ..., 'head': ..., 'optimizer': ...}` and `{'model': ...}`
  (repeatedly), then strips a `module.` prefix (DataParallel) shared by
  every key.

  Args:
    checkpoint: what `torch.load` returned.

  Returns:
    The state dict, values untouched (tensors or arrays).
  """
  obj = checkpoint
  while isinstance(obj, Mapping) and not all(map(_is_array, obj.values())):
    inner = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if not inner:
      raise ValueError(
        'the checkpoint is neither a state dict (a mapping of tensors) nor '
        f'one wrapped under any of {list(WRAPPER_KEYS)}; its top-level keys '
        f'are {sorted(map(str, obj))[:_MAX_LISTED]}'
      )
    obj = obj[inner[0]]
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f'no state dict in the checkpoint (got {type(obj)})')
  state_dict = dict(obj)
  while all(k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict):
    n = len(DATA_PARALLEL_PREFIX)
    state_dict = {k[n:]: v for k, v in state_dict.items()}
  return state_dict


def _rename_module(layout, module: str) -> str | None:
  for pattern, repl in layout:
    if re.fullmatch(pattern, module):
      return re.sub(pattern, repl, module)
  return None


def _listed(items) -> str:
  items = sorted(items)
  more = len(items) - _MAX_LISTED
  text = ', '.join(items[:_MAX_LISTED])
  return text + (f', ... ({more} more)' if more > 0 else '')


def _torch_shape(shape) -> tuple[int, ...]:
  if len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape))  # [in, out] -> [out, in]; 1-D unchanged


def from_torch_state_dict(
  model_name: str,
  state_dict: Mapping[str, Any],
  *,
  num_classes: int,
  model_kwargs: Mapping[str, Any] | None = None,
  input_shape: Sequence[int] = (32, 32, 3),
) -> dict[str, Any]:
  """Converts a PyTorch state dict into `{'params', 'batch_stats'}`.

  Args:
    model_name: a key of `LAYOUTS` (and of `models.MODELS`).
    state_dict: `{torch key: array}`; torch CPU tensors work too (through
      `np.asarray`). Wrapped checkpoints and `module.` prefixes are accepted
      (see `unwrap_state_dict`).
    num_classes: K, the classifier's output size.
    model_kwargs: further keyword arguments of the model (e.g. `mean`,
      `std`), used to build the template the tensors must fill.
    input_shape: `(H, W, C)`; only C and the traceability of the model on
      this shape matter to the parameter shapes.

  Returns:
    Nested dicts of float32 numpy arrays, `{'params': ..., 'batch_stats':
    ...}`, with exactly the structure of `models.init_variables`.

  Raises:
    ValueError: listing every unused tensor, unfilled leaf and shape
      mismatch.
  """
  if model_name not in LAYOUTS:
    raise ValueError(
      f'no PyTorch layout for model {model_name!r}; valid: {sorted(LAYOUTS)}'
    )
  layout = LAYOUTS[model_name]
  state_dict = unwrap_state_dict(state_dict)
  module = models.build(
    model_name, num_classes=num_classes, **dict(model_kwargs or {})
  )
  template = jax.eval_shape(
    lambda: models.init_variables(module, tuple(input_shape), jax.random.key(0))
  )
  want = traverse_util.flatten_dict(template, sep='/')  # 'params/conv1/kernel'
  # The renames are one-to-one, so no leaf can be filled twice.
  got: dict[str, np.ndarray] = {}
  unused, mismatched = [], []
  misshapen: set[str] = set()  # targets already reported as mismatched

  for key, value in state_dict.items():
    mod, _, leaf = key.rpartition('.')
    if leaf == 'num_batches_tracked':
      continue
    path = _rename_module(layout, mod) if mod else None
    if not mod and f'params/{leaf}' in want:  # a top-level parameter
      target = f'params/{leaf}'  # (timm's cls_token, pos_embed)
    elif path is None:
      unused.append(key)
      continue
    elif leaf == 'weight':
      is_norm = f'params/{path}/scale' in want
      target = f'params/{path}/{"scale" if is_norm else "kernel"}'
    elif leaf == 'bias':
      target = f'params/{path}/bias'
    elif leaf in ('running_mean', 'running_var'):
      target = f'batch_stats/{path}/{leaf.removeprefix("running_")}'
    else:
      target = None
    if target not in want:
      unused.append(key)
      continue
    array = np.asarray(value)
    if target.endswith('/kernel') and array.ndim == 4:
      array = array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif target.endswith('/kernel') and array.ndim == 2:
      array = array.T  # [out, in] -> [in, out]
    expected = want[target]
    if array.shape != expected.shape:
      mismatched.append(
        f'{key} is {tuple(np.shape(value))}, {target} needs '
        f'{_torch_shape(expected.shape)} in PyTorch layout'
      )
      misshapen.add(target)
      continue
    got[target] = np.ascontiguousarray(array, dtype=expected.dtype)

  missing = sorted(set(want) - set(got) - misshapen)
  if unused or missing or mismatched:
    lines = [
      f'the state dict does not match {_LAYOUT_NAMES[id(layout)]} as '
      f'{model_name!r} with num_classes={num_classes} '
      f'({len(state_dict)} tensors, {len(want)} tta_jax leaves):'
    ]
    if unused:
      lines.append(f'  unused PyTorch tensors: {_listed(unused)}')
    if missing:
      lines.append(f'  tta_jax leaves with no tensor: {_listed(missing)}')
    if mismatched:
      lines.append(f'  shape mismatches: {_listed(mismatched)}')
    if not any(k.endswith('.running_var') for k in state_dict):
      lines.append(
        '  (no running statistics at all: a GroupNorm checkpoint cannot fill '
        'these BatchNorm models)'
      )
    raise ValueError('\n'.join(lines))
  return traverse_util.unflatten_dict(got, sep='/')


def model_config(model_name: str, **kwargs) -> dict[str, Any]:
  """The `config.model` dict (JSON types) that rebuilds the converted model.

  Sequences become lists, the form `metadata.json` round-trips, so the
  runner's architecture check compares like with like.
  """
  config = {'name': model_name}
  for key, value in kwargs.items():
    is_seq = isinstance(value, (tuple, list, np.ndarray))
    config[key] = [float(v) for v in value] if is_seq else value
  return config
