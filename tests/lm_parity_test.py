"""The Llama-family decoder against transformers' PyTorch implementation.

Tiny randomly initialised Llama and Mistral models are saved by
transformers (`save_pretrained`, safetensors), loaded by our importer, and
run on the same tokens: logits must agree to float32 tolerance on full
sequences, left- and right-padded batches, cached step-by-step decoding,
greedy generation, every layer's block input, Llama-3 rope scaling, a
Mistral sliding window, and a low-rank `o_proj` update (against the
merged weight).
"""

import numpy as np
import pytest

try:
  import torch
  import transformers
except ImportError:  # pragma: no cover - depends on the environment
  pytest.skip(
    'the LM parity tests need PyTorch and transformers: '
    'pip install torch==2.13.0 transformers',
    allow_module_level=True,
  )

import jax
import jax.numpy as jnp

from tta_jax.models.lm import generate, hf, model

pytestmark = pytest.mark.torch
ATOL = 2e-5
VOCAB = 97


def _hf_model(tmp_path, kind='llama', **overrides):
  kw = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    attn_implementation='eager',
  )
  kw.update(overrides)
  cls = {
    'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM),
  }[kind]
  torch.manual_seed(0)
  m = cls[1](cls[0](**kw)).eval()
  with torch.no_grad():  # random norms too, so that every weight matters
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  m.save_pretrained(tmp_path)
  config, params = hf.load(tmp_path)
  return m, config, jax.tree.map(jnp.asarray, params)


def _tokens(b, t, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (b, t))


def _torch_logits(m, ids, **kw):
  with torch.no_grad():
    kw = {k: torch.as_tensor(np.asarray(v)) for k, v in kw.items()}
    return m(torch.as_tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize(
  'kind,overrides',
  [
    ('llama', {}),
    ('llama', {'tie_word_embeddings': True, 'rope_theta': 5e5}),
    (
      'llama',
      {
        'rope_scaling': {
          'rope_type': 'llama3',
          'factor': 8.0,
          'low_freq_factor': 1.0,
          'high_freq_factor': 4.0,
          'original_max_position_embeddings': 16,
        }
      },
    ),
    ('llama', {'attention_bias': True, 'mlp_bias': True, 'head_dim': 16}),
    ('mistral', {'sliding_window': 4}),
  ],
)
def test_full_sequence_logits(tmp_path, kind, overrides):
  m, config, params = _hf_model(tmp_path, kind, **overrides)
  ids = _tokens(2, 11)
  ours = model.apply(params, jnp.asarray(ids), config=config).logits
  np.testing.assert_allclose(ours, _torch_logits(m, ids), atol=ATOL)


def test_hidden_states_are_block_inputs(tmp_path):
  m, config, params = _hf_model(tmp_path)
  ids = _tokens(2, 9)
  out = model.apply(params, jnp.asarray(ids), config=config, return_hidden=True)
  with torch.no_grad():
    ref = m(torch.as_tensor(ids), output_hidden_states=True).hidden_states
  assert out.hidden.shape[0] == len(ref) == config.num_layers + 1
  for ours, theirs in zip(out.hidden, ref, strict=True):
    np.testing.assert_allclose(ours, theirs.numpy(), atol=ATOL)


@pytest.mark.parametrize('side', ['left', 'right'])
def test_padded_batch(tmp_path, side):
  m, config, params = _hf_model(tmp_path)
  ids = _tokens(3, 10, seed=1)
  lengths = np.array([10, 6, 3])
  mask = np.zeros((3, 10), bool)
  for i, n in enumerate(lengths):
    if side == 'left':
      mask[i, 10 - n :] = True
    else:
      mask[i, :n] = True
  ids = np.where(mask, ids, 0)
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  ref = _torch_logits(m, ids, attention_mask=mask, position_ids=positions)
  ours = model.apply(
    params, jnp.asarray(ids), config=config, mask=jnp.asarray(mask)
  ).logits
  np.testing.assert_allclose(np.asarray(ours)[mask], ref[mask], atol=ATOL)
  # Each row equals that sequence run alone, unpadded.
  for i in range(3):
    alone = model.apply(params, jnp.asarray(ids[i][mask[i]][None]),
                        config=config).logits[0]  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours)[i][mask[i]], alone, atol=ATOL)


def test_cached_step_by_step_decoding(tmp_path):
  m, config, params = _hf_model(tmp_path, 'mistral', sliding_window=6)
  ids = _tokens(2, 12, seed=2)
  prefix = 5
  with torch.no_grad():
    out = m(torch.as_tensor(ids[:, :prefix]), use_cache=True)
    ref = [out.logits.numpy()]
    pkv = out.past_key_values
    for t in range(prefix, ids.shape[1]):
      out = m(
        torch.as_tensor(ids[:, t : t + 1]), past_key_values=pkv, use_cache=True
      )
      pkv = out.past_key_values
      ref.append(out.logits.numpy())
  cache = model.init_cache(config, 2, 16)
  out = model.apply(params, jnp.asarray(ids[:, :prefix]), config=config,
                    cache=cache)  # fmt: skip
  ours = [np.asarray(out.logits)]
  cache = out.cache
  for t in range(prefix, ids.shape[1]):
    out = model.apply(params, jnp.asarray(ids[:, t : t + 1]), config=config,
                      cache=cache)  # fmt: skip
    cache = out.cache
    ours.append(np.asarray(out.logits))
  for a, b in zip(ours, ref, strict=True):
    np.testing.assert_allclose(a, b, atol=ATOL)


def test_greedy_generation_left_padded(tmp_path):
  m, config, params = _hf_model(tmp_path)
  ids = _tokens(2, 7, seed=3)
  mask = np.ones((2, 7), bool)
  mask[1, :3] = False
  ids = np.where(mask, ids, 0)
  with torch.no_grad():
    ref = m.generate(
      torch.as_tensor(ids),
      attention_mask=torch.as_tensor(mask.astype(np.int64)),
      max_new_tokens=6,
      do_sample=False,
      pad_token_id=0,
      eos_token_id=None,
    )[:, 7:].numpy()
  gen = generate.generate(params, ids, mask, config=config, max_new_tokens=6)
  np.testing.assert_array_equal(gen.tokens, ref)
  # The right-padded batch generates the same continuations.
  right_ids = np.stack([ids[0], np.r_[ids[1, 3:], [0, 0, 0]]])
  right_mask = np.stack([mask[0], np.r_[mask[1, 3:], [False] * 3]])
  gen_r = generate.generate(
    params, right_ids, right_mask, config=config, max_new_tokens=6
  )
  np.testing.assert_array_equal(gen_r.tokens, ref)


def test_lowrank_update_equals_merged_weight(tmp_path):
  m, config, params = _hf_model(tmp_path)
  ids = _tokens(2, 8, seed=4)
  rng = np.random.default_rng(5)
  d = config.hidden_size
  a = rng.normal(size=(config.num_layers, d, 3)).astype(np.float32) * 0.3
  b = rng.normal(size=(config.num_layers, 3, d)).astype(np.float32) * 0.3
  with torch.no_grad():
    for i, layer in enumerate(m.model.layers):
      layer.self_attn.o_proj.weight.add_(torch.as_tensor((a[i] @ b[i]).T))
  ours = model.apply(
    params,
    jnp.asarray(ids),
    config=config,
    lowrank={'o_proj': model.LowRank(jnp.asarray(a), jnp.asarray(b))},
  ).logits
  np.testing.assert_allclose(ours, _torch_logits(m, ids), atol=ATOL)


def test_save_round_trip_loads_in_transformers(tmp_path):
  m, config, params = _hf_model(tmp_path / 'src')
  hf.save(tmp_path / 'out', config, params)
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out')
  ids = _tokens(1, 6)
  np.testing.assert_allclose(
    _torch_logits(again.eval(), ids), _torch_logits(m, ids), atol=1e-6
  )
