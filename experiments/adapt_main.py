r"""Runs test-time adaptation methods over a benchmark stream.

  python -m experiments.adapt_main --config=configs/default.py \
      --workdir=/tmp/tta --config.methods=source,norm,tent \
      --config.setting=continual

Writes WORKDIR/results.{json,md,csv,png}; pretrains the source model first
when WORKDIR holds none. See tta_jax.runners.adapt.

Several processes (hosts) run one benchmark together with jax.distributed:
start the same command once per process with `--coordinator_address=
HOST:PORT --num_processes=N --process_id=I` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment), a shared WORKDIR
holding the source model, and `--config.parallel=seeds` or `domains`; the
vmapped streams are then sharded over every process's devices, and process
0 writes the results. See tta_jax.runners.distributed.
"""

from absl import app

from tta_jax.runners import adapt, cli, distributed


def _initialize() -> None:
  """Joins the processes (before any JAX work); a bad setting is one line."""
  try:
    distributed.initialize_from_flags()
  except ValueError as e:
    cli.fail(str(e))


if __name__ == '__main__':
  distributed.define_flags()
  app.call_after_init(_initialize)
  cli.main(adapt.run, check=adapt.validate_config)
