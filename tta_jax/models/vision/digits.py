"""A small BN convnet for 28x28 digits (the embedded source model)."""

import functools

import flax.linen as nn
import jax.numpy as jnp

from tta_jax.models.vision import layers


class DigitsCNN(nn.Module):
  """conv-BN-ReLU x4 in three stages, global average pooling, linear head.

  Attributes:
    num_classes: K.
    width: channels of the first stage (doubled per stage).
    bn_alpha_init: see `layers.BatchNorm`.
  """

  num_classes: int = 10
  width: int = 16
  bn_alpha_init: float | None = None

  @nn.compact
  def __call__(self, x, *, bn_mode=None, mask=None, feature_shift=None):
    norm = functools.partial(layers.BatchNorm, alpha_init=self.bn_alpha_init)
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), use_bias=False)
    features = {}
    x = (x - 0.5) / 0.5

    def unit(x, ch, i):
      x = conv(ch, name=f'conv{i}')(x)
      if i == 1:
        x = layers.apply_feature_shift(x, feature_shift)
      return nn.relu(norm(name=f'bn{i}')(x, bn_mode, mask))

    x = unit(x, self.width, 1)
    x = unit(x, self.width, 2)
    x = layers.max_pool(x, (2, 2), (2, 2))
    features['stage1'] = jnp.mean(x, axis=(1, 2))
    x = unit(x, 2 * self.width, 3)
    x = layers.max_pool(x, (2, 2), (2, 2))
    features['stage2'] = jnp.mean(x, axis=(1, 2))
    x = unit(x, 4 * self.width, 4)
    features['stage3'] = features['pre_logits'] = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, name='head')(features['pre_logits'])
    return logits, features
