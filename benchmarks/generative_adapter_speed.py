r"""Generative Adapter vs full-context prompting: compute, time and memory.

  python benchmarks/generative_adapter_speed.py                 # SmolLM2
  python benchmarks/generative_adapter_speed.py --model=tiny    # seconds

For each context length n (256 .. 8,192 tokens), side by side in one run,
on the same weights, context and question:

* the generated adapter: the context is encoded once (streamed in
  `--window`-token chunks, each under the adapter of the chunks before
  it), then each query is answered closed-book (question prefill +
  `--new_tokens` greedy steps through the rank-r factors);
* full-context prompting: the context is prefilled once into a KV cache
  (in `--window`-token chunks), then each query continues that cache.

FLOPs come from XLA's cost analysis of the lowered programs (the question's
prefill plus `--new_tokens` single-token decode steps; the context's chunk
steps). XLA counts the body of a loop once, and the LM runs its layers as a
`lax.scan`, so the programs whose FLOPs are counted are lowered with the
layer loop unrolled (`LlamaConfig.unroll` = the number of layers, the same
arithmetic); wall times are medians over `--repeats` runs of the scanned
programs after compilation. Bytes: the streaming state (d_r × d_r floats
per layer; the LoRA factors it yields are r (D_in + D_out) per layer) vs
the KV cache prompting keeps. `queries to break even` is how many questions
about one context make the adapter's total (encode + Q answers) cheaper
than prompting's (prefill + Q answers with the cache); without a kept cache
(the paper's per-query accounting, the context re-read for every question)
the adapter is cheaper from the first question.
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax.models.generators import generative_adapter as ga
from tta_jax.models.lm import generate, model


def flops(fn, *args) -> float:
  """XLA's FLOP count of `fn(*args)` as lowered, before XLA's optimisation
  passes (a loop's body counts once: pass programs without loops, e.g.
  the LM with its layers unrolled; the optimised CPU program counts only
  part of the matrix products once fused)."""
  cost = jax.jit(fn).lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def load(name: str, d_r: int, rank: int, window: int):
  if name == 'tiny':
    config = model.LlamaConfig(
      vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
      num_heads=4, num_kv_heads=2, max_position_embeddings=16384,
    )  # fmt: skip
    params = model.init(config, jax.random.key(0))
  else:
    from tta_jax.models.lm import load as load_lib

    lm = load_lib.load(name)
    config, params = lm.config, lm.params
  gc = ga.GAConfig(d_r=d_r, rank=rank, alpha=d_r / 16, window=window)
  gen = ga.init(gc, config, jax.random.key(1))
  gen['w_o'] = 0.01 * jax.random.normal(jax.random.key(2), gen['w_o'].shape)
  return config, params, gc, gen


def run(args):
  config, params, gc, gen = load(args.model, args.d_r, args.rank, args.window)
  # The layers unrolled, for XLA's FLOP count (see the module docstring).
  # An int: `unroll=True` compares (and hashes) equal to the default 1, so
  # a cached trace of the scanned program would be reused.
  counted = dataclasses.replace(config, unroll=config.num_layers)
  rng = np.random.default_rng(0)
  q, new, w = args.query_tokens, args.new_tokens, args.window
  question = jnp.asarray(rng.integers(3, 500, (1, q)), jnp.int32)
  qmask = jnp.ones((1, q), bool)

  update = jax.jit(
    lambda g, p, s, t, m: ga.update(g, p, s, t, m, config=gc, lm_config=config)
  )
  adapter = jax.jit(lambda g, s: ga.adapter(g, s, gc))

  def answer(p, cache, lowrank):
    return generate.generate(
      p, question, qmask, config=config, max_new_tokens=new, cache=cache,
      lowrank=lowrank,
    )  # fmt: skip

  def query_flops(cache_size, lowrank):
    """Question prefill + `new` decode steps, each at its cache size."""
    cache = model.init_cache(config, 1, cache_size + q + new)

    def step(p, c, lr, toks):
      return model.apply(p, toks, config=counted, cache=c, lowrank=lr,
                         return_logits=False).final  # fmt: skip

    pre = flops(step, params, cache, lowrank, question)
    one = jnp.ones((1, 1), jnp.int32)
    dec = flops(step, params, cache, lowrank, one)
    head = flops(
      lambda p, h: model.head(p, h, config=config),
      params,
      jnp.ones((1, 1, config.hidden_size)),
    )
    return pre + new * (dec + head) + head

  rows = []
  ga_answer_flops = query_flops(0, adapter(gen, ga.init_state(gc, config, 1)))
  for n in args.lengths:
    ids = rng.integers(3, 500, n).tolist()
    toks, mask = (jnp.asarray(x) for x in _stream(ids, w))
    chunks = toks.shape[0]
    # --- the generated adapter
    state0 = ga.init_state(gc, config, 1)
    enc_flops = chunks * flops(
      lambda g, p, s, t, m: ga.update(g, p, s, t, m, config=gc,
                                      lm_config=counted),
      gen, params, state0, toks[0], mask[0],
    )  # fmt: skip

    def encode():
      s = state0
      for c in range(chunks):
        s = update(gen, params, s, toks[c], mask[c])
      return adapter(gen, s)

    enc_s = timed(encode, args.repeats)
    lowrank = encode()
    ans_s = timed(lambda lr=lowrank: answer(params, None, lr), args.repeats)
    # --- full-context prompting
    slots = chunks * w

    def prefill_step(p, c, t, m, cfg=config):
      return model.apply(p, t, config=cfg, mask=m, cache=c,
                         return_logits=False).cache  # fmt: skip

    prefill_jit = jax.jit(prefill_step)
    cache0 = model.init_cache(config, 1, slots)
    pre_flops = chunks * flops(
      lambda p, c, t, m: prefill_step(p, c, t, m, counted),
      params, cache0, toks[0], mask[0],
    )  # fmt: skip

    def prefill():
      c = cache0
      for i in range(chunks):
        c = prefill_jit(params, c, toks[i], mask[i])
      return c

    pre_s = timed(prefill, args.repeats)
    cache = prefill()
    p_ans_s = timed(lambda c=cache: answer(params, c, None), args.repeats)
    p_ans_flops = query_flops(slots, None)
    kv = config.kv_cache_bytes_per_token('float32') * n
    gain = p_ans_flops - ga_answer_flops
    even = (enc_flops - pre_flops) / gain if gain > 0 else float('inf')
    rows.append(
      dict(
        n=n,
        ga_enc=enc_flops, ga_enc_s=enc_s, ga_ans=ga_answer_flops,
        ga_ans_s=ans_s, p_pre=pre_flops, p_pre_s=pre_s, p_ans=p_ans_flops,
        p_ans_s=p_ans_s, state=ga.state_bytes(gc, config),
        lora=4 * ga.adapter_floats(gc, config), kv=kv, even=even,
      )
    )  # fmt: skip
    print(_row(rows[-1]), flush=True)
  return rows


def _stream(ids, w):
  from tta_jax._src import context

  return context.chunk_stream([ids], w)


HEADER = (
  '| context | GA encode GFLOP (s) | GA answer GFLOP (s) | prompt prefill '
  'GFLOP (s) | prompt answer GFLOP (s) | answer ratio | no-cache ratio | '
  'GA state / LoRA MB | KV cache MB | queries to break even |\n'
  '|---|---|---|---|---|---|---|---|---|---|'
)


def _row(r) -> str:
  g = 1e9
  ratio = r['p_ans'] / r['ga_ans']
  nocache = (r['p_pre'] + r['p_ans']) / r['ga_ans']
  # Negative: encoding costs less than prefilling, so the adapter is
  # cheaper from the first question even against a kept cache.
  even = 'from the 1st' if r['even'] <= 1 else f'{r["even"]:.1f}'
  return (
    f'| {r["n"]} | {r["ga_enc"] / g:.1f} ({r["ga_enc_s"]:.2f}) | '
    f'{r["ga_ans"] / g:.2f} ({r["ga_ans_s"]:.2f}) | '
    f'{r["p_pre"] / g:.1f} ({r["p_pre_s"]:.2f}) | '
    f'{r["p_ans"] / g:.2f} ({r["p_ans_s"]:.2f}) | {ratio:.2f}x | '
    f'{nocache:.1f}x | {r["state"] / 2**20:.1f} / {r["lora"] / 2**20:.1f} '
    f'| {r["kv"] / 2**20:.1f} | {even} |'
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--model', default='smollm2', help="'smollm2', a checkpoint path, or 'tiny'"
  )
  parser.add_argument('--lengths', default='256,512,1024,2048,4096,8192')
  parser.add_argument(
    '--window',
    type=int,
    default=512,
    help='context chunk length (both methods)',
  )
  parser.add_argument('--d_r', type=int, default=64)
  parser.add_argument('--rank', type=int, default=16)
  parser.add_argument('--query_tokens', type=int, default=32)
  parser.add_argument('--new_tokens', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()  # fmt: skip
  args.lengths = [int(x) for x in args.lengths.split(',')]
  print(
    f'model={args.model} d_r={args.d_r} r={args.rank} window={args.window} '
    f'question={args.query_tokens} tokens, {args.new_tokens} new tokens; '
    f'{jax.devices()[0].platform}',
    flush=True,
  )
  print(HEADER, flush=True)
  run(args)


if __name__ == '__main__':
  main()
