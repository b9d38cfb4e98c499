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

from absl import app, flags

from tta_jax.models import vlm
from tta_jax.models.vlm import clip_convert

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    clip_convert.convert(
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
