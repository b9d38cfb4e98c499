"""One benchmark over several processes: `jax.distributed` and its flags.

A binary started as N processes (one per host, or several on one host)
joins them with `jax.distributed.initialize` before any JAX work. The
coordinator's address, the number of processes and this process's id come
from the flags `--coordinator_address`, `--num_processes` and
`--process_id`, or from the environment variables JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (a flag wins). Without a coordinator
address the binary runs as one process, as always. CPU processes exchange
data through JAX's gloo collectives.

After `initialize`, `jax.devices()` lists the devices of every process:
the runners then shard the K vmapped streams over all of them
(`streams.StreamShardings`; K a multiple of the device count). Each
process feeds its devices' streams and holds all the scores. Every process
reads the same workdir (a filesystem they share), whose source model must
exist before the run (`check_source`); only the first process writes
there (results, method records, TensorBoard). Stream checkpoints are off.
"""

import os

import jax
from absl import flags, logging

from tta_jax.runners import artifacts

COORDINATOR_ENV = 'JAX_COORDINATOR_ADDRESS'
NUM_PROCESSES_ENV = 'JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'JAX_PROCESS_ID'


def define_flags() -> None:
  """The three flags of a multi-process run (defaults: the environment)."""
  flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0 for a multi-process run (jax.distributed); '
    f'default: ${COORDINATOR_ENV}. Unset: one process.',
  )
  flags.DEFINE_integer(
    'num_processes',
    None,
    'Number of processes of a multi-process run; default: '
    f'${NUM_PROCESSES_ENV}.',
  )
  flags.DEFINE_integer(
    'process_id',
    None,
    f'This process, 0 to num_processes - 1; default: ${PROCESS_ID_ENV}.',
  )


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, '').strip()
  if not value:
    return None
  if not value.lstrip('-').isdigit():
    raise ValueError(f'${name} must be an integer, got {value!r}')
  return int(value)


def settings(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> tuple[str, int, int] | None:
  """`(address, num_processes, process_id)` from arguments or environment,
  or None for a single-process run; a one-line error when incomplete."""
  address = coordinator_address or os.environ.get(COORDINATOR_ENV) or None
  if num_processes is None:
    num_processes = _env_int(NUM_PROCESSES_ENV)
  if process_id is None:
    process_id = _env_int(PROCESS_ID_ENV)
  if address is None:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError(
        'a multi-process run needs --coordinator_address (or '
        f'${COORDINATOR_ENV}) beside --num_processes and --process_id'
      )
    return None
  if num_processes is None or process_id is None:
    raise ValueError(
      f'--coordinator_address={address} needs --num_processes and '
      f'--process_id (or ${NUM_PROCESSES_ENV} and ${PROCESS_ID_ENV})'
    )
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(
      f'--process_id must be in [0, --num_processes), got {process_id} of '
      f'{num_processes}'
    )
  if ':' not in address:
    raise ValueError(f'--coordinator_address must be host:port, got {address}')
  return address, num_processes, process_id


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Joins the processes of a multi-process run (before any JAX work).

  Returns False (and does nothing) for a single-process run.
  """
  found = settings(coordinator_address, num_processes, process_id)
  if found is None:
    return False
  address, num_processes, process_id = found
  # CPU processes exchange arrays through gloo (JAX's CPU collectives; the
  # default of recent JAX versions, set here so that older defaults, which
  # had none, do not leave multi-process CPU runs without collectives).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
    coordinator_address=address,
    num_processes=num_processes,
    process_id=process_id,
  )
  logging.info(
    'Process %d of %d (coordinator %s): %d local of %d devices',
    jax.process_index(),
    jax.process_count(),
    address,
    jax.local_device_count(),
    jax.device_count(),
  )
  return True


def initialize_from_flags() -> bool:
  """`initialize` with the flags of `define_flags` (after flag parsing)."""
  fl = flags.FLAGS
  return initialize(fl.coordinator_address, fl.num_processes, fl.process_id)


def is_multiprocess() -> bool:
  """True in a run of several processes (after `initialize`)."""
  return jax.process_count() > 1


def is_primary() -> bool:
  """True in the process that writes results (the first one)."""
  return jax.process_index() == 0


def on_primary(fn, *args):
  """`fn(*args)` in the first process only (the one that writes)."""
  if is_primary():
    fn(*args)


def check_source(config, workdir) -> None:
  """A run of several processes uses an existing source model: it never
  trains one (every process would)."""
  if is_multiprocess() and not artifacts.has_source(config, workdir):
    raise FileNotFoundError(
      f'no source model in {artifacts.source_dir(config, workdir)}: a run '
      'of several processes does not train one; run experiments.'
      'pretrain_main first (one process, same config and workdir) or set '
      'config.source_ckpt'
    )
