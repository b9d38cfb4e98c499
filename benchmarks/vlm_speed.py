r"""Per-image cost of TPT and of zero-shot classification, side by side.

For each model, in one run on the same weights and images: the wall time
per image and XLA's FLOP count per image (`compiled.cost_analysis()`) of

* zero-shot: one jitted forward of a batch of images (the class prompts
  encoded in the same call, as the `source` method does);
* TPT: one jitted `tpt(...).step` on the same batch (per image: 64 views
  through the image tower, confidence selection, the text tower forward
  and backward for the context's gradient, one AdamW step, the text tower
  again and the original view to predict).

Models (random weights: cost does not depend on them):

* `small`: the digits testbed, `vlm_digits` (the digits CNN, width 16, and
  all-MiniLM-L6-v2's architecture: 6 layers, 384 wide), 28x28 grey images,
  10 classes;
* `vit_b16`: CLIP ViT-B/16 (224x224 RGB, a 12-layer 512-wide text
  transformer), `--classes` classes (TLLA's measurement used ImageNet's
  1,000 on a V100: TPT 0.62 s per image).

Class prompts are `--text_len` tokens long (start, 4 context slots, the
name, a full stop, end): the text tower runs to the longest prompt, not to
CLIP's 77 positions (with a causal mask and end-of-text pooling the
positions after the end token change nothing).

  python benchmarks/vlm_speed.py                    # both models
  python benchmarks/vlm_speed.py --models=small --batch=16 --repeats=5

Absolute numbers depend on the machine and its load; compare the two
columns of one run. This is a script, not a test.
"""

import argparse
import json
import math
import pathlib
import platform
import statistics
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', default='small,vit_b16')
  p.add_argument('--classes', type=int, default=10)
  p.add_argument('--text_len', type=int, default=10)
  p.add_argument('--batch', type=int, default=0, help='0: 16 small, 1 ViT')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--n_views', type=int, default=64)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='', help='write <out>/vlm_speed.json')
  return p.parse_args(argv)


def _class_ids(num_classes, length, vocab, sot, eot, seed):
  """Synthetic prompts `[1, K, L]`: start, tokens, end (CLIP's end token
  is its largest id, where the text tower pools)."""
  import numpy as np

  r = np.random.default_rng(seed)
  ids = r.integers(1, min(sot, vocab) - 1, size=(1, num_classes, length))
  ids[..., 0] = sot
  ids[..., -1] = eot
  return ids


def _model(name, args):
  """`(module, input_shape)` with random-weight-ready configuration."""
  from tta_jax.models import vlm
  from tta_jax.models.vision import digits

  if name == 'small':
    text = vlm.bert.BertTextTower()
    # [CLS] ... [SEP]; mean pooling over the non-padding tokens.
    ids = _class_ids(args.classes, args.text_len, 30522, 101, 102, args.seed)
    image = digits.DigitsCNN(num_classes=text.output_dim, width=16)
    mean = std = None
    shape = (28, 28, 1)
  elif name == 'vit_b16':
    a = vlm.clip.ARCHS['ViT-B/16']
    image = vlm.vision_tower(a, quick_gelu=True)  # as clip_classifier
    text = vlm.clip.TextTransformer(
      context_length=a['context_length'],
      vocab_size=a['vocab_size'],
      width=a['text_width'],
      heads=a['text_heads'],
      layers=a['text_layers'],
      output_dim=a['embed_dim'],
    )
    ids = _class_ids(
      args.classes, args.text_len, 49408, 49406, 49407, args.seed
    )
    mean, std = vlm.clip.PIXEL_MEAN, vlm.clip.PIXEL_STD
    shape = (a['image_size'], a['image_size'], 3)
  else:
    raise ValueError(f'unknown model {name!r}; valid: small, vit_b16')
  module = vlm.VLMClassifier(
    image=image,
    text=text,
    n_ctx=4,
    ctx_init=tuple(int(i) for i in ids[0, 0, 1:5]),
    pixel_mean=mean,
    pixel_std=std,
    class_ids=vlm.dual_encoder.as_class_ids(ids),
    use_context=True,
    input_shape=shape,
  )
  return module, shape


def _time(fn, args_, repeats):
  import jax

  jax.block_until_ready(fn(*args_))  # warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args_))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', math.nan))


def measure(name, args) -> dict:
  import jax
  import numpy as np
  import optax

  from tta_jax import models
  from tta_jax.methods import tpt

  module, shape = _model(name, args)
  batch = args.batch or (16 if name == 'small' else 1)
  t = time.perf_counter()
  variables = models.init_variables(module, shape, jax.random.key(args.seed))
  init_s = time.perf_counter() - t
  apply_fn = models.make_apply_fn(module, shape)
  images = np.random.default_rng(args.seed).uniform(size=(batch, *shape))
  images = jax.device_put(images.astype(np.float32))
  params, stats = variables['params'], variables['batch_stats']

  zero_shot = jax.jit(lambda p, s, x: apply_fn(p, s, x).logits)
  adapter = tpt.tpt(
    apply_fn,
    optax.adamw(5e-3, weight_decay=0.01),
    n_views=args.n_views,
    flip=name != 'small',
    crop_scale=(0.3, 1.0) if name == 'small' else (0.08, 1.0),
  )
  state = adapter.init(variables, jax.random.key(args.seed))
  step = jax.jit(lambda s, x: adapter.step(s, {'image': x})[1].logits)
  out = {'model': name, 'batch': batch, 'classes': args.classes}
  out['params_m'] = sum(x.size for x in jax.tree.leaves(params)) / 1e6
  out['init_s'] = init_s
  for key, fn, fargs in (
    ('zero_shot', zero_shot, (params, stats, images)),
    ('tpt', step, (state, images)),
  ):
    t = time.perf_counter()
    compiled = fn.lower(*fargs).compile()
    out[f'{key}_compile_s'] = time.perf_counter() - t
    out[f'{key}_gflop_per_image'] = _flops(compiled) / 1e9 / batch
    out[f'{key}_s_per_image'] = _time(compiled, fargs, args.repeats) / batch
  out['tpt_over_zero_shot_time'] = out['tpt_s_per_image'] / max(
    out['zero_shot_s_per_image'], 1e-12
  )
  return out


def main(argv=None):
  args = _parse(argv)
  sys.path.insert(0, str(_ROOT))
  import jax

  rows = []
  for name in [m.strip() for m in args.models.split(',') if m.strip()]:
    row = measure(name, args)
    rows.append(row)
    print(json.dumps(row), flush=True)
  device = jax.devices()[0]
  print(
    f'\n{device.platform} ({device.device_kind}), {platform.processor()}, '
    f'{args.n_views} views, {args.text_len}-token prompts\n'
  )
  print(
    '| model | classes | batch | zero-shot s/img | zero-shot GFLOP/img '
    '| TPT s/img | TPT GFLOP/img | TPT / zero-shot time |'
  )
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["model"]} | {r["classes"]} | {r["batch"]} '
      f'| {r["zero_shot_s_per_image"]:.4f} '
      f'| {r["zero_shot_gflop_per_image"]:.2f} '
      f'| {r["tpt_s_per_image"]:.3f} | {r["tpt_gflop_per_image"]:.1f} '
      f'| {r["tpt_over_zero_shot_time"]:.0f}x |'
    )
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'vlm_speed.json').write_text(json.dumps(rows, indent=2))


if __name__ == '__main__':
  main()
