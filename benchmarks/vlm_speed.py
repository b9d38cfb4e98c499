"""Per-image cost of TLLA, TPT and zero-shot classification, side by side.

For each model, in one run on the same weights and images: the wall time
per image, XLA's FLOP count per image (`compiled.cost_analysis()`) and the
compiled program's memory (`compiled.memory_analysis()`: the arguments it
reads, its outputs and its temporaries, per batch; the TLLA paper reports
the GPU's own peak) of

* zero-shot: one jitted forward of a batch of images (the class prompts
  encoded in the same call, as the model's own call does; the `source`
  method encodes a dual encoder's classes once per stream instead);
* TPT: one jitted `tpt(...).step` on the same batch (per image: 64 views
  through the image tower, confidence selection, the text tower forward
  and backward for the context's gradient, one AdamW step, the text tower
  again and the original view to predict);
* TLLA's test stage: one jitted `stss(...).step` on the same batch (per
  image: 64 views through the image tower, their features against the
  cached text features of the R + 1 contexts, scores, the vote; no text
  tower, no gradient). Its one-off cost, encoding the classes under the
  R + 1 contexts (`init`), is reported apart (`tlla_init_s`);
* the image tower alone on the views (`image_tower`): the cost TPT and
  TLLA share, timed apart so that the rest of each step can be told from
  it (the table's GFLOP/s column is the rate XLA reaches on each program).

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
  python benchmarks/vlm_speed.py --models=vit_b16 --classes=1000  # paper

Absolute numbers depend on the machine and its load; compare the columns
of one run. This is a script, not a test.
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
  p.add_argument('--n_perturbations', type=int, default=16, help='TLLA R')
  p.add_argument('--n_selected', type=int, default=6, help='TLLA s')
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


def _memory_bytes(compiled) -> tuple[float, float]:
  """(temporaries, arguments + outputs + temporaries) of the compiled
  program, from XLA's buffer assignment (`memory_analysis()`). Arguments
  the program does not read are pruned by `jax.jit` and not counted (TLLA's
  step never reads the text tower's weights)."""
  m = compiled.memory_analysis()
  if m is None:
    return math.nan, math.nan
  total = (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    + m.temp_size_in_bytes
    - m.alias_size_in_bytes
  )
  return float(m.temp_size_in_bytes), float(total)


METHODS = ('zero_shot', 'tpt', 'tlla', 'image_tower')


def measure(name, args) -> dict:
  import jax
  import numpy as np

  from configs import common, vlm_digits
  from tta_jax import methods, models
  from tta_jax.methods import stss, tpt

  module, shape = _model(name, args)
  batch = args.batch or (16 if name == 'small' else 1)
  t = time.perf_counter()
  variables = models.init_variables(module, shape, jax.random.key(args.seed))
  init_s = time.perf_counter() - t
  apply_fn = models.make_apply_fn(module, shape)
  images = np.random.default_rng(args.seed).uniform(size=(batch, *shape))
  images = jax.device_put(images.astype(np.float32))
  params, stats = variables['params'], variables['batch_stats']
  # The digits config's views for the small model; for ViT the methods'
  # defaults, the paper's (crops of 8-100 %, flips).
  views = dict(
    n_views=args.n_views, **(vlm_digits.TPT_VIEWS if name == 'small' else {})
  )

  zero_shot = jax.jit(lambda p, s, x: apply_fn(p, s, x).logits)
  # TPT's AdamW as the method configs give it (lr 5e-3, torch's decay 0.01).
  optimizer = methods.make_optimizer(common.method_configs().tpt.optimizer)
  tpt_adapter = tpt.tpt(apply_fn, optimizer, **views)
  tpt_state = tpt_adapter.init(variables, jax.random.key(args.seed))
  tpt_step = jax.jit(lambda s, x: tpt_adapter.step(s, {'image': x})[1].logits)
  tlla = stss.stss(
    apply_fn,
    n_perturbations=args.n_perturbations,
    n_selected=args.n_selected,
    **views,
  )
  tlla_init = jax.jit(tlla.init)
  t = time.perf_counter()
  tlla_state = jax.block_until_ready(
    tlla_init(variables, jax.random.key(args.seed))
  )
  tlla_init_s = time.perf_counter() - t
  tlla_step = jax.jit(lambda s, x: tlla.step(s, {'image': x})[1].logits)
  # The views' shape and count without making them: only the tower runs
  # (jit drops the unused logits, and with them the text tower).
  tower = jax.jit(lambda p, s, x: apply_fn(p, s, x).features['pre_logits'])
  view_batch = jax.numpy.repeat(images, args.n_views, axis=0)
  out = {'model': name, 'batch': batch, 'classes': args.classes}
  out['params_m'] = sum(x.size for x in jax.tree.leaves(params)) / 1e6
  out['init_s'] = init_s
  out['tlla_init_s'] = tlla_init_s  # compile + R + 1 class encodings
  out['tlla_r'], out['tlla_s'] = args.n_perturbations, args.n_selected
  for key, fn, fargs in (
    ('zero_shot', zero_shot, (params, stats, images)),
    ('tpt', tpt_step, (tpt_state, images)),
    ('tlla', tlla_step, (tlla_state, images)),
    ('image_tower', tower, (params, stats, view_batch)),
  ):
    t = time.perf_counter()
    compiled = fn.lower(*fargs).compile()
    out[f'{key}_compile_s'] = time.perf_counter() - t
    out[f'{key}_gflop_per_image'] = _flops(compiled) / 1e9 / batch
    temp, total = _memory_bytes(compiled)
    out[f'{key}_temp_mb'], out[f'{key}_peak_mb'] = temp / 2**20, total / 2**20
    out[f'{key}_s_per_image'] = _time(compiled, fargs, args.repeats) / batch
  out['tpt_over_zero_shot_time'] = out['tpt_s_per_image'] / max(
    out['zero_shot_s_per_image'], 1e-12
  )
  out['tpt_over_tlla_time'] = out['tpt_s_per_image'] / max(
    out['tlla_s_per_image'], 1e-12
  )
  out['tpt_over_tlla_flops'] = out['tpt_gflop_per_image'] / max(
    out['tlla_gflop_per_image'], 1e-12
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
    '| model | classes | batch | method | s/img | GFLOP/img | GFLOP/s '
    '| memory MB | of which temporaries | TPT / method time |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    for m in METHODS:
      print(
        f'| {r["model"]} | {r["classes"]} | {r["batch"]} | {m} '
        f'| {r[f"{m}_s_per_image"]:.4g} '
        f'| {r[f"{m}_gflop_per_image"]:.4g} '
        f'| {r[f"{m}_gflop_per_image"] / r[f"{m}_s_per_image"]:.0f} '
        f'| {r[f"{m}_peak_mb"]:.1f} | {r[f"{m}_temp_mb"]:.1f} '
        f'| {r["tpt_s_per_image"] / r[f"{m}_s_per_image"]:.1f}x |'
      )
  print(
    f'\nTLLA: R = {args.n_perturbations} perturbed contexts, s = '
    f'{args.n_selected} views; its one-off class encoding (init, with '
    'compilation): '
    + ', '.join(f'{r["model"]} {r["tlla_init_s"]:.1f} s' for r in rows)
  )
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'vlm_speed.json').write_text(json.dumps(rows, indent=2))


if __name__ == '__main__':
  main()
