r"""Runs test-time adaptation methods over a benchmark stream.

  python -m experiments.adapt_main --config=configs/default.py \
      --workdir=/tmp/tta --config.methods=source,norm,tent \
      --config.setting=continual

Writes WORKDIR/results.{json,md,csv,png}; pretrains the source model first
when WORKDIR holds none. See tta_jax.runners.adapt.
"""

from absl import app, flags
from ml_collections import config_flags

from tta_jax.runners import adapt

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  'config', None, 'Config file.', lock_config=True
)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.config.get('runner') == 'lm':  # language-model configs
    from tta_jax.runners import lm

    lm.run(FLAGS.config, FLAGS.workdir)
  else:
    adapt.run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
