"""CLIP's towers in flax (Radford et al., 2021; OpenAI and OpenCLIP layouts).

* `ModifiedResNet`: the RN50-family image tower (a three-conv stem,
  anti-aliased bottlenecks that average-pool before strided convolutions,
  and attention pooling), with BN layers whose statistics a test-time
  method may choose (`layers.BatchNorm`).
* `VisionTransformer`: the ViT-B/16-family image tower (patch embedding, a
  class token, pre-LN blocks, the class token's state projected).
* `TextTransformer`: the causal text transformer pooled at the end-of-text
  token (the largest id of a row) and projected.

Parameter names follow the PyTorch state dicts (`conv1`, `layer1_0`,
`attnpool`, `resblocks_0`, ...) so `clip_import` maps them one to one.
`ARCHS` holds the published sizes; `clip_tokenizer` builds CLIP's byte-level
BPE tokenizer from its merges file with `tokenizers`.
"""

import functools
import gzip
import html
import pathlib
from collections.abc import Sequence
from importlib import metadata

import flax.linen as nn
import jax
import jax.numpy as jnp

from tta_jax.models.vision import layers
from tta_jax.models.vlm import text as text_lib

# OpenAI's image normalisation (TPT and every CLIP paper use it).
PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)

# The published architectures (OpenAI's checkpoints; OpenCLIP's configs).
ARCHS = {
  'RN50': dict(
    embed_dim=1024,
    image_size=224,
    vision_layers=(3, 4, 6, 3),
    vision_width=64,
    vision_heads=32,
    patch_size=None,
    context_length=77,
    vocab_size=49408,
    text_width=512,
    text_heads=8,
    text_layers=12,
  ),
  'ViT-B/16': dict(
    embed_dim=512,
    image_size=224,
    vision_layers=12,
    vision_width=768,
    vision_heads=12,
    patch_size=16,
    context_length=77,
    vocab_size=49408,
    text_width=512,
    text_heads=8,
    text_layers=12,
  ),
}


def quick_gelu(x):
  """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _act(quick: bool):
  return quick_gelu if quick else functools.partial(nn.gelu, approximate=False)


class _Attention(nn.Module):
  """torch's `nn.MultiheadAttention`: one `in_proj` for q, k, v."""

  width: int
  heads: int

  @nn.compact
  def __call__(self, x, *, causal=False):
    b, n, _ = x.shape
    qkv = nn.Dense(3 * self.width, name='in_proj')(x)
    q, k, v = jnp.split(qkv, 3, axis=-1)
    shape = (b, n, self.heads, self.width // self.heads)
    out = jax.nn.dot_product_attention(
      q.reshape(shape), k.reshape(shape), v.reshape(shape), is_causal=causal
    ).reshape(b, n, self.width)
    return nn.Dense(self.width, name='out_proj')(out)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

  width: int
  heads: int
  quick_gelu: bool = True
  mlp_ratio: float = 4.0

  @nn.compact
  def __call__(self, x, *, causal=False):
    ln = functools.partial(nn.LayerNorm, epsilon=1e-5)
    x = x + _Attention(self.width, self.heads, name='attn')(
      ln(name='ln_1')(x), causal=causal
    )
    h = nn.Dense(int(self.width * self.mlp_ratio), name='c_fc')(
      ln(name='ln_2')(x)
    )
    return x + nn.Dense(self.width, name='c_proj')(_act(self.quick_gelu)(h))


class VisionTransformer(nn.Module):
  """CLIP's ViT image tower: `[B, H, W, 3]` (normalised) -> `[B, E]`."""

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  layers: int = 12
  heads: int = 12
  output_dim: int = 512
  quick_gelu: bool = True

  @nn.compact
  def __call__(self, x, *, bn_mode=None, mask=None):
    del bn_mode, mask  # no batch statistics
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), (p, p), use_bias=False, name='conv1')(x)
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    grid = (self.image_size // p) ** 2
    scale = self.width**-0.5
    cls = self.param(
      'class_embedding', nn.initializers.normal(scale), (self.width,)
    )
    pos = self.param(
      'positional_embedding',
      nn.initializers.normal(scale),
      (grid + 1, self.width),
    )
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), x], 1)
    x = nn.LayerNorm(1e-5, name='ln_pre')(x + pos)
    for i in range(self.layers):
      x = ResidualAttentionBlock(
        self.width, self.heads, self.quick_gelu, name=f'resblocks_{i}'
      )(x)
    pooled = nn.LayerNorm(1e-5, name='ln_post')(x[:, 0])
    proj = self.param(
      'proj', nn.initializers.normal(scale), (self.width, self.output_dim)
    )
    return pooled @ proj


class _Bottleneck(nn.Module):
  planes: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, bn_mode, mask):
    conv = functools.partial(nn.Conv, use_bias=False)

    def bn(name, y):
      return layers.BatchNorm(name=name)(y, bn_mode, mask)

    out = nn.relu(bn('bn1', conv(self.planes, (1, 1), name='conv1')(x)))
    out = conv(self.planes, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(out)
    out = nn.relu(bn('bn2', out))
    if self.stride > 1:
      s = (self.stride, self.stride)
      out = nn.avg_pool(out, s, s)
    out = bn('bn3', conv(4 * self.planes, (1, 1), name='conv3')(out))
    if self.stride > 1 or x.shape[-1] != 4 * self.planes:
      if self.stride > 1:
        s = (self.stride, self.stride)
        x = nn.avg_pool(x, s, s)
      x = conv(4 * self.planes, (1, 1), name='downsample_0')(x)
      x = bn('downsample_1', x)
    return nn.relu(out + x)


class _AttentionPool(nn.Module):
  """CLIP's attention pooling: the mean token queries all positions."""

  spatial: int
  width: int
  heads: int
  output_dim: int

  @nn.compact
  def __call__(self, x):
    b = x.shape[0]
    x = x.reshape(b, -1, self.width)
    x = jnp.concatenate([x.mean(axis=1, keepdims=True), x], axis=1)
    pos = self.param(
      'positional_embedding',
      nn.initializers.normal(self.width**-0.5),
      (self.spatial**2 + 1, self.width),
    )
    x = x + pos
    hd = self.width // self.heads
    q = nn.Dense(self.width, name='q_proj')(x[:, :1])
    k = nn.Dense(self.width, name='k_proj')(x)
    v = nn.Dense(self.width, name='v_proj')(x)
    out = jax.nn.dot_product_attention(
      q.reshape(b, 1, self.heads, hd),
      k.reshape(b, -1, self.heads, hd),
      v.reshape(b, -1, self.heads, hd),
    ).reshape(b, self.width)
    return nn.Dense(self.output_dim, name='c_proj')(out)


class ModifiedResNet(nn.Module):
  """CLIP's ResNet image tower: `[B, H, W, 3]` (normalised) -> `[B, E]`."""

  layers: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  heads: int = 32
  image_size: int = 224
  output_dim: int = 1024

  @nn.compact
  def __call__(self, x, *, bn_mode=None, mask=None):
    conv = functools.partial(nn.Conv, use_bias=False, padding=((1, 1), (1, 1)))

    def bn(name, y):
      return layers.BatchNorm(name=name)(y, bn_mode, mask)

    half = self.width // 2
    x = nn.relu(bn('bn1', conv(half, (3, 3), (2, 2), name='conv1')(x)))
    x = nn.relu(bn('bn2', conv(half, (3, 3), name='conv2')(x)))
    x = nn.relu(bn('bn3', conv(self.width, (3, 3), name='conv3')(x)))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    for stage, blocks in enumerate(self.layers):
      planes = self.width * 2**stage
      for j in range(blocks):
        stride = 2 if stage > 0 and j == 0 else 1
        x = _Bottleneck(planes, stride, name=f'layer{stage + 1}_{j}')(
          x, bn_mode, mask
        )
    return _AttentionPool(
      self.image_size // 32,
      self.width * 32,
      self.heads,
      self.output_dim,
      name='attnpool',
    )(x)


class TextTransformer(nn.Module):
  """CLIP's text tower over token embeddings, pooled at end-of-text.

  `embed(ids)` gives the token embeddings; `__call__(embeds, ids)` adds the
  positional embedding, runs the causal blocks, applies `ln_final` and
  projects the state at each row's largest id (the end-of-text token, as
  in CLIP; CoOp's context vectors leave the ids unchanged).
  """

  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  heads: int = 8
  layers: int = 12
  output_dim: int = 512
  quick_gelu: bool = True
  pad_id: int = 0

  @property
  def token_dim(self) -> int:
    return self.width

  def setup(self):
    self.token_embedding = nn.Embed(
      self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02)
    )
    self.positional_embedding = self.param(
      'positional_embedding',
      nn.initializers.normal(0.01),
      (self.context_length, self.width),
    )
    self.resblocks = [
      ResidualAttentionBlock(self.width, self.heads, self.quick_gelu)
      for _ in range(self.layers)
    ]
    self.ln_final = nn.LayerNorm(1e-5)
    self.text_projection = self.param(
      'text_projection',
      nn.initializers.normal(self.width**-0.5),
      (self.width, self.output_dim),
    )

  def embed(self, ids: jax.Array) -> jax.Array:
    return self.token_embedding(ids)

  def __call__(self, embeds: jax.Array, ids: jax.Array) -> jax.Array:
    lead, n = ids.shape[:-1], ids.shape[-1]
    ids = ids.reshape(-1, n)
    x = embeds.reshape(-1, n, self.width) + self.positional_embedding[:n]
    for block in self.resblocks:
      x = block(x, causal=True)
    x = self.ln_final(x)
    eot = jnp.argmax(ids, axis=-1)
    pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
    return (pooled @ self.text_projection).reshape(*lead, self.output_dim)


# ---------------------------------------------------------------------------
# The tokenizer.

# CLIP's pre-tokenisation (`SimpleTokenizer.pat`), lower-cased input.
_CLIP_PATTERN = (
  r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
  r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
_BPE_FILE = 'bpe_simple_vocab_16e6.txt.gz'


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible byte -> printable character table."""
  bs = (
    list(range(ord('!'), ord('~') + 1))
    + list(range(ord('¡'), ord('¬') + 1))
    + list(range(ord('®'), ord('ÿ') + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs), strict=True))


def find_bpe_file() -> pathlib.Path:
  """CLIP's merges file: the packaged copy (`models/vlm/data`), else one
  from an installed `open_clip_torch` or `clip`."""
  packaged = pathlib.Path(__file__).parent / 'data' / _BPE_FILE
  if packaged.is_file():
    return packaged
  for dist_name in ('open_clip_torch', 'clip-anytorch', 'clip'):
    try:
      dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
      continue
    for f in dist.files or ():
      if f.name == _BPE_FILE:
        return pathlib.Path(dist.locate_file(f))
  raise FileNotFoundError(
    f"CLIP's BPE merges ({_BPE_FILE}) not found: pass its path, or "
    'pip install --no-deps open-clip-torch (the file ships inside it)'
  )


class _CleanTokenizer:
  """A `tokenizers.Tokenizer` behind CLIP's text clean-up (HTML entities
  unescaped, whitespace collapsed, lower case)."""

  def __init__(self, tokenizer):
    self._tok = tokenizer

  def encode(self, text: str):
    text = html.unescape(html.unescape(text)).strip()
    return self._tok.encode(' '.join(text.split()).lower())


@functools.cache
def clip_tokenizer(
  bpe_path: str | None = None, context_length: int = 77
) -> text_lib.TextTokenizer:
  """CLIP's byte-level BPE tokenizer, built with `tokenizers`.

  Merges are read from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (49,152
  merges: a 49,408-token vocabulary with `<start_of_text>` 49406 and
  `<end_of_text>` 49407). It equals OpenAI's `SimpleTokenizer` except that
  the text is not passed through `ftfy.fix_text` (which only repairs
  mis-decoded Unicode).

  Args:
    bpe_path: the merges file; None looks in an installed `open_clip_torch`.
    context_length: the text tower's length (77).
  """
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

  path = pathlib.Path(bpe_path) if bpe_path else find_bpe_file()
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    lines = f.read().split('\n')
  merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
  chars = list(_bytes_to_unicode().values())
  vocab = chars + [c + '</w>' for c in chars] + [''.join(m) for m in merges]
  vocab += ['<start_of_text>', '<end_of_text>']
  ids = {tok: i for i, tok in enumerate(vocab)}
  tok = Tokenizer(
    models.BPE(
      vocab=ids,
      merges=merges,
      end_of_word_suffix='</w>',
      continuing_subword_prefix='',
      fuse_unk=False,
    )
  )
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(
        Regex(_CLIP_PATTERN), behavior='removed', invert=True
      ),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  sot, eot = ids['<start_of_text>'], ids['<end_of_text>']
  tok.post_processor = processors.TemplateProcessing(
    single='<start_of_text> $A <end_of_text>',
    special_tokens=[('<start_of_text>', sot), ('<end_of_text>', eot)],
  )
  return text_lib.TextTokenizer(_CleanTokenizer(tok), context_length, 0, 'CLIP')
