r"""Converts a PyTorch checkpoint on disk into a tta_jax source checkpoint.

  python -m experiments.convert_torch_main --checkpoint=Standard.pt \
      --model=wide_resnet28_10 --num_classes=10 --input_shape=32,32,3 \
      --out=$SRC

then `--config.source_ckpt=$SRC`. Layouts (see `tta_jax.models.vision.convert`):
RobustBench `Standard` WRN-28-10 (`wide_resnet28_10`, no normalisation),
torchvision ResNet-18/50 (`resnet18`, `resnet50`, ImageNet mean/std,
`--input_shape=224,224,3`), TTT's BatchNorm ResNet-26 (`resnet26`; TTT
normalises with 0.5: add `--mean=0.5,0.5,0.5 --std=0.5,0.5,0.5`, and set the
same `mean`/`std` lists in `config.model`). Nothing is downloaded: torch only
reads the file (`weights_only=True`). Writes DIR/variables (orbax) and
DIR/metadata.json with the model config the runner checks and the source
file's sha256.
"""

import hashlib
import pathlib

import numpy as np
from absl import app, flags, logging

from tta_jax._src import checkpoint
from tta_jax.models.vision import convert

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'PyTorch checkpoint (.pt/.pth).')
flags.DEFINE_enum('model', None, sorted(convert.LAYOUTS), 'Model name.')
flags.DEFINE_integer('num_classes', None, 'Classifier outputs K.')
flags.DEFINE_list('input_shape', None, 'H,W,C of the images.')
flags.DEFINE_string('out', None, 'Output directory (config.source_ckpt).')
flags.DEFINE_list('mean', None, 'Input mean per channel (model default).')
flags.DEFINE_list('std', None, 'Input std per channel (model default).')
flags.DEFINE_bool('overwrite', False, 'Replace a checkpoint in --out.')
flags.mark_flags_as_required(
  ['checkpoint', 'model', 'num_classes', 'input_shape', 'out']
)

# The originals pool a fixed 8x8 window before `fc`, as our global mean does
# only on 32x32 inputs.
_CIFAR_ONLY = ('wide_resnet28_2', 'wide_resnet28_10', 'resnet26')


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
  """The state dict in a torch checkpoint file, as float32/int numpy."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      'converting PyTorch checkpoints needs torch (CPU build is enough): '
      'pip install "tta_jax[torch]"'
    ) from e
  loaded = torch.load(path, map_location='cpu', weights_only=True)
  state_dict = convert.unwrap_state_dict(loaded)
  arrays = {}
  for key, tensor in state_dict.items():
    t = tensor.detach()
    if t.is_floating_point():
      t = t.float()  # half/bfloat16 checkpoints
    arrays[key] = t.numpy()
  return arrays


def sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  input_shape = [int(d) for d in FLAGS.input_shape]
  if len(input_shape) != 3:
    raise app.UsageError(f'--input_shape must be H,W,C: {FLAGS.input_shape}')
  if FLAGS.model in _CIFAR_ONLY and input_shape[:2] != [32, 32]:
    raise app.UsageError(f'{FLAGS.model} is a 32x32 architecture')
  kwargs = {}
  for name in ('mean', 'std'):
    if getattr(FLAGS, name) is not None:
      kwargs[name] = [float(v) for v in getattr(FLAGS, name)]
  out = pathlib.Path(FLAGS.out)
  if checkpoint.has_variables(out) and not FLAGS.overwrite:
    raise app.UsageError(f'{out} holds a checkpoint; pass --overwrite')

  path = pathlib.Path(FLAGS.checkpoint)
  state_dict = load_torch_state_dict(path)
  variables = convert.from_torch_state_dict(
    FLAGS.model,
    state_dict,
    num_classes=FLAGS.num_classes,
    model_kwargs=kwargs,
    input_shape=input_shape,
  )
  metadata = {
    'model': convert.model_config(FLAGS.model, **kwargs),
    'input_shape': input_shape,
    'num_classes': FLAGS.num_classes,
    'converted_from': {'path': str(path.absolute()), 'sha256': sha256(path)},
  }
  checkpoint.save_variables(out, variables, metadata)
  logging.info(
    'Converted %d tensors of %s into %s (model %s).',
    len(state_dict),
    path,
    out,
    metadata['model'],
  )


if __name__ == '__main__':
  app.run(main)
