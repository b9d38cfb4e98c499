r"""Runs test-time adaptation methods over a benchmark stream.

  python -m experiments.adapt_main --config=configs/default.py \
      --workdir=/tmp/tta --config.methods=source,norm,tent \
      --config.setting=continual

Writes WORKDIR/results.{json,md,csv,png}; pretrains the source model first
when WORKDIR holds none. See tta_jax.runners.adapt.
"""

from tta_jax.runners import adapt, cli

if __name__ == '__main__':
  cli.main(adapt.run, check=adapt.validate_config)
