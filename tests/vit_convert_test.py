"""timm ViT -> tta_jax: the state-dict layout, a NumPy forward in timm's
semantics, and (with torch + timm installed) logits parity against timm."""

import math

import jax
import numpy as np
import pytest

from configs import mgg_imagenet
from tta_jax import methods, models
from tta_jax._src import params as params_lib
from tta_jax.models.vision import convert

SMALL = dict(width=48, depth=3, num_heads=3)  # 32x32 inputs, patch 16


def _timm_state_dict(width, depth, num_classes, patch, image, seed=0):
  """Random tensors under timm's `vit_base_patch16_224` names and shapes."""
  r = np.random.default_rng(seed)
  t = lambda *s: (0.2 * r.normal(size=s)).astype(np.float32)
  tokens = (image // patch) ** 2 + 1
  sd = {
    'cls_token': t(1, 1, width),
    'pos_embed': t(1, tokens, width),
    'patch_embed.proj.weight': t(width, 3, patch, patch),
    'patch_embed.proj.bias': t(width),
    'norm.weight': 1 + t(width),
    'norm.bias': t(width),
    'head.weight': t(num_classes, width),
    'head.bias': t(num_classes),
  }
  for i in range(depth):
    b = f'blocks.{i}.'
    sd |= {
      b + 'norm1.weight': 1 + t(width),
      b + 'norm1.bias': t(width),
      b + 'attn.qkv.weight': t(3 * width, width),
      b + 'attn.qkv.bias': t(3 * width),
      b + 'attn.proj.weight': t(width, width),
      b + 'attn.proj.bias': t(width),
      b + 'norm2.weight': 1 + t(width),
      b + 'norm2.bias': t(width),
      b + 'mlp.fc1.weight': t(4 * width, width),
      b + 'mlp.fc1.bias': t(4 * width),
      b + 'mlp.fc2.weight': t(width, 4 * width),
      b + 'mlp.fc2.bias': t(width),
    }
  return sd


def _numpy_timm_forward(sd, x, depth, heads, patch):
  """timm's VisionTransformer.forward (eval), NCHW input in [-1, 1]."""

  def ln(z, p):
    mu = z.mean(-1, keepdims=True)
    var = z.var(-1, keepdims=True)
    return (z - mu) / np.sqrt(var + 1e-6) * sd[p + '.weight'] + sd[p + '.bias']

  lin = lambda z, p: z @ sd[p + '.weight'].T + sd[p + '.bias']
  b, c, h, w = x.shape
  n = (h // patch) * (w // patch)
  cols = x.reshape(b, c, h // patch, patch, w // patch, patch)
  cols = cols.transpose(0, 2, 4, 1, 3, 5).reshape(b, n, -1)
  z = lin(cols, 'patch_embed.proj')  # the stride-P conv as a matmul
  d = z.shape[-1]
  z = np.concatenate([np.broadcast_to(sd['cls_token'], (b, 1, d)), z], 1)
  z = z + sd['pos_embed']
  feats = []
  for i in range(depth):
    p = f'blocks.{i}.'
    y = ln(z, p + 'norm1')
    if i:
      feats.append(y[:, 0])
    qkv = lin(y, p + 'attn.qkv').reshape(b, n + 1, 3, heads, d // heads)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # [B, H, N, hd] each
    a = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, n + 1, d)
    z = z + lin(o, p + 'attn.proj')
    y = lin(ln(z, p + 'norm2'), p + 'mlp.fc1')
    y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
    z = z + lin(y, p + 'mlp.fc2')
  pre = ln(z, 'norm')[:, 0]
  feats.append(pre)
  return lin(pre, 'head'), np.concatenate(feats, -1)


def _ours(sd, x_nhwc, num_classes, **kw):
  variables = convert.from_torch_state_dict(
    'vit_base_patch16_224',
    sd,
    num_classes=num_classes,
    model_kwargs=kw,
    input_shape=x_nhwc.shape[1:],
  )
  module = models.build('vit_base_patch16_224', num_classes=num_classes, **kw)
  logits, feats = module.apply({'params': variables['params']}, x_nhwc)
  return np.asarray(logits), np.asarray(feats['block_cls'])


def test_timm_layout_matches_a_numpy_forward():
  sd = _timm_state_dict(48, 3, 7, 16, 32)
  # The patch conv flattened as (C, P, P) rows for the NumPy matmul.
  ref_sd = dict(sd)
  ref_sd['patch_embed.proj.weight'] = sd['patch_embed.proj.weight'].reshape(
    48, -1
  )
  x = np.random.default_rng(1).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  want_logits, want_feats = _numpy_timm_forward(
    ref_sd, (x.transpose(0, 3, 1, 2) - 0.5) / 0.5, 3, 3, 16
  )
  logits, feats = _ours(sd, x, 7, **SMALL)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(feats, want_feats, rtol=1e-4, atol=1e-4)


def test_vit_b16_layout_is_complete_and_strict():
  sd = _timm_state_dict(768, 12, 1000, 16, 224)
  shapes = jax.eval_shape(
    lambda: convert.from_torch_state_dict(
      'vit_base_patch16_224', sd, num_classes=1000, input_shape=(224, 224, 3)
    )
  )
  assert shapes['params']['pos_embed'].shape == (1, 197, 768)
  # The converted model's LayerNorm affines, as the MGG configs select
  # them: MGTTA's 38,400 adapted scalars.
  mask = methods.mask_from_spec(mgg_imagenet.LAYER_NORMS)(shapes['params'], {})
  selected, _ = params_lib.split(shapes['params'], mask)
  n_ln = sum(v.size for v in jax.tree.leaves(selected))
  assert n_ln == 25 * 2 * 768
  sd['blocks.3.attn.qkv.weight'] = sd['blocks.3.attn.qkv.weight'][:100]
  with pytest.raises(ValueError, match='blocks.3.attn.qkv.weight'):
    convert.from_torch_state_dict(
      'vit_base_patch16_224', sd, num_classes=1000, input_shape=(224, 224, 3)
    )


@pytest.mark.torch
def test_logits_match_timm():
  torch = pytest.importorskip('torch')
  try:
    import timm
  except Exception as e:  # a torchvision built for another torch raises too
    pytest.skip(
      'timm parity needs timm with a torchvision matching torch: '
      f"pip install -e '.[clip]' ({type(e).__name__}: {e})"
    )
  torch.manual_seed(0)
  net = timm.create_model(
    'vit_base_patch16_224',
    pretrained=False,
    num_classes=7,
    img_size=32,
    embed_dim=48,
    depth=3,
    num_heads=3,
  ).eval()
  with torch.no_grad():
    for p in net.parameters():  # off the init's ones and zeros
      p.add_(0.1 * torch.randn_like(p))
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy((x.transpose(0, 3, 1, 2) - 0.5) / 0.5))
  logits, _ = _ours(sd, x, 7, **SMALL)
  np.testing.assert_allclose(logits, want.numpy(), rtol=1e-4, atol=1e-4)
