"""ImageNet ResNet-18/50 in torchvision's layout (V1.5: stride on the 3x3).

Module names mirror torchvision's state-dict keys (`layer1_0/conv1` for
`layer1.0.conv1`, `layer1_0/downsample_bn` for `layer1.0.downsample.1`), and
paddings are explicit and symmetric like PyTorch's, so torchvision weights
convert one-to-one. Inputs are images in [0, 1]; ImageNet normalisation sits
inside the model.
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


class BasicBlock(nn.Module):
  out_ch: int
  stride: int
  norm: functools.partial
  expansion = 1

  @nn.compact
  def __call__(self, x, bn_mode, mask):
    o = _conv(self.out_ch, 3, self.stride, 'conv1')(x)
    o = nn.relu(self.norm(name='bn1')(o, bn_mode, mask))
    o = _conv(self.out_ch, 3, 1, 'conv2')(o)
    o = self.norm(name='bn2')(o, bn_mode, mask)
    if self.stride != 1 or x.shape[-1] != self.out_ch:
      x = _conv(self.out_ch, 1, self.stride, 'downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x, bn_mode, mask)
    return nn.relu(x + o)


class Bottleneck(nn.Module):
  out_ch: int  # the block's output is 4 * out_ch channels
  stride: int
  norm: functools.partial
  expansion = 4

  @nn.compact
  def __call__(self, x, bn_mode, mask):
    o = _conv(self.out_ch, 1, 1, 'conv1')(x)
    o = nn.relu(self.norm(name='bn1')(o, bn_mode, mask))
    o = _conv(self.out_ch, 3, self.stride, 'conv2')(o)
    o = nn.relu(self.norm(name='bn2')(o, bn_mode, mask))
    o = _conv(4 * self.out_ch, 1, 1, 'conv3')(o)
    o = self.norm(name='bn3')(o, bn_mode, mask)
    if self.stride != 1 or x.shape[-1] != 4 * self.out_ch:
      x = _conv(4 * self.out_ch, 1, self.stride, 'downsample_conv')(x)
      x = self.norm(name='downsample_bn')(x, bn_mode, mask)
    return nn.relu(x + o)


class ResNet(nn.Module):
  """torchvision ResNet: 7x7 stem, max-pool, four stages, linear head."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = 'basic'
  num_classes: int = 1000
  mean: Sequence[float] = (0.485, 0.456, 0.406)
  std: Sequence[float] = (0.229, 0.224, 0.225)
  bn_alpha_init: float | None = None

  @nn.compact
  def __call__(self, x, *, bn_mode=None, mask=None, feature_shift=None):
    norm = functools.partial(layers.BatchNorm, alpha_init=self.bn_alpha_init)
    block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[self.block]
    x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    x = _conv(64, 7, 2, 'conv1')(x)
    x = layers.apply_feature_shift(x, feature_shift)
    x = nn.relu(norm(name='bn1')(x, bn_mode, mask))
    x = layers.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    features = {'stem': jnp.mean(x, axis=(1, 2))}
    for s, n in enumerate(self.stage_sizes):
      for i in range(n):
        stride = 2 if (i == 0 and s > 0) else 1
        x = block_cls(64 * 2**s, stride, norm, name=f'layer{s + 1}_{i}')(
          x, bn_mode, mask
        )
      features[f'stage{s + 1}'] = jnp.mean(x, axis=(1, 2))
    features['pre_logits'] = features[f'stage{len(self.stage_sizes)}']
    logits = nn.Dense(self.num_classes, name='head')(features['pre_logits'])
    return logits, features


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block='basic')
ResNet50 = functools.partial(
  ResNet, stage_sizes=(3, 4, 6, 3), block='bottleneck'
)
