"""LiT: train an image tower against a locked, pretrained text tower.

Zhai et al. (CVPR 2022) lock a pretrained tower and train the other
contrastively. Here the locked tower is the text tower (all-MiniLM-L6-v2)
and the image tower (the digits CNN or a small ViT) learns to map labelled
source digits onto the text features of varied captions of them, with the
symmetric InfoNCE loss of CLIP and a learnable temperature. Captions name
the class as a word or a numeral, in several templates ("a photo of the
digit seven", "a handwritten 7", "a thin seven", ...), and their style
words describe the augmentation the image received (thick or thin strokes,
rotated, small, large, off-centre), so the text space carries the style as
well as the class and a learned prompt context has something to encode.
The augmentations are geometric and morphological only: none of them is a
corruption of the test stream (noise, blur, contrast, ...).

Because the text tower is locked, every caption's feature is computed once
before training (the caption bank); a step costs one image-tower forward
and backward. The result is the dual encoder's source model: zero-shot
classification with the hand prompt "a photo of a <class>." works on it.
"""

import functools
import itertools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tta_jax._src import augment, losses
from tta_jax.models import vlm
from tta_jax.models.vision import layers
from tta_jax.trainers import base

# Augmentation families, each with its style words ('' for none).
STYLES = {
  'plain': ('', 'handwritten', 'centered', 'upright'),
  'thick': ('thick', 'bold', 'heavy'),
  'thin': ('thin', 'light', 'narrow'),
  'rotated': ('rotated', 'tilted', 'slanted'),
  'small': ('small', 'tiny'),
  'large': ('large', 'big'),
  'shifted': ('off-center', 'shifted'),
}
# Templates with a style word ({s}) and without; {c} is the class.
STYLED_TEMPLATES = (
  'a photo of a {s} {c}.',
  'a {s} handwritten {c}.',
  'a {s} digit {c}.',
  'a {s} drawing of the number {c}.',
  'an image of a {s} {c}.',
)
PLAIN_TEMPLATES = (
  'a photo of the digit {c}.',
  'the number {c}.',
  'a handwritten {c}.',
  'a picture of a {c}.',
)
NUMERALS = tuple(str(i) for i in range(10))


class CaptionBank(NamedTuple):
  texts: list[str]
  label: np.ndarray  # [N] class
  style: np.ndarray  # [N] index into STYLES, or -1 (style-free template)


def caption_bank(classnames, numerals=None) -> CaptionBank:
  """Every caption: templates x class forms (name, numeral) x style words."""
  forms = [[c] for c in classnames]
  if numerals is not None:
    forms = [[c, n] for c, n in zip(classnames, numerals, strict=True)]
  texts, label, style = [], [], []
  for k, names in enumerate(forms):
    for c in names:
      for t in PLAIN_TEMPLATES:
        texts.append(t.format(c=c))
        label.append(k)
        style.append(-1)
      for (s, (_, words)), t in itertools.product(
        enumerate(STYLES.items()), STYLED_TEMPLATES
      ):
        for w in words:
          texts.append(' '.join(t.format(s=w, c=c).split()))
          label.append(k)
          style.append(s)
  return CaptionBank(texts, np.asarray(label), np.asarray(style))


def _augment_one(image, style, u):
  """The augmentation of family `style` (an index into STYLES) of one
  `[H, W, C]` digit; `u`: 6 uniforms."""
  names = list(STYLES)
  sign = jnp.where(u[0] < 0.5, -1.0, 1.0)
  angle = jnp.where(
    style == names.index('rotated'),
    sign * (15.0 + 25.0 * u[1]),
    8.0 * (2 * u[1] - 1),
  )
  scale = jnp.select(
    [style == names.index('small'), style == names.index('large')],
    [0.55 + 0.25 * u[2], 1.15 + 0.2 * u[2]],
    0.9 + 0.2 * u[2],
  )
  direction = 2 * jnp.pi * u[3]
  far = 3.0 + 2.0 * u[4]
  near = 2.0 * (2 * u[3:5] - 1)
  shift = jnp.where(
    style == names.index('shifted'),
    far * jnp.stack([jnp.cos(direction), jnp.sin(direction)]),
    near,
  )
  x = augment.affine_warp(image, angle=angle, scale=scale, shift=shift)
  pad = ((1, 1), (1, 1), (0, 0))
  dilated = jax.lax.reduce_window(
    jnp.pad(x, pad), -jnp.inf, jax.lax.max, (3, 3, 1), (1, 1, 1), 'VALID'
  )
  eroded = jax.lax.reduce_window(
    jnp.pad(x, ((0, 1), (0, 1), (0, 0)), constant_values=1.0),
    jnp.inf,
    jax.lax.min,
    (2, 2, 1),
    (1, 1, 1),
    'VALID',
  )
  x = jnp.where(style == names.index('thick'), dilated, x)
  x = jnp.where(style == names.index('thin'), eroded, x)
  return jnp.clip(x, 0.0, 1.0)


def augment_batch(images, styles, key):
  """`_augment_one` over a batch (one key per row)."""
  u = jax.random.uniform(key, (images.shape[0], 6))
  return jax.vmap(_augment_one)(images, styles, u)


def encode_captions(module, variables, texts, chunk=256) -> jax.Array:
  """The text features `[N, E]` of `texts` (normalised), in chunks."""
  tok = vlm.tokenizer_for(module)
  fn = jax.jit(
    lambda v, ids: module.apply(v, ids, method=lambda m, i: m.encode_text(i))
  )
  length = max(len(tok.ids(t)) for t in texts)
  out = []
  for start in range(0, len(texts), chunk):
    ids = tok.encode(texts[start : start + chunk], length=length)
    out.append(fn(variables, jnp.asarray(ids)))
  return jnp.concatenate(out)


def clip_loss(image_features, text_features, scale):
  """CLIP's symmetric InfoNCE over the batch's matching pairs."""
  logits = scale * image_features @ text_features.T
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (
    losses.cross_entropy(logits, labels).mean()
    + losses.cross_entropy(logits.T, labels).mean()
  )


@functools.partial(jax.jit, static_argnums=0)
def _predict(apply_fn, variables, images):
  logits = apply_fn(variables['params'], variables['batch_stats'], images)
  return jnp.argmax(logits.logits, -1)


def zero_shot_accuracy(apply_fn, variables, source, batch_size=500) -> float:
  """Top-1 accuracy of the classifier (its class prompts) on `source`.

  Compiled once per model and batch shape: the before/after and per-domain
  evaluations of a trainer reuse the program.
  """
  correct = 0
  for start in range(0, len(source), batch_size):
    batch = source[np.arange(start, min(start + batch_size, len(source)))]
    pred = np.asarray(_predict(apply_fn, variables, batch['image']))
    correct += int(np.sum(pred == batch['label']))
  return correct / max(len(source), 1)


def _trainable(params):
  return {k: v for k, v in params.items() if k in ('image', 'logit_scale')}


# The settings `train` reads (`config.pretrain`, beside its `trainer`).
SETTINGS = frozenset({
  'steps', 'batch_size', 'learning_rate', 'warmup_steps', 'weight_decay',
  'bn_momentum', 'plain_fraction', 'styled_fraction', 'numerals',
  'text_init', 'checkpoint_every',
})  # fmt: skip


def train(ctx: base.TrainContext) -> base.TrainResult:
  """LiT training of `ctx.module`'s image tower and logit scale.

  `ctx.hparams`: `steps`, `batch_size`, `learning_rate` (AdamW, cosine
  decay after `warmup_steps` of linear warmup), `weight_decay`,
  `bn_momentum` (BN running statistics EMA), `plain_fraction` (images left
  in the plain family), `styled_fraction` (captions with a style word;
  the rest use a style-free template), `numerals` (captions also name the
  class as a digit), `text_init` (`'pretrained'`: load all-MiniLM-L6-v2
  into the text tower first; `'keep'`: use `ctx.variables` as they are),
  `checkpoint_every`.

  Returns:
    The trained variables and metrics (final loss, zero-shot accuracy on
    the source-val domains, the caption count).
  """
  hp = ctx.hparams
  module = ctx.module
  variables = dict(ctx.variables)
  if hp.text_init == 'pretrained':
    variables = vlm.load_pretrained_text(module, variables)
  elif hp.text_init != 'keep':
    raise ValueError(
      f'lit: text_init must be pretrained or keep: {hp.text_init!r}'
    )
  # The class names the model's prompts hold (the builder's default if the
  # model config names none).
  classnames = list(ctx.model_config.get('classnames') or vlm.DIGIT_CLASSNAMES)
  if len(classnames) != ctx.num_classes:
    raise ValueError(
      f'lit: {len(classnames)} class names for {ctx.num_classes} classes'
    )
  bank = caption_bank(classnames, NUMERALS if hp.numerals else None)
  t0 = time.perf_counter()
  bank_features = encode_captions(module, variables, bank.texts)
  logging.info(
    'lit: %d captions encoded in %.0fs',
    len(bank.texts),
    time.perf_counter() - t0,
  )
  # Caption candidates per (class, family): styled ones, and style-free.
  n_styles = len(STYLES)
  styled = [
    [
      np.flatnonzero((bank.label == k) & (bank.style == s))
      for s in range(n_styles)
    ]
    for k in range(ctx.num_classes)
  ]
  plain = [
    np.flatnonzero((bank.label == k) & (bank.style == -1))
    for k in range(ctx.num_classes)
  ]

  source = ctx.source_domains[0].source
  data = source[np.arange(len(source))]
  images, labels = data['image'], data['label']
  n = len(labels)
  if n < hp.batch_size:
    raise ValueError(f'lit: {n} source images, fewer than one batch')

  schedule = optax.warmup_cosine_decay_schedule(
    0.0, hp.learning_rate, hp.warmup_steps, hp.steps
  )
  tx = optax.adamw(schedule, weight_decay=hp.weight_decay)
  params = variables['params']
  state = {
    'params': _trainable(params),
    'batch_stats': variables['batch_stats'],
    'opt_state': tx.init(_trainable(params)),
    'step': np.int32(0),
  }
  saved_at, restored = ctx.checkpointer.restore_latest(state)
  if saved_at is not None:
    state = restored
    logging.info('lit: resuming at step %d', int(state['step']))
  frozen = {k: v for k, v in params.items() if k not in state['params']}
  momentum = hp.bn_momentum

  def loss_fn(trainable, batch_stats, x, text):
    full = {**frozen, **trainable}

    def encode(m, x):
      return m.encode_image(x, bn_mode=layers.BATCH), m.logit_scale()

    (img, scale), new = module.apply(
      {'params': full, 'batch_stats': batch_stats},
      x,
      method=encode,
      mutable=['batch_stats'],
    )
    return clip_loss(img, text, scale), (new.get('batch_stats', {}), scale)

  @jax.jit
  def step(state, x, styles, caption_ids, key):
    x = augment_batch(x, styles, key)
    text = bank_features[caption_ids]
    (loss, (stats, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state['params'], state['batch_stats'], x, text
    )
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    ema = jax.tree.map(
      lambda s, b: momentum * s + (1 - momentum) * b,
      state['batch_stats'],
      stats,
    )
    new = {
      'params': optax.apply_updates(state['params'], updates),
      'batch_stats': ema,
      'opt_state': opt_state,
      'step': state['step'] + 1,
    }
    return new, loss, scale

  def sample(i):
    """Images, families and captions of step `i` (numpy, seeded by i)."""
    r = np.random.default_rng([ctx.seed, i])
    idx = r.choice(n, hp.batch_size, replace=False)
    styles = np.where(
      r.uniform(size=hp.batch_size) < hp.plain_fraction,
      0,
      r.integers(1, n_styles, hp.batch_size),
    )
    use_style = r.uniform(size=hp.batch_size) < hp.styled_fraction
    caps = np.empty(hp.batch_size, np.int32)
    for j, (k, s, u) in enumerate(
      zip(labels[idx], styles, use_style, strict=True)
    ):
      pool = styled[k][s] if u else plain[k]
      caps[j] = pool[r.integers(len(pool))]
    return images[idx], styles.astype(np.int32), caps

  key = jax.random.fold_in(ctx.rng, 7)
  loss = scale = float('nan')
  t0 = time.perf_counter()
  for i in range(int(state['step']), hp.steps):
    x, styles, caps = sample(i)
    state, loss, scale = step(
      state, x, styles, caps, jax.random.fold_in(key, i)
    )
    if ctx.log_every and (i + 1) % ctx.log_every == 0:
      logging.info(
        'lit step %d/%d: loss %.4f, scale %.1f (%.0fs)',
        i + 1,
        hp.steps,
        float(loss),
        float(scale),
        time.perf_counter() - t0,
      )
    if hp.checkpoint_every and (i + 1) % hp.checkpoint_every == 0:
      ctx.checkpointer.save(i + 1, state)
  trained = {
    'params': {**frozen, **state['params']},
    'batch_stats': state['batch_stats'],
  }
  metrics = {
    'loss': float(loss),
    'logit_scale': float(scale),
    'captions': len(bank.texts),
  }
  for d in ctx.val_domains:
    metrics[f'{d.name}_zero_shot_accuracy'] = zero_shot_accuracy(
      ctx.apply_fn, trained, d.source
    )
  if ctx.val_domains:
    metrics['val_accuracy'] = metrics[
      f'{ctx.val_domains[0].name}_zero_shot_accuracy'
    ]
  return base.TrainResult(variables=trained, metrics=metrics)
