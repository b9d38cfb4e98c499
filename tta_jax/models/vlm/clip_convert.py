"""A CLIP checkpoint on disk as a tta_jax source checkpoint.

`convert(path, out)` reads OpenAI's released archives (TorchScript, needs
torch) or OpenCLIP checkpoints of the same layouts (`.safetensors` without
torch, pickled `.bin` / `.pt` state dicts), infers the architecture from
the tensor shapes and writes `out/variables` (orbax) and
`out/metadata.json`, whose model config (`model_config`) is what the
runners rebuild and check against `config.model`. The binary is
`experiments/convert_clip_main.py`.
"""

import hashlib
import pathlib
from typing import Any

from absl import logging

from tta_jax._src import checkpoint
from tta_jax.models import vlm
from tta_jax.models.vlm import clip, clip_import


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
