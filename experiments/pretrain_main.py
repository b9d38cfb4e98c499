r"""Trains the source model of a benchmark.

  python -m experiments.pretrain_main --config=configs/default.py \
      --workdir=/tmp/tta

Saves WORKDIR/source (orbax variables + metadata.json with the clean
errors); resumable per epoch. See tta_jax.runners.pretrain.
"""

from absl import app, flags
from ml_collections import config_flags

from tta_jax.runners import pretrain

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Config file.', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  pretrain.run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
