r"""Wall time per test batch: GeneralizeFormer vs Tent vs full generation.

The paper's efficiency table compares the total inference time
of GeneralizeFormer (generated BN affine + classifier), Tent and a variant
generating every layer. Here the three run side by side on one stream of
batches, on the same model and weights: each method's `step` is jitted,
warmed up on the first batch (compile time reported apart), then timed over
the stream, blocking on every batch's logits (the prediction a user waits
for). Reports the median and mean milliseconds per batch and each one's
ratio to Tent.

  python benchmarks/generalizeformer_speed.py                  # digits CNN
  python benchmarks/generalizeformer_speed.py --model=resnet18 \
      --generator=paper --image_size=64 --batch_size=64 --num_batches=10

`--generator=digits` is the generator of `configs/generalizeformer_dg.py`
(2 layers, d_model 128, 32-wide tokens); `paper` is the factory default
(8 layers, d_model 512, 512-wide tokens). Weights are random (the cost does
not depend on them); images are uniform noise. A script, not a test.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
  sys.path.insert(0, str(_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import generalizeformer_dg  # noqa: E402
from tta_jax import models  # noqa: E402
from tta_jax.methods import generalizeformer as gf, tent  # noqa: E402


def _methods(apply_fn, variables, generator):
  """name -> (adapter, meta)."""
  out = {'tent': (tent.tent(apply_fn, optax.adam(1e-3)), None)}
  for name, generate in (
    ('generalizeformer', 'both'),
    ('generalizeformer_all_layers', 'all'),
  ):
    kwargs = {**generator, 'generate': generate}
    phi = gf.init_meta(variables, jax.random.key(1), **kwargs)
    out[name] = (gf.generalizeformer(apply_fn, **kwargs), phi)
  return out


def time_stream(adapter, meta, variables, batches):
  step = jax.jit(adapter.step)
  state = adapter.init(variables, jax.random.key(0))
  t0 = time.perf_counter()
  state, out = step(state, batches[0], meta=meta)
  out.logits.block_until_ready()
  compile_s = time.perf_counter() - t0
  times = []
  for batch in batches[1:]:
    t0 = time.perf_counter()
    state, out = step(state, batch, meta=meta)
    out.logits.block_until_ready()
    times.append(time.perf_counter() - t0)
  return compile_s, times


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--model', default='digits_cnn')
  p.add_argument('--width', type=int, default=8, help='digits_cnn width')
  p.add_argument('--image_size', type=int, default=28)
  p.add_argument('--channels', type=int, default=1)
  p.add_argument('--num_classes', type=int, default=10)
  p.add_argument('--generator', choices=('digits', 'paper'), default='digits')
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--num_batches', type=int, default=30)
  p.add_argument('--out', default='')
  args = p.parse_args()

  kw = {'width': args.width} if args.model == 'digits_cnn' else {}
  module = models.build(args.model, num_classes=args.num_classes, **kw)
  shape = (args.image_size, args.image_size, args.channels)
  variables = models.init_variables(module, shape, jax.random.key(0))
  apply_fn = models.make_apply_fn(module, shape)
  generator = (
    dict(generalizeformer_dg.DIGITS_GENERATOR)
    if args.generator == 'digits'
    else {}
  )
  r = np.random.default_rng(0)
  batches = [
    {'image': r.uniform(size=(args.batch_size, *shape)).astype(np.float32)}
    for _ in range(args.num_batches + 1)
  ]
  rows = {}
  for name, (adapter, meta) in _methods(apply_fn, variables, generator).items():
    compile_s, times = time_stream(adapter, meta, variables, batches)
    rows[name] = {
      'median_ms': 1e3 * statistics.median(times),
      'mean_ms': 1e3 * statistics.mean(times),
      'compile_s': compile_s,
      'generator_params': (
        int(sum(x.size for x in jax.tree.leaves(meta))) if meta else 0
      ),
    }
  base = rows['tent']['median_ms']
  print(
    f'{args.model} {shape}, batch {args.batch_size}, {args.num_batches} '
    f'batches, generator {args.generator}, {jax.devices()[0].platform}'
  )
  print('| method | median ms/batch | mean ms/batch | × Tent | compile s |')
  print('|---|---|---|---|---|')
  for name, row in rows.items():
    print(
      f'| {name} | {row["median_ms"]:.2f} | {row["mean_ms"]:.2f} | '
      f'{row["median_ms"] / base:.2f} | {row["compile_s"]:.1f} |'
    )
  if args.out:
    path = pathlib.Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / 'generalizeformer_speed.json').write_text(
      json.dumps({'args': vars(args), 'rows': rows}, indent=2)
    )


if __name__ == '__main__':
  main()
