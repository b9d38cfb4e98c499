"""CIFAR backbones: WideResNet-28-k (RobustBench) and ResNet-26 (TTT).

Layouts follow the PyTorch originals (RobustBench `wide_resnet.py`, the TTT
`ResNet.py`), including their padding, so their checkpoints convert
one-to-one (`tta_jax.models.vision.convert`). Inputs are images in [0, 1]; the
per-channel normalisation sits inside the model (RobustBench's `Standard`
WRN-28-10 uses none, so `mean=0, std=1` there).
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from tta_jax.models.vision import layers


def _conv(ch, k, stride, name):
  pad = ((k // 2, k // 2), (k // 2, k // 2))
  return nn.Conv(
    ch,
    (k, k),
    strides=(stride, stride),
    padding=pad,
    use_bias=False,
    name=name,
  )


class WideBasicBlock(nn.Module):
  """RobustBench's pre-activation WRN block."""

  out_ch: int
  stride: int
  norm: functools.partial

  @nn.compact
  def __call__(self, x, bn_mode, mask):
    equal = x.shape[-1] == self.out_ch
    o = nn.relu(self.norm(name='bn1')(x, bn_mode, mask))
    shortcut = x if equal else _conv(self.out_ch, 1, self.stride, 'shortcut')(o)
    o = _conv(self.out_ch, 3, self.stride, 'conv1')(o)
    o = nn.relu(self.norm(name='bn2')(o, bn_mode, mask))
    o = _conv(self.out_ch, 3, 1, 'conv2')(o)
    return shortcut + o


class WideResNet(nn.Module):
  """WideResNet-depth-k (Zagoruyko & Komodakis), as in RobustBench."""

  depth: int = 28
  widen_factor: int = 10
  num_classes: int = 10
  mean: Sequence[float] = (0.0, 0.0, 0.0)
  std: Sequence[float] = (1.0, 1.0, 1.0)
  bn_alpha_init: float | None = None

  @nn.compact
  def __call__(self, x, *, bn_mode=None, mask=None, feature_shift=None):
    if (self.depth - 4) % 6:
      raise ValueError(f'WideResNet depth must be 6n+4, got {self.depth}')
    n = (self.depth - 4) // 6
    norm = functools.partial(layers.BatchNorm, alpha_init=self.bn_alpha_init)
    widths = [
      16 * self.widen_factor,
      32 * self.widen_factor,
      64 * self.widen_factor,
    ]
    x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    x = _conv(16, 3, 1, 'conv1')(x)
    x = layers.apply_feature_shift(x, feature_shift)
    features = {}
    for s, (ch, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
      for i in range(n):
        x = WideBasicBlock(
          ch, stride if i == 0 else 1, norm, name=f'block{s + 1}_{i}'
        )(x, bn_mode, mask)
      features[f'stage{s + 1}'] = jnp.mean(x, axis=(1, 2))
    x = nn.relu(norm(name='bn')(x, bn_mode, mask))
    features['pre_logits'] = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name='head')(features['pre_logits'])
    return logits, features


class PreActBlock(nn.Module):
  """TTT's ResNet-26 block: BN-ReLU-conv twice, avgpool+zero-pad shortcut."""

  out_ch: int
  stride: int
  norm: functools.partial

  @nn.compact
  def __call__(self, x, bn_mode, mask):
    residual = x
    o = nn.relu(self.norm(name='bn1')(x, bn_mode, mask))
    o = _conv(self.out_ch, 3, self.stride, 'conv1')(o)
    o = nn.relu(self.norm(name='bn2')(o, bn_mode, mask))
    o = _conv(self.out_ch, 3, 1, 'conv2')(o)
    if self.stride != 1 or residual.shape[-1] != self.out_ch:
      s = self.stride
      residual = nn.avg_pool(residual, (s, s), (s, s))
      pad = self.out_ch - residual.shape[-1]
      residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (0, pad)))
    return residual + o


class ResNetCifar(nn.Module):
  """Pre-activation ResNet-(6n+2) for 32x32 inputs (TTT's ResNet-26)."""

  depth: int = 26
  width: int = 1
  num_classes: int = 10
  mean: Sequence[float] = (0.4914, 0.4822, 0.4465)
  std: Sequence[float] = (0.2470, 0.2435, 0.2616)
  bn_alpha_init: float | None = None

  @nn.compact
  def __call__(self, x, *, bn_mode=None, mask=None, feature_shift=None):
    if (self.depth - 2) % 6:
      raise ValueError(f'ResNetCifar depth must be 6n+2, got {self.depth}')
    n = (self.depth - 2) // 6
    norm = functools.partial(layers.BatchNorm, alpha_init=self.bn_alpha_init)
    x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    # TTT fixes the stem at 16 channels for every width (WRN convention);
    # layer1_0 then zero-pads the shortcut up to 16 * width.
    x = _conv(16, 3, 1, 'conv1')(x)
    x = layers.apply_feature_shift(x, feature_shift)
    features = {}
    for s, ch in enumerate((16, 32, 64)):
      for i in range(n):
        stride = 2 if (i == 0 and s > 0) else 1
        x = PreActBlock(
          ch * self.width, stride, norm, name=f'layer{s + 1}_{i}'
        )(x, bn_mode, mask)
      features[f'stage{s + 1}'] = jnp.mean(x, axis=(1, 2))
    x = nn.relu(norm(name='bn')(x, bn_mode, mask))
    features['pre_logits'] = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name='head')(features['pre_logits'])
    return logits, features
