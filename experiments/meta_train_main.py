r"""Meta-trains the methods that learn before they adapt.

  python -m experiments.meta_train_main \
      --config=configs/generalizeformer_dg.py --workdir=/tmp/gf

Trains the source model(s) first when WORKDIR holds none (one per held-out
domain for leave-one-domain-out configs), then runs every meta-trainer in
`config.meta_methods`; `experiments.adapt_main` with the same config and
workdir evaluates them. See tta_jax.runners.train.
"""

from absl import app, flags
from ml_collections import config_flags

from tta_jax.runners import train

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

    lm.train(FLAGS.config, FLAGS.workdir)
  else:
    train.run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
