"""A CLIP-style dual encoder with CoOp's learnable prompt context.

`DualEncoder` pairs an image tower and a text tower in one embedding space:
`encode_image` and `encode_text` return L2-normalised features, and
`logit_scale` (stored as its log, as CLIP does, and clipped at 100)
multiplies their cosine similarities. Its `n_ctx` context vectors (CoOp,
Zhou et al. 2022) replace the token embeddings at positions `1..n_ctx` of a
prompt `"[start] X X X X <class>. [end]"`; they are shared by all classes and
initialised from the embedding of a hand prompt ("a photo of a"), so the
initial model is exactly zero-shot CLIP with that prompt.

`VLMClassifier` turns it into an image classifier for the rest of the
library: the class prompts' token ids are fixed at build time, and
`__call__(x, *, bn_mode=None, mask=None)` returns `(logits, features)` like
the vision models. Its parameters are `image` (the image tower), `text` (the
text tower), `prompt/ctx` (the context) and `logit_scale`; a test-time
method that adapts only `prompt/ctx` (TPT) never touches the encoders, and
the `source` method is zero-shot classification.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tta_jax._src import params as params_lib


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class PromptContext(nn.Module):
  """CoOp's `n_ctx` learnable token embeddings `ctx` ([n_ctx, d]).

  `init` is the embedding of the initial words (used when the parameter is
  created); None draws N(0, 0.02^2), CoOp's random initialisation.
  """

  n_ctx: int
  dim: int

  @nn.compact
  def __call__(self, init: jax.Array | None = None) -> jax.Array:
    if init is None:
      fn = nn.initializers.normal(0.02)
      return self.param('ctx', fn, (self.n_ctx, self.dim))
    return self.param('ctx', lambda _: jnp.asarray(init, jnp.float32))


class DualEncoder(nn.Module):
  """Image tower + text tower + CoOp context + logit scale.

  Attributes:
    image: image tower; `image(x, *, bn_mode, mask)` returns `[B, E]` (or
      `(embedding, features)`, as the vision classifiers do, whose head is
      then the projection).
    text: text tower with `embed(ids) -> [..., L, d]` and
      `__call__(embeds, ids) -> [..., E]` and a `token_dim` property.
    n_ctx: number of context vectors (0: none).
    ctx_init: token ids of the words the context starts from (exactly
      `n_ctx` of them); None: random.
    pixel_mean, pixel_std: per-channel image normalisation applied before
      the image tower (None: the tower normalises itself).
    logit_scale_init: initial log of the scale (CLIP: log(1 / 0.07)).
    max_logit_scale: the scale is clipped at this value (CLIP: 100).
  """

  image: nn.Module
  text: nn.Module
  n_ctx: int = 4
  ctx_init: tuple[int, ...] | None = None
  pixel_mean: tuple[float, ...] | None = None
  pixel_std: tuple[float, ...] | None = None
  logit_scale_init: float = math.log(1 / 0.07)
  max_logit_scale: float = 100.0

  def setup(self):
    if self.ctx_init is not None and len(self.ctx_init) != self.n_ctx:
      raise ValueError(
        f'ctx_init has {len(self.ctx_init)} tokens, n_ctx is {self.n_ctx}'
      )
    if self.n_ctx:
      self.prompt = PromptContext(self.n_ctx, self.text.token_dim)
    self.log_scale = self.param(
      'logit_scale', nn.initializers.constant(self.logit_scale_init), ()
    )

  def context(self) -> jax.Array:
    """The context vectors `[n_ctx, d]`."""
    if not self.n_ctx:
      raise ValueError('this dual encoder has no context vectors (n_ctx=0)')
    init = None
    if self.ctx_init is not None:
      init = self.text.embed(jnp.asarray(self.ctx_init, jnp.int32))
    return self.prompt(init)

  def logit_scale(self) -> jax.Array:
    """exp(logit_scale), clipped at `max_logit_scale`."""
    return jnp.minimum(jnp.exp(self.log_scale), self.max_logit_scale)

  def encode_image(
    self, x: jax.Array, *, bn_mode=None, mask=None, normalize: bool = True
  ) -> jax.Array:
    """Image features `[B, E]` of images in [0, 1]."""
    if self.pixel_mean is not None:
      x = (x - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
    out = self.image(x, bn_mode=bn_mode, mask=mask)
    if isinstance(out, tuple):
      out = out[0]
    return l2_normalize(out) if normalize else out

  def encode_text(
    self,
    ids: jax.Array,
    *,
    use_context: bool = False,
    ctx: jax.Array | None = None,
    normalize: bool = True,
  ) -> jax.Array:
    """Text features `[..., E]` of token ids `[..., L]`.

    With `use_context`, the embeddings at positions `1..n_ctx` are replaced
    by the context vectors (`ctx` if given, e.g. a perturbed copy, else the
    parameter).
    """
    embeds = self.text.embed(ids)
    if use_context:
      if ctx is None:
        ctx = self.context()
      n = self.n_ctx
      ctx = jnp.broadcast_to(ctx, (*embeds.shape[:-2], n, embeds.shape[-1]))
      embeds = embeds.at[..., 1 : 1 + n, :].set(ctx.astype(embeds.dtype))
    out = self.text(embeds, ids)
    return l2_normalize(out) if normalize else out

  def __call__(self, images, ids, *, use_context: bool = False):
    """CLIP's image-to-text logits `[B, N]` (scale * cosine)."""
    img = self.encode_image(images)
    txt = self.encode_text(ids, use_context=use_context)
    return self.logit_scale() * img @ txt.T


def _nested(ids) -> tuple:
  """A hashable nested tuple of ints from an int array or nested lists."""
  if hasattr(ids, 'tolist'):
    ids = ids.tolist()
  if isinstance(ids, (list, tuple)):
    return tuple(_nested(i) for i in ids)
  return int(ids)


class VLMClassifier(DualEncoder):
  """Zero-shot / CoOp classifier over a fixed class list.

  Attributes (beyond `DualEncoder`'s):
    class_ids: the class prompts' token ids, `[T, K, L]` nested tuples
      (build them with `tta_jax.models.vlm.text`); with `use_context`,
      `T = 1` and positions `1..n_ctx` are the context slots.
    use_context: prompts carry the context vectors (CoOp, TPT); False:
      hand prompts, the class feature the mean of the `T` templates'
      normalised features, renormalised (CLIP's prompt ensemble).
    input_shape: `(H, W, C)`; calls with other images fail.
  """

  class_ids: tuple = ()
  use_context: bool = True
  input_shape: tuple[int, ...] | None = None

  def class_text_features(self, ctx: jax.Array | None = None) -> jax.Array:
    """The classes' normalised text features `[K, E]`.

    `ctx` overrides the context parameter (perturbed prompts, TLLA).
    """
    ids = jnp.asarray(self.class_ids, jnp.int32)
    if ids.ndim != 3 or ids.shape[1] == 0:
      raise ValueError(
        'class_ids must be [templates, classes, tokens] with at least one '
        f'class; got shape {ids.shape}'
      )
    if self.use_context:
      if ids.shape[0] != 1:
        raise ValueError('context prompts take one template (class_ids[0])')
      return self.encode_text(ids[0], use_context=True, ctx=ctx)
    feats = self.encode_text(ids)  # [T, K, E], normalised per template
    return l2_normalize(jnp.mean(feats, axis=0))

  def logits_from_features(
    self, image_features: jax.Array, text_features: jax.Array
  ) -> jax.Array:
    """scale * image_features @ text_features^T ([..., K])."""
    return self.logit_scale() * image_features @ text_features.T

  def __call__(self, x, *, bn_mode=None, mask=None):
    if x.ndim != 4:
      raise ValueError(f'images must be [B, H, W, C], got shape {x.shape}')
    if self.input_shape is not None and tuple(x.shape[1:]) != tuple(
      self.input_shape
    ):
      raise ValueError(
        f'images have shape {tuple(x.shape)}; this model expects '
        f'[B, {", ".join(map(str, self.input_shape))}]'
      )
    img = self.encode_image(x, bn_mode=bn_mode, mask=mask)
    logits = self.logits_from_features(img, self.class_text_features())
    return logits, {'pre_logits': img}


# Selects `prompt/ctx`, the context vectors (what CoOp and TPT train).
context_mask = params_lib.by_regex('^prompt/ctx$')


def as_class_ids(class_ids: Sequence) -> tuple:
  """`class_ids` (an array or nested lists) as the nested tuple a
  `VLMClassifier` attribute must be (hashable)."""
  return _nested(class_ids)
