r"""Converts a CLIP checkpoint on disk into a tta_jax source checkpoint.

  python -m experiments.convert_clip_main --checkpoint=ViT-B-16.pt \
      --classnames=imagenet --out=$SRC

then `--config.source_ckpt=$SRC` with `configs/vlm_imagenet.py`. Reads
OpenAI's released archives (`RN50.pt`, `ViT-B-16.pt`: TorchScript, needs
torch) and OpenCLIP checkpoints of the same layouts (`.safetensors` without
torch, or pickled `.bin` / `.pt` state dicts); the architecture comes from
the tensor shapes (`clip_import.infer_arch`). Writes DIR/variables (orbax:
both towers, the logit scale and the prompt context initialised from "a
photo of a") and DIR/metadata.json whose model config
(`{'name': 'vlm_clip', 'arch': 'ViT-B/16' | 'RN50', 'classnames':
'imagenet', 'quick_gelu': ...}`, plus `arch_overrides` for any other size)
is what the runner rebuilds and checks against `config.model`.

`--quick_gelu` (default) is OpenAI's activation, right for OpenAI's
checkpoints and OpenCLIP's `-quickgelu` models; pass `--noquick_gelu` for
OpenCLIP's GELU models (e.g. `ViT-B-16` trained on LAION-2B). Nothing is
downloaded.
"""

import hashlib
import pathlib
from typing import Any

from absl import app, flags, logging

from tta_jax._src import checkpoint
from tta_jax.models import vlm
from tta_jax.models.vlm import clip, clip_import

FLAGS = flags.FLAGS
flags.DEFINE_string(
  'checkpoint', None, 'CLIP checkpoint (.pt, .bin, .safetensors).'
)
flags.DEFINE_enum(
  'classnames',
  'imagenet',
  sorted(vlm.imagenet.NAMED_CLASSNAMES),
  'The packaged class list the prompts name.',
)
flags.DEFINE_string('out', None, 'Output directory (config.source_ckpt).')
flags.DEFINE_bool(
  'quick_gelu', True, "OpenAI's QuickGELU (False: OpenCLIP's GELU models)."
)
flags.DEFINE_bool('overwrite', False, 'Replace a checkpoint in --out.')
flags.mark_flags_as_required(['checkpoint', 'out'])


def _sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def model_config(
  arch: dict[str, Any], classnames: str, quick_gelu: bool
) -> dict[str, Any]:
  """The `vlm_clip` model config of a checkpoint of architecture `arch`
  (`clip_import.infer_arch`): a published size by name, any other as the
  same family with `arch_overrides`."""
  config: dict[str, Any] = {'name': 'vlm_clip'}
  for name, published in clip.ARCHS.items():
    if all(arch[k] == published[k] for k in arch):
      config['arch'] = name
      break
  else:
    config['arch'] = 'RN50' if arch['patch_size'] is None else 'ViT-B/16'
    config['arch_overrides'] = {
      k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()
    }
  config.update(classnames=classnames, quick_gelu=quick_gelu)
  return config


def convert(
  path: str | pathlib.Path,
  out: str | pathlib.Path,
  *,
  classnames: str = 'imagenet',
  quick_gelu: bool = True,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes the source checkpoint of CLIP checkpoint `path` into `out`;
  returns its metadata."""
  out, path = pathlib.Path(out), pathlib.Path(path)
  if checkpoint.has_variables(out) and not overwrite:
    raise ValueError(f'{out} holds a checkpoint; pass --overwrite')
  state = clip_import.read_state_dict(path)
  config = model_config(clip_import.infer_arch(state), classnames, quick_gelu)
  module = vlm.clip_classifier(
    **{k: v for k, v in config.items() if k != 'name'}
  )
  variables = clip_import.load_variables(module, state)
  metadata = {
    **checkpoint.model_metadata(
      config, module.input_shape, len(module.class_ids[0])
    ),
    'converted_from': {
      'path': str(path.absolute()),
      'sha256': _sha256(path),
    },
  }
  checkpoint.save_variables(out, variables, metadata)
  logging.info(
    'Converted %d tensors of %s into %s (model %s).',
    len(state),
    path,
    out,
    {k: v for k, v in config.items() if k != 'arch_overrides'},
  )
  return metadata


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    convert(
      FLAGS.checkpoint,
      FLAGS.out,
      classnames=FLAGS.classnames,
      quick_gelu=FLAGS.quick_gelu,
      overwrite=FLAGS.overwrite,
    )
  except ValueError as e:
    raise app.UsageError(str(e)) from e


if __name__ == '__main__':
  app.run(main)
