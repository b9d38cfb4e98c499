r"""Meta-trains the methods that learn before they adapt.

  python -m experiments.meta_train_main \
      --config=configs/generalizeformer_dg.py --workdir=/tmp/gf

Trains the source model(s) first when WORKDIR holds none (one per held-out
domain for leave-one-domain-out configs), then runs every meta-trainer in
`config.meta_methods`; `experiments.adapt_main` with the same config and
workdir evaluates them. See tta_jax.runners.train.
"""

from tta_jax.runners import cli, train

if __name__ == '__main__':
  cli.main(train.run, check=train.validate_config)
