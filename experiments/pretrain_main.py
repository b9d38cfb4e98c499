r"""Trains the source model of a benchmark.

  python -m experiments.pretrain_main --config=configs/default.py \
      --workdir=/tmp/tta

Saves WORKDIR/source (orbax variables + metadata.json with the clean
errors); resumable per epoch. See tta_jax.runners.pretrain.
"""

from tta_jax.runners import cli, pretrain

if __name__ == '__main__':
  cli.main(pretrain.run)
