r"""Throughput of K vmapped adaptation streams vs K streams one by one.

Side by side in one run, on the same machine state: one jitted step over a
[K, B, ...] stack of batches (vmap over K independent states, laid out as
the runner lays them out, frozen leaves shared, and with every leaf
stacked) against K jitted steps over [B, ...] batches, and a batch
sharded over the host's devices against one device.

  python benchmarks/stream_throughput.py --method=tent --batch_size=64 \
      --streams=1,4,15 --devices=2

`--devices` sets XLA's host-platform device count before JAX starts (CPU).
Prints a markdown table of examples/s (median of --repeats timed runs after
warm-up).
"""

import argparse
import os
import statistics
import sys
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--method', default='tent')
  p.add_argument('--model', default='digits_cnn')
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--streams', default='1,4,15')
  p.add_argument('--steps', type=int, default=10, help='steps per timed run')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument(
    '--devices',
    type=int,
    default=0,
    help='host devices (CPU only; 0 leaves XLA_FLAGS alone)',
  )
  return p.parse_args()


def main():
  args = _parse()
  sys.path.insert(0, os.path.dirname(__file__))
  import step_speed  # benchmarks/step_speed.py

  step_speed.set_host_devices(args.devices)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from configs import common
  from tta_jax import methods, models
  from tta_jax.runners import streams as runner_streams

  shape = {'digits_cnn': (28, 28, 1)}.get(args.model, (32, 32, 3))
  module = models.build(args.model, num_classes=10)
  apply_fn = models.make_apply_fn(module, shape)
  variables = models.init_variables(module, shape, jax.random.key(0))
  cfg = common.method_configs()[args.method].to_dict()
  name = cfg.pop('method', args.method)
  adapter = methods.from_config(
    name,
    cfg,
    apply_fn,
    source_images=np.random.default_rng(0)
    .uniform(size=(64, *shape))
    .astype(np.float32),
  )
  b = args.batch_size
  rng = np.random.default_rng(0)

  def timed(fn, state, batch):
    state, out = fn(state, batch)  # compile + warm-up
    jax.block_until_ready(out)
    times = []
    for _ in range(args.repeats):
      t = time.perf_counter()
      for _ in range(args.steps):
        state, out = fn(state, batch)
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t)
    return statistics.median(times)

  def copy(tree):
    return jax.tree.map(jnp.copy, tree)

  state0 = adapter.init(variables, jax.random.key(1))
  step = jax.jit(adapter.step, donate_argnums=(0,))
  rows = []
  for k in [int(x) for x in args.streams.split(',')]:
    images = rng.uniform(size=(k, b, *shape)).astype(np.float32)
    # K streams one by one: K jitted calls per stream step.
    states = [copy(state0) for _ in range(k)]

    def sequential(states, images):
      outs = []
      for i in range(k):
        states[i], out = step(states[i], {'image': images[i]})
        outs.append(out)
      return states, outs

    t_seq = timed(sequential, states, images)
    # As the runner lays out K streams (`runners.streams.initial_state`):
    # frozen leaves shared, so a convolution sees one kernel and a K*B
    # batch; and, for comparison, every leaf stacked (K kernels: grouped
    # convolutions).
    t_vmap = {}
    for layout in ('shared', 'stacked'):
      if layout == 'shared' and k > 1:
        stacked, axes = runner_streams.initial_state(
          adapter, variables, [jax.random.key(1)] * k
        )
      else:
        axes = jax.tree.map(lambda _: 0, state0)
        stacked = jax.tree.map(lambda x: jnp.stack([x] * k), state0)
      vstep = jax.jit(
        jax.vmap(
          lambda s, x: adapter.step(s, {'image': x}), (axes, 0), (axes, 0)
        ),
        donate_argnums=(0,),
      )
      t_vmap[layout] = timed(vstep, stacked, images)
    n = k * b * args.steps
    rows.append((k, n / t_seq, n / t_vmap['shared'], n / t_vmap['stacked']))

  print(
    f'\n{args.method} on {args.model}, batch {b}, '
    f'{jax.device_count()} device(s), backend {jax.default_backend()}'
  )
  print(
    '| streams K | one by one (ex/s) | vmapped, frozen leaves shared (ex/s) '
    '| speed-up | vmapped, every leaf stacked (ex/s) | speed-up |'
  )
  print('|---|---|---|---|---|---|')
  for k, seq, shared, stacked in rows:
    print(
      f'| {k} | {seq:.0f} | {shared:.0f} | {shared / seq:.2f}x | '
      f'{stacked:.0f} | {stacked / seq:.2f}x |'
    )

  if jax.device_count() > 1 and b % jax.device_count() == 0:
    mesh = Mesh(np.array(jax.devices()), ('data',))
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    images = rng.uniform(size=(b, *shape)).astype(np.float32)
    single = jax.jit(
      lambda s, x: adapter.step(s, {'image': x}), donate_argnums=(0,)
    )
    t_one = timed(
      single, copy(state0), jax.device_put(images, jax.devices()[0])
    )
    sharded = jax.jit(
      lambda s, x: adapter.step(s, {'image': x}),
      donate_argnums=(0,),
      in_shardings=(rep, shard),
      out_shardings=(rep, None),
    )
    t_sh = timed(
      sharded, jax.device_put(copy(state0), rep), jax.device_put(images, shard)
    )
    n = b * args.steps
    print(
      f'\n| batch {b} | one device (ex/s) | sharded over '
      f'{jax.device_count()} (ex/s) | speed-up |'
    )
    print('|---|---|---|---|')
    print(
      f'| {args.method} | {n / t_one:.0f} | {n / t_sh:.0f} | '
      f'{t_one / t_sh:.2f}x |'
    )


if __name__ == '__main__':
  main()
