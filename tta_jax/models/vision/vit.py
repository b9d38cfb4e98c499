"""Vision Transformers in timm's layout (pre-norm blocks, CLS token).

`ViT` follows `timm.models.vision_transformer.VisionTransformer` as
`vit_base_patch16_224` configures it: a patch-embedding convolution, a
class token and learned position embeddings (added to the class token
too), `depth` pre-norm blocks `x + attn(norm1(x))`, `x + mlp(norm2(x))`
(one fused `qkv` projection, exact GELU), a final LayerNorm (eps 1e-6) and
a linear head on the class token. Parameter names mirror timm's
(`blocks_3/attn/qkv`), so `tta_jax.models.vision.convert` maps a timm state
dict one to one.

Features (the `(logits, features)` contract): 'pre_logits' is the
normalised class token; 'block_cls' concatenates, for every block j, its
output class token normalised by block j+1's `norm1` (by the final `norm`
for the last block), which is what FOA and MGTTA match against source
statistics. Everything depends on the LayerNorm affines the methods adapt.
There is no batch normalisation: `bn_mode` and `mask` change nothing.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_DENSE = dict(
  kernel_init=nn.initializers.truncated_normal(0.02),
  bias_init=nn.initializers.zeros,
)


class Attention(nn.Module):
  num_heads: int

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    hd = c // self.num_heads
    qkv = nn.Dense(3 * c, name='qkv', **_DENSE)(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, hd]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) * hd**-0.5
    out = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, -1), v)
    return nn.Dense(c, name='proj', **_DENSE)(out.reshape(b, n, c))


class Mlp(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    h = nn.gelu(nn.Dense(self.hidden, name='fc1', **_DENSE)(x), False)
    return nn.Dense(x.shape[-1], name='fc2', **_DENSE)(h)


class Block(nn.Module):
  """A pre-norm block; also returns norm1's class token (FOA's feature)."""

  num_heads: int
  mlp_hidden: int
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(epsilon=self.eps, name='norm1')(x)
    x = x + Attention(self.num_heads, name='attn')(h)
    h2 = nn.LayerNorm(epsilon=self.eps, name='norm2')(x)
    x = x + Mlp(self.mlp_hidden, name='mlp')(h2)
    return x, h[:, 0]


class ViT(nn.Module):
  """A Vision Transformer classifier (timm layout).

  Attributes:
    num_classes: K.
    patch_size: P (square patches; H and W must be multiples of P).
    width: the embedding width D.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    mean, std: input normalisation per channel (timm's augreg ViTs and the
      digits models here: 0.5 and 0.5).
    eps: LayerNorm epsilon (timm: 1e-6).
  """

  num_classes: int = 10
  patch_size: int = 4
  width: int = 64
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  mean: Sequence[float] = (0.5,)
  std: Sequence[float] = (0.5,)
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x, *, bn_mode=None, mask=None, feature_shift=None):
    del bn_mode, mask  # no batch statistics in a ViT
    if feature_shift is not None:
      raise ValueError('ViT has no stem feature shift (Meta-TTT is BN-only)')
    h, w = x.shape[1:3]
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(
        f'image size {h}x{w} is not a multiple of patch {self.patch_size}'
      )
    x = (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)
    p = self.patch_size
    x = nn.Conv(
      self.width, (p, p), strides=(p, p), padding='VALID', name='patch_embed'
    )(x)
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    cls = self.param(
      'cls_token', nn.initializers.truncated_normal(1e-6), (1, 1, self.width)
    )
    pos = self.param(
      'pos_embed',
      nn.initializers.truncated_normal(0.02),
      (1, x.shape[1] + 1, self.width),
    )
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], 1)
    x = x + pos
    block_cls = []
    for i in range(self.depth):
      x, cls_in = Block(
        self.num_heads,
        int(self.width * self.mlp_ratio),
        self.eps,
        name=f'blocks_{i}',
      )(x)
      if i:  # block i's norm1 of block i-1's output class token
        block_cls.append(cls_in)
    pre_logits = nn.LayerNorm(epsilon=self.eps, name='norm')(x)[:, 0]
    block_cls.append(pre_logits)
    logits = nn.Dense(self.num_classes, name='head', **_DENSE)(pre_logits)
    features = {
      'pre_logits': pre_logits,
      'block_cls': jnp.concatenate(block_cls, -1),
    }
    return logits, features
