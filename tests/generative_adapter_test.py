"""Generative Adapter on a tiny random Llama: the generator's invariants.

Zero init is the identity; no context is no adapter; streaming equals the
parallel-prefix pass; the state is a sum (the pipeline is not
order-invariant); svdnorm's invariants and its gradient; the merge
matrices' causality; the official checkpoint layout; bad input.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import lm_fixtures
from tta_jax._src import context
from tta_jax.methods import generative_adapter as ga_method
from tta_jax.models.generators import (
  generative_adapter as ga,
  generative_adapter_import as ga_import,
)
from tta_jax.models.lm import model

V = 300
GC = ga.GAConfig(d_r=16, rank=4, alpha=4.0, window=8)


@pytest.fixture(scope='module')
def tiny():
  config = lm_fixtures.tiny_config(V)
  params = model.init(config, jax.random.key(0))
  params = jax.tree.map(
    lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params
  )
  return config, params


def _gen(config, gc=GC, seed=2, w_o=0.3):
  """A generator with a non-zero W_O (as after training)."""
  gen = ga.init(gc, config, jax.random.key(seed))
  if w_o:
    gen['w_o'] = w_o * jax.random.normal(
      jax.random.key(seed + 1), gen['w_o'].shape
    )
  return gen


def _tokens(seed, *shape):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(3, V, shape).astype(np.int32))


def _stream(gen, params, config, chunks, masks, gc=GC):
  state = ga.init_state(gc, config, chunks.shape[0])
  for t in range(chunks.shape[1]):
    state = ga.update(
      gen,
      params,
      state,
      chunks[:, t],
      masks[:, t],
      config=gc,
      lm_config=config,
    )
  return state


def _logits(params, config, gen, state, tokens, gc=GC):
  return ga.apply(
    params, ga.adapter(gen, state, gc), tokens, lm_config=config
  ).logits


def test_zero_init_is_the_base_model(tiny):
  config, params = tiny
  gen = ga.init(GC, config, jax.random.key(0))
  assert not np.asarray(gen['w_o']).any()
  chunks, masks = _tokens(1, 2, 3, 8), jnp.ones((2, 3, 8), bool)
  state = _stream(gen, params, config, chunks, masks)
  assert np.asarray(state.s).any()  # the context was absorbed ...
  query = _tokens(2, 2, 8)
  base = model.apply(params, query, config=config).logits
  # ... but W_O = 0: the adapted LM is the base LM, bit for bit.
  np.testing.assert_array_equal(
    _logits(params, config, gen, state, query), base
  )


def test_no_context_gives_no_adapter(tiny):
  config, params = tiny
  gen = _gen(config)
  empty = ga.init_state(GC, config, 2)
  for update in ga.adapter(gen, empty, GC).values():
    assert not np.asarray(update.a).any() and not np.asarray(update.b).any()
  query = _tokens(2, 2, 8)
  np.testing.assert_array_equal(
    _logits(params, config, gen, empty, query),
    model.apply(params, query, config=config).logits,
  )
  # An all-padding chunk leaves the state unchanged.
  state = _stream(gen, params, config, _tokens(1, 2, 1, 8), jnp.ones((2, 1, 8)))
  padded = ga.update(
    gen,
    params,
    state,
    _tokens(3, 2, 8),
    jnp.zeros((2, 8), bool),
    config=GC,
    lm_config=config,
  )
  np.testing.assert_array_equal(padded.s, state.s)


def test_streaming_equals_parallel_prefix(tiny):
  config, params = tiny
  gen = _gen(config)
  b, t, w = 2, 3, 8
  chunks = _tokens(1, b, t, w)
  masks = np.ones((b, t, w), bool)
  masks[0, 2, 5:] = False  # a padded tail
  masks = jnp.asarray(masks)
  query = _tokens(2, b, w)
  # Streaming: each chunk under the adapter of the chunks before it.
  state = ga.init_state(GC, config, b)
  chunk_logits = []
  for i in range(t):
    chunk_logits.append(
      ga.apply(
        params,
        ga.adapter(gen, state, GC),
        chunks[:, i],
        masks[:, i],
        lm_config=config,
      ).logits
    )
    state = ga.update(
      gen, params, state, chunks[:, i], masks[:, i], config=GC, lm_config=config
    )
  query_logits = _logits(params, config, gen, state, query)
  # Parallel prefix: one pass, strictly lower-triangular merge.
  segs = jnp.concatenate([chunks, query[:, None]], 1)
  seg_mask = jnp.concatenate([masks, jnp.ones((b, 1, w), bool)], 1)
  out = ga.prefix_forward(
    gen,
    params,
    segs,
    seg_mask,
    ga.completion_merge(t + 1),
    config=GC,
    lm_config=config,
  ).logits.reshape(b, t + 1, w, -1)
  scale = float(jnp.abs(query_logits).max())
  np.testing.assert_allclose(out[:, t], query_logits, atol=2e-5 * scale)
  for i in range(t):
    real = np.asarray(masks[:, i])
    np.testing.assert_allclose(
      np.asarray(out[:, i])[real],
      np.asarray(chunk_logits[i])[real],
      atol=2e-5 * scale,
    )
  # The adapter matters (otherwise the equality would be vacuous).
  base = model.apply(params, query, config=config).logits
  assert float(jnp.abs(query_logits - base).max()) > 1e-2


def test_contextualize_uses_balanced_chunks(tiny):
  config, params = tiny
  gen = _gen(config)
  ids = np.asarray(_tokens(5, 1, 12))[0].tolist()
  state = ga.contextualize(gen, params, [ids], config=GC, lm_config=config)
  # 12 tokens with a window of 8: two chunks of 6, not 8 + 4.
  halves = jnp.asarray([ids[:6], ids[6:]], jnp.int32)[None]
  want = _stream(gen, params, config, halves, jnp.ones((1, 2, 6), bool))
  np.testing.assert_allclose(state.s, want.s, rtol=1e-5, atol=1e-5)
  assert int(state.tokens[0]) == 12


def test_state_is_a_sum_but_the_pipeline_is_ordered(tiny):
  config, params = tiny
  gen = _gen(config)
  layer = jax.tree.map(lambda x: x[0], gen)
  h = jax.random.normal(jax.random.key(0), (1, 10, config.hidden_size))
  mask = jnp.ones((1, 10), bool)
  whole = ga.gram(layer, h, mask, eps=1e-6)
  parts = ga.gram(layer, h[:, :4], mask[:, :4], eps=1e-6) + ga.gram(
    layer, h[:, 4:], mask[:, 4:], eps=1e-6
  )
  np.testing.assert_allclose(whole, parts, rtol=1e-5, atol=1e-4)
  # Padding adds nothing.
  padded = jnp.concatenate([h, 5.0 + h[:, :3]], 1)
  pmask = jnp.concatenate([mask, jnp.zeros((1, 3), bool)], 1)
  np.testing.assert_allclose(
    ga.gram(layer, padded, pmask, eps=1e-6), whole, rtol=1e-6, atol=1e-6
  )
  # Hidden states depend on earlier adapters: chunk order matters.
  a, b = _tokens(6, 1, 1, 8), _tokens(7, 1, 1, 8)
  ones = jnp.ones((1, 2, 8), bool)
  ab = _stream(gen, params, config, jnp.concatenate([a, b], 1), ones)
  ba = _stream(gen, params, config, jnp.concatenate([b, a], 1), ones)
  assert float(jnp.abs(ab.s - ba.s).max()) > 1e-4 * float(jnp.abs(ab.s).max())


def test_svdnorm_invariants():
  s = jax.random.normal(jax.random.key(0), (3, 16, 16))
  n = np.asarray(ga.normalize(s, GC))
  sv = np.linalg.svd(n, compute_uv=False)
  assert np.allclose(sv[:, : GC.rank], 1.0, atol=1e-5)  # kept: exactly 1
  assert np.allclose(sv[:, GC.rank :], 0.0, atol=1e-5)  # rank <= r
  assert (sv.max(-1) <= 1 + 1e-5).all()
  # Scale invariance: the same hidden states fed twice, the same adapter.
  np.testing.assert_allclose(ga.normalize(7.0 * s, GC), n, atol=1e-5)
  # S = 0 -> N = 0 exactly; a rank-2 S keeps only its 2 directions.
  assert not np.asarray(ga.normalize(jnp.zeros((16, 16)), GC)).any()
  low = s[0, :, :2] @ s[1, :2, :]
  sv_low = np.linalg.svd(np.asarray(ga.normalize(low, GC)), compute_uv=False)
  np.testing.assert_allclose(sv_low[:2], 1.0, atol=1e-5)
  assert np.allclose(sv_low[2:], 0.0, atol=1e-5)
  # Frobenius normalisation: unit Frobenius norm, full rank.
  frob = np.asarray(ga.normalize(s, dataclasses.replace(GC, norm='frobenius')))
  np.testing.assert_allclose(np.linalg.norm(frob, axis=(-1, -2)), 1, atol=1e-5)


def test_update_norm_bound_and_lora_equivalence(tiny):
  config, params = tiny
  gen = _gen(config)
  state = _stream(
    gen, params, config, _tokens(1, 2, 2, 8), jnp.ones((2, 2, 8), bool)
  )
  (update,) = ga.adapter(gen, state, GC).values()
  for layer in range(config.num_layers):
    n = ga.normalize(state.s[layer], GC)  # [B, d_r, d_r]
    dense = GC.scale * gen['w_q'][layer] @ n @ gen['w_o'][layer]
    factored = update.a[layer] @ update.b[layer]  # [B, D_in, D_out]
    np.testing.assert_allclose(factored, dense, atol=1e-5)
    bound = (
      GC.scale
      * np.linalg.norm(gen['w_q'][layer], 2)
      * np.linalg.norm(gen['w_o'][layer], 2)
    )
    norms = np.linalg.norm(np.asarray(dense), 2, axis=(-2, -1))
    assert (norms <= bound + 1e-5).all()
  # Merging the update into o_proj gives the factored model's outputs.
  query = _tokens(2, 2, 8)
  factored_logits = _logits(params, config, gen, state, query)
  for row in range(2):
    merged = jax.tree.map(lambda x: x, params)
    delta = jnp.einsum('lir,lro->lio', update.a[:, row], update.b[:, row])
    kernel = params['layers']['self_attn']['o_proj']['kernel']
    merged['layers']['self_attn']['o_proj']['kernel'] = kernel + delta
    logits = model.apply(merged, query[row : row + 1], config=config).logits
    np.testing.assert_allclose(logits[0], factored_logits[row], atol=1e-4)


def test_svdnorm_gradient_matches_autodiff_and_is_finite_when_degenerate():
  s = jax.random.normal(jax.random.key(3), (16, 16))

  def ours(x):
    return jnp.sum(jnp.sin(3.0 * ga.normalize(x, GC)))

  def reference(x):  # plain autodiff through the SVD (generic S only)
    u, _, vh = jnp.linalg.svd(x)
    return jnp.sum(jnp.sin(3.0 * (u[:, :4] @ vh[:4])))

  np.testing.assert_allclose(
    jax.grad(ours)(s), jax.grad(reference)(s), atol=1e-5
  )
  # Finite differences of a smooth function of N.
  d = jax.random.normal(jax.random.key(4), (16, 16))
  eps = 1e-2
  fd = (ours(s + eps * d) - ours(s - eps * d)) / (2 * eps)
  np.testing.assert_allclose(
    jnp.vdot(jax.grad(ours)(s), d), fd, rtol=2e-2, atol=2e-3
  )
  # Repeated singular values: training resets N to 0, gradients finite.
  # The randomised SVD only approximates a spectrum, so it is checked on
  # S = 0 (a row with no context), where its QR has no direction at all.
  degenerate = jnp.diag(jnp.asarray([3.0, 3, 2, 2, 1, 1] + [0.0] * 10))
  randomized = dataclasses.replace(GC, svd='randomized')
  for gc, x in ((GC, degenerate), (randomized, jnp.zeros((16, 16)))):
    key = jax.random.key(0)
    n = ga.normalize(x, gc, train=True, key=key)
    assert not np.asarray(n).any()
    grad = jax.grad(
      lambda x, gc=gc: jnp.sum(ga.normalize(x, gc, train=True, key=key) ** 2)
    )(x)
    assert np.isfinite(np.asarray(grad)).all()
  # Inference keeps the repeated directions (no reset), finite gradients.
  n = ga.normalize(degenerate, GC)
  assert np.asarray(n).any()
  grad = jax.grad(lambda x: jnp.sum(jnp.sin(ga.normalize(x, GC))))(degenerate)
  assert np.isfinite(np.asarray(grad)).all()


def test_randomized_svd_is_exact_on_low_rank_matrices():
  gr = dataclasses.replace(GC, svd='randomized')
  k1, k2 = jax.random.split(jax.random.key(5))
  low = jax.random.normal(k1, (16, 3)) @ jax.random.normal(k2, (3, 16))
  np.testing.assert_allclose(
    ga.normalize(low, gr, key=jax.random.key(9)),
    ga.normalize(low, GC),
    atol=1e-5,
  )
  with pytest.raises(ValueError, match='explicit PRNG key'):
    ga.normalize(low, gr)


def test_merge_matrices_and_their_causality(tiny):
  np.testing.assert_array_equal(
    ga.completion_merge(3), [[0, 0, 0], [1, 0, 0], [1, 1, 0]]
  )
  m = ga.pretrain_merge(8)  # the official 16 x 16 'abcdabcd' matrix
  assert m.shape == (16, 16) and not m[:, 8:].any() and not m[0].any()
  for i in range(1, 8):
    assert m[i, :i].all() and not m[i, i:].any()  # completion
  for j in range(8):
    assert m[8 + j, : j + 1].all() and not m[8 + j, j + 1 :].any()
  config, params = tiny
  gen = _gen(config)
  t, w = 3, 8
  segs = _tokens(1, 1, 2 * t, w)
  mask = jnp.ones((1, 2 * t, w), bool)
  fwd = functools.partial(
    ga.prefix_forward,
    gen,
    params,
    mask=mask,
    merge=ga.pretrain_merge(t),
    config=GC,
    lm_config=config,
  )
  base = fwd(segs).logits
  j = 1
  changed = fwd(segs.at[0, j].set(_tokens(9, w))).logits
  moved = np.abs(np.asarray(changed - base)).max((1, 2)) > 1e-6
  # Chunk j feeds chunks > j and windows >= j only.
  np.testing.assert_array_equal(moved, [False, True, True, False, True, True])


def test_official_checkpoint_layout(tmp_path, tiny):
  """A checkpoint written in the official `fastlora` layout loads to our
  parameters, and our adapter computes the official update."""
  from safetensors.numpy import save_file

  config, _ = tiny
  gc = ga.GAConfig(d_r=16, rank=4, alpha=4.0, window=8)
  rng = np.random.default_rng(0)
  d, d_in, r = config.hidden_size, config.num_heads * config.head_size, 16
  official = {}
  for i in range(config.num_layers):
    p = f'base_model.model.model.layers.{i}.self_attn.o_proj.fastlora_'
    official[p + 'A1.weight'] = rng.normal(size=(r, d_in)).astype(np.float32)
    official[p + 'A2.weight'] = rng.normal(size=(r, d)).astype(np.float32)
    official[p + 'A3.weight'] = rng.normal(size=(r, d)).astype(np.float32)
    official[p + 'B.weight'] = rng.normal(size=(d, r)).astype(np.float32)
    official[p + 'hidden_state_norm.weight'] = rng.normal(size=d).astype(
      np.float32
    )
  save_file(official, str(tmp_path / 'adapter_model.safetensors'))
  import json

  (tmp_path / 'adapter_config.json').write_text(
    json.dumps(
      {
        'fastlora_r': 16,
        'fastlora_inter_size': 16,
        'fastlora_max_rank': 4,
        'fastlora_alpha': 4,
        'fastlora_param': ['o_proj'],
        'fastlora_norm': 'svd',
        'fastlora_window': 8,
        'fastlora_merge': 'pre-norm-sum',
      }
    )
  )
  loaded_config, gen = ga_import.load_official(tmp_path, config)
  assert loaded_config == gc
  ga.check_params(gen, gc, config)
  # The official computation, in the torch layout, for layer 1: RMSNorm of
  # H (eps 1e-6, weight), key/value states, ss = kᵀ v, N = U_r V_rᵀ,
  # lora_a = Nᵀ A1, output = scaling · x lora_aᵀ Bᵀ.
  p = 'base_model.model.model.layers.1.self_attn.o_proj.fastlora_'
  h = rng.normal(size=(10, d)).astype(np.float32)
  x = rng.normal(size=(5, d_in)).astype(np.float32)
  hn = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6)
  hn = official[p + 'hidden_state_norm.weight'] * hn
  ss = (hn @ official[p + 'A2.weight'].T).T @ (hn @ official[p + 'A3.weight'].T)
  u, _, vh = np.linalg.svd(ss.astype(np.float64))
  n = u[:, :4] @ vh[:4]
  lora_a = n.T @ official[p + 'A1.weight']
  want = (4 / 16) * (x @ lora_a.T) @ official[p + 'B.weight'].T
  layer = jax.tree.map(lambda v: jnp.asarray(v[1]), gen)
  s = ga.gram(layer, jnp.asarray(h)[None], jnp.ones((1, 10), bool), eps=1e-6)
  state = ga.State(jnp.broadcast_to(s, (config.num_layers, 1, 16, 16)), None)
  (update,) = ga.adapter(jax.tree.map(jnp.asarray, gen), state, gc).values()
  got = x @ np.asarray(update.a[1, 0]) @ np.asarray(update.b[1, 0])
  np.testing.assert_allclose(
    got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max()
  )
  # Round trip through our writer.
  ga_import.save_official(tmp_path / 'again', gc, gen, config)
  _, again = ga_import.load_official(tmp_path / 'again', config)
  for k in gen:
    np.testing.assert_array_equal(again[k], gen[k])
  # A mismatched tensor is an error naming it and both shapes.
  official[p + 'A2.weight'] = official[p + 'A2.weight'][:, :-1]
  save_file(official, str(tmp_path / 'adapter_model.safetensors'))
  with pytest.raises(
    ValueError,
    match=r'layers\.1\.self_attn\.o_proj\.fastlora_A2.*\(16, 63\).*'
    r'\(16, 64\)',
  ):
    ga_import.load_official(tmp_path, config)


def test_bad_input(tiny):
  config, params = tiny
  gen = _gen(config)
  with pytest.raises(ValueError, match=r'contexts \[1\] are empty'):
    ga.contextualize(gen, params, [[5, 6], []], config=GC, lm_config=config)
  long = jnp.ones((1, config.max_position_embeddings + 1), jnp.int32)
  with pytest.raises(ValueError, match='longer than the LM'):
    ga.update(
      gen, params, ga.init_state(GC, config, 1), long, config=GC,
      lm_config=config,
    )  # fmt: skip
  other = ga.GAConfig(d_r=8, rank=4, window=8)
  with pytest.raises(
    ValueError, match=r"'w_k'.*\(2, 64, 16\).*need \(2, 64, 8\)"
  ):
    ga.check_params(gen, other, config)
  method = ga_method.generative_adapter(config, generator=GC)
  state = method.init(params, jax.random.key(0), 1)
  chunk = context.TokenChunk(_tokens(1, 1, 8), jnp.ones((1, 8), bool))
  with pytest.raises(ValueError, match='needs the trained generator'):
    method.absorb(params, state, chunk)
  with pytest.raises(ValueError, match=r"generator parameter 'w_k'"):
    method.absorb(
      params, state, chunk, meta=ga.init(other, config, jax.random.key(0))
    )
  with pytest.raises(ValueError, match='rank must be in'):
    ga.GAConfig(d_r=8, rank=9)
  with pytest.raises(ValueError, match=r'merge matrix has shape \(2, 2\)'):
    ga.prefix_forward(
      gen, params, _tokens(1, 1, 3, 8), jnp.ones((1, 3, 8), bool),
      ga.completion_merge(2), config=GC, lm_config=config,
    )  # fmt: skip
