"""The decoder's semantics on tiny random models (no torch needed).

Padding and packing invariances, the low-rank hook, the KV cache, the
generation loop (stop tokens, sampling keys, bucketing, no recompiles),
the importer's and tokenizer's one-line errors, and the orbax cache.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import lm_fixtures
from tta_jax import testing
from tta_jax.models.lm import generate, hf, load, model, tokenizer

ATOL = 1e-5


@pytest.fixture(scope='module')
def tiny():
  config = lm_fixtures.tiny_config(300, tie_embeddings=False)
  params = model.init(config, jax.random.key(0))
  params = jax.tree.map(
    lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params
  )
  return config, params


def _ids(b, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(3, 300, (b, t)))


def test_padding_anywhere_equals_unpadded(tiny):
  config, params = tiny
  ids = _ids(1, 6)
  ref = model.apply(params, ids, config=config).logits[0]
  # Pads on the left, in the middle and on the right.
  padded = jnp.asarray(
    [[0, 0, *ids[0, :3].tolist(), 0, *ids[0, 3:].tolist(), 0]]
  )
  mask = padded != 0
  mask = mask.at[0, 2:5].set(True).at[0, 6:9].set(True)
  out = model.apply(params, padded, config=config, mask=mask).logits[0]
  np.testing.assert_allclose(out[np.asarray(mask[0])], ref, atol=ATOL)


def test_segments_restart_positions_and_isolate_attention(tiny):
  config, params = tiny
  a, b = _ids(1, 5, 1), _ids(1, 4, 2)
  packed = jnp.concatenate([a, b], 1)
  segs = jnp.asarray([[0] * 5 + [1] * 4])
  out = model.apply(params, packed, config=config, segment_ids=segs).logits
  np.testing.assert_allclose(
    out[:, :5], model.apply(params, a, config=config).logits, atol=ATOL
  )
  np.testing.assert_allclose(
    out[:, 5:], model.apply(params, b, config=config).logits, atol=ATOL
  )


def test_default_positions():
  mask = jnp.asarray([[0, 1, 1, 0, 1], [1, 1, 1, 1, 1]], bool)
  segs = jnp.asarray([[0, 0, 0, 0, 0], [0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(
    model.default_positions(mask), [[0, 0, 1, 1, 2], [0, 1, 2, 3, 4]]
  )
  np.testing.assert_array_equal(
    model.default_positions(mask, segs), [[0, 0, 1, 1, 2], [0, 1, 0, 1, 2]]
  )


def test_hidden_states_are_block_inputs(tiny):
  config, params = tiny
  ids = _ids(2, 5)
  out = model.apply(params, ids, config=config, return_hidden=True)
  assert out.hidden.shape == (config.num_layers + 1, 2, 5, config.hidden_size)
  np.testing.assert_allclose(
    out.hidden[0], params['embed_tokens']['embedding'][ids], atol=0
  )
  np.testing.assert_allclose(out.hidden[-1], out.final, atol=0)


def test_lowrank_static_hook_and_per_sequence_agree(tiny):
  config, params = tiny
  ids = _ids(2, 6)
  n, d, r = config.num_layers, config.hidden_size, 3
  a = jax.random.normal(jax.random.key(2), (n, d, r)) * 0.2
  b = jax.random.normal(jax.random.key(3), (n, r, d)) * 0.2
  base = model.apply(params, ids, config=config).logits
  static = model.apply(
    params, ids, config=config, lowrank={'o_proj': model.LowRank(a, b)}
  ).logits
  assert np.abs(static - base).max() > 1e-3  # the update matters

  def fn(xs, h, mask):
    del mask
    assert h.shape == (2, 6, d)  # the block input reaches the hook
    return {'o_proj': model.LowRank(*xs)}

  hooked = model.apply(
    params, ids, config=config, lowrank=model.LayerHook(fn, (a, b))
  ).logits
  np.testing.assert_allclose(hooked, static, atol=ATOL)
  # Per-sequence updates: row 0 gets (a, b), row 1 none.
  per_seq = model.LowRank(
    jnp.stack([a, jnp.zeros_like(a)], 1), jnp.stack([b, b], 1)
  )
  mixed = model.apply(params, ids, config=config, lowrank={'o_proj': per_seq})
  np.testing.assert_allclose(mixed.logits[0], static[0], atol=ATOL)
  np.testing.assert_allclose(mixed.logits[1], base[1], atol=ATOL)


def test_cache_prefix_equals_full_sequence(tiny):
  config, params = tiny
  ids = _ids(2, 9)
  full = model.apply(params, ids, config=config).logits
  cache = model.init_cache(config, 2, 12)
  first = model.apply(params, ids[:, :4], config=config, cache=cache)
  rest = model.apply(params, ids[:, 4:], config=config, cache=first.cache)
  np.testing.assert_allclose(first.logits, full[:, :4], atol=ATOL)
  np.testing.assert_allclose(rest.logits, full[:, 4:], atol=ATOL)
  assert int(rest.cache.index) == 9


def test_generation_stops_and_pads(tiny):
  config, params = tiny
  ids = _ids(2, 5)
  free = generate.generate(params, ids, config=config, max_new_tokens=6)
  stop = int(free.tokens[0, 2])
  gen = generate.generate(
    params, ids, config=config, max_new_tokens=6, stop_ids=(stop,), pad_id=1
  )
  first = int(np.argmax(np.asarray(free.tokens[0]) == stop))
  assert int(gen.lengths[0]) == first
  assert bool(gen.stopped[0])
  np.testing.assert_array_equal(
    gen.tokens[0, : first + 1], free.tokens[0, : first + 1]
  )
  assert (np.asarray(gen.tokens[0, first + 1 :]) == 1).all()


def test_sampling_needs_a_key_and_is_deterministic(tiny):
  config, params = tiny
  ids = _ids(2, 4)
  hot = generate.Sampling(temperature=1.0, top_k=20, top_p=0.9)
  with pytest.raises(ValueError, match='explicit rng'):
    generate.generate(
      params, ids, config=config, max_new_tokens=3, sampling=hot
    )
  kw = dict(config=config, max_new_tokens=8, sampling=hot)
  a = generate.generate(params, ids, rng=jax.random.key(0), **kw).tokens
  b = generate.generate(params, ids, rng=jax.random.key(0), **kw).tokens
  c = generate.generate(params, ids, rng=jax.random.key(1), **kw).tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # top_k=1 sampling is greedy.
  one = generate.Sampling(temperature=0.7, top_k=1)
  greedy = generate.generate(params, ids, config=config, max_new_tokens=8)
  np.testing.assert_array_equal(
    generate.generate(
      params, ids, config=config, max_new_tokens=8, sampling=one,
      rng=jax.random.key(3),
    ).tokens,
    greedy.tokens,
  )  # fmt: skip


def test_bucketed_prompts_share_one_program_and_answers(tiny):
  config, params = tiny
  kw = dict(config=config, max_new_tokens=4)
  ids, mask = np.asarray(_ids(1, 5)), np.ones((1, 5), bool)
  want = generate.generate(params, ids, mask, **kw).tokens
  ids_b, mask_b = generate.pad_to_bucket(ids, mask, multiple=16)
  assert ids_b.shape == (1, 16)
  np.testing.assert_array_equal(
    generate.generate(params, ids_b, mask_b, **kw).tokens, want
  )
  other, other_mask = generate.pad_to_bucket(
    np.asarray(_ids(1, 9, 4)), np.ones((1, 9), bool), multiple=16
  )
  with testing.compilations() as compiled:
    generate.generate(params, other, other_mask, **kw)
  assert not compiled
  # (The check sees compilations: another bucket compiles anew.)
  longer, longer_mask = generate.pad_to_bucket(
    np.asarray(_ids(1, 17, 4)), np.ones((1, 17), bool), multiple=16
  )
  with testing.compilations() as compiled:
    generate.generate(params, longer, longer_mask, **kw)
  assert compiled


def test_prompt_rows_need_a_real_token(tiny):
  config, params = tiny
  with pytest.raises(ValueError, match=r'prompt rows \[1\] have no real token'):
    generate.generate(
      params, _ids(2, 3), np.array([[1, 1, 1], [0, 0, 0]], bool),
      config=config, max_new_tokens=2,
    )  # fmt: skip


def test_bad_token_inputs(tiny):
  config, params = tiny
  with pytest.raises(ValueError, match='tokens are empty'):
    model.apply(params, jnp.zeros((1, 0), jnp.int32), config=config)
  with pytest.raises(ValueError, match=r'\[batch, time\]'):
    model.apply(params, jnp.zeros((4,), jnp.int32), config=config)
  with pytest.raises(ValueError, match='mask shape'):
    model.apply(params, _ids(1, 3), config=config, mask=jnp.ones((1, 4), bool))


def test_config_tensor_mismatch_names_tensor_and_shape(tiny):
  config, params = tiny
  state = hf.state_dict_from_params(params, config)
  bad = dict(state)
  bad['model.layers.1.mlp.up_proj.weight'] = np.zeros((95, 64), np.float32)
  with pytest.raises(
    ValueError,
    match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' has shape "
    r'\(95, 64\); the config expects \(96, 64\)',
  ):
    hf.params_from_state_dict(bad, config)
  missing = dict(state)
  del missing['model.norm.weight']
  with pytest.raises(
    ValueError,
    match=r"lacks tensor 'model\.norm\.weight' \(expected shape \(64,\)\)",
  ):
    hf.params_from_state_dict(missing, config)
  extra = dict(state, **{'model.layers.0.self_attn.q_norm.weight': np.ones(16)})
  with pytest.raises(
    ValueError, match="q_norm.weight' that the config does not use"
  ):
    hf.params_from_state_dict(extra, config)
  # A config.json whose head count does not match the tensors.
  wrong = dataclasses.replace(config, num_kv_heads=4)
  with pytest.raises(
    ValueError,
    match=r"self_attn\.k_proj\.weight' has shape \(32, 64\); the config "
    r'expects \(64, 64\)',
  ):
    hf.params_from_state_dict(state, wrong)


def test_hf_directory_round_trip_and_bad_config(tmp_path, tiny):
  config, params = tiny
  hf.save(tmp_path, config, params)
  again_config, again = hf.load(tmp_path)
  assert again_config == config
  jax.tree.map(
    np.testing.assert_array_equal, again, jax.tree.map(np.asarray, params)
  )
  cfg = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(
    json.dumps(dict(cfg, model_type='gpt2'))
  )
  with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
    hf.load(tmp_path)


@pytest.fixture(scope='module')
def tok():
  bpe = lm_fixtures.tiny_bpe()
  return tokenizer.Tokenizer(
    bpe,
    bos_id=bpe.token_to_id('<|im_start|>'),
    eos_id=bpe.token_to_id('<|im_end|>'),
    chat_template=lm_fixtures.CHAT_TEMPLATE,
  )


def test_tokenizer_errors(tok):
  with pytest.raises(ValueError, match='empty text'):
    tok.encode('')
  with pytest.raises(ValueError, match='empty batch'):
    tok.encode_batch([])
  long = 'Hello world, this is a tiny corpus. ' * 10
  n = len(tok.encode(long))
  with pytest.raises(
    ValueError,
    match=f'text has {n} tokens, more than max_length=8; .*truncate=True',
  ):
    tok.encode(long, max_length=8)
  kept = tok.encode(long, max_length=8, truncate=True)
  assert kept == tok.encode(long)[-8:]
  with pytest.raises(ValueError, match=r"unknown special token '<\|eot_id\|>'"):
    tok.token_id('<|eot_id|>')


def test_tokenizer_batch_padding_and_dict_round_trip(tok):
  ids, mask = tok.encode_batch(['Hello world', 'Hi'], side='left', multiple=8)
  assert ids.shape[1] % 8 == 0
  assert mask[0, -1] and mask[1, -1] and not mask[1, 0]
  again = tokenizer.Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
  assert again.encode('Numbers 123') == tok.encode('Numbers 123')
  assert again.stop_ids == tok.stop_ids


def test_cache_is_reused_and_never_clobbered_by_a_failed_conversion(
  tmp_path, monkeypatch
):
  path = tmp_path / 'tiny.gguf'
  lm_fixtures.tiny_gguf(path)
  cache = tmp_path / 'cache'
  first = load.load(path, cache_dir=cache)
  entries = sorted(p.name for p in cache.iterdir())
  assert len(entries) == 1

  calls = []

  def broken(*args, **kwargs):
    calls.append(1)
    raise RuntimeError('conversion failed')

  monkeypatch.setattr(load, 'convert', broken)
  second = load.load(path, cache_dir=cache)  # read from the cache
  assert not calls
  jax.tree.map(np.testing.assert_array_equal, second.params, first.params)
  with pytest.raises(RuntimeError, match='conversion failed'):
    load.load(path, cache_dir=cache, refresh=True)
  assert sorted(p.name for p in cache.iterdir()) == entries  # no debris
  third = load.load(path, cache_dir=cache)
  jax.tree.map(np.testing.assert_array_equal, third.params, first.params)
  assert third.tokenizer.encode('Hello') == first.tokenizer.encode('Hello')


def test_gradients_flow_through_the_frozen_lm_to_a_lowrank(tiny):
  config, params = tiny
  ids = _ids(2, 5)
  n, d = config.num_layers, config.hidden_size
  a = jax.random.normal(jax.random.key(2), (n, d, 2)) * 0.1
  b = jnp.zeros((n, 2, d))

  def loss(ab, config):
    out = model.apply(
      params, ids, config=config, lowrank={'o_proj': model.LowRank(*ab)}
    )
    return -model.token_logprobs(out.logits, ids).mean()

  g = jax.grad(loss)((a, b), config)
  g_remat = jax.grad(loss)((a, b), dataclasses.replace(config, remat=True))
  assert float(jnp.abs(g[1]).max()) > 0  # b = 0 still gets a gradient
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), g, g_remat
  )
