"""Tiny language-model fixtures: a BPE tokenizer and a GGUF file.

The GGUF file is written the way llama.cpp's converter writes a Llama
checkpoint (q/k rows permuted to the interleaved rotary layout, weights
block-quantised), so the reader is tested end to end without SmolLM2.
"""

import functools
import json

import jax
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from tta_jax.models.lm import hf, model

SPECIALS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')
CHAT_TEMPLATE = (
  '{% for message in messages %}'
  "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
  "'<|im_end|>' + '\n'}}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
  'The code of Vorla Quint is 4821.',
  'Hello world, this is a tiny corpus for a tiny tokenizer.',
  'Numbers like 12345 are split into single digits.',
  'Input: apple\nOutput: elppa',
] * 20


@functools.cache
def tiny_bpe() -> tokenizers.Tokenizer:
  """A byte-level BPE with SmolLM2's pre-tokenizer and special tokens."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=320,
    special_tokens=list(SPECIALS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(CORPUS, trainer)
  return tok


def tiny_config(vocab_size: int, **kw) -> model.LlamaConfig:
  return model.LlamaConfig(
    vocab_size=vocab_size,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_embeddings=kw.pop('tie_embeddings', True),
    max_position_embeddings=256,
    **kw,
  )


def _permute(w, heads):
  """llama.cpp's converter: rotate_half halves -> interleaved pairs."""
  return (
    w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
    .swapaxes(1, 2)
    .reshape(w.shape)
  )


def write_gguf(path, config, params, tok, *, quant='Q8_0', skip=()):
  """Writes `params` (our layout) and `tok` as a llama-architecture GGUF.

  2-D weights are quantised to `quant` (norms stay F32). Returns the
  Hugging Face-layout state dict of the values actually stored
  (quantised then dequantised by `gguf`'s reference code).
  """
  import gguf

  state = hf.state_dict_from_params(params, config)
  gg = {
    'model.embed_tokens.weight': 'token_embd.weight',
    'model.norm.weight': 'output_norm.weight',
    'lm_head.weight': 'output.weight',
  }
  sub = {
    'input_layernorm.weight': 'attn_norm.weight',
    'post_attention_layernorm.weight': 'ffn_norm.weight',
    'self_attn.q_proj.weight': 'attn_q.weight',
    'self_attn.k_proj.weight': 'attn_k.weight',
    'self_attn.v_proj.weight': 'attn_v.weight',
    'self_attn.o_proj.weight': 'attn_output.weight',
    'mlp.gate_proj.weight': 'ffn_gate.weight',
    'mlp.up_proj.weight': 'ffn_up.weight',
    'mlp.down_proj.weight': 'ffn_down.weight',
  }
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_block_count(config.num_layers)
  w.add_context_length(config.max_position_embeddings)
  w.add_embedding_length(config.hidden_size)
  w.add_feed_forward_length(config.intermediate_size)
  w.add_head_count(config.num_heads)
  w.add_head_count_kv(config.num_kv_heads)
  w.add_rope_freq_base(config.rope_theta)
  w.add_layer_norm_rms_eps(config.rms_norm_eps)
  w.add_rope_dimension_count(config.head_size)
  w.add_vocab_size(config.vocab_size)
  vocab = tok.get_vocab()
  tokens = sorted(vocab, key=vocab.get)
  merges = [
    ' '.join(m) if isinstance(m, (list, tuple)) else m
    for m in json.loads(tok.to_str())['model']['merges']
  ]
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('smollm')
  w.add_token_list(tokens)
  w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
  w.add_token_merges(merges)
  w.add_bos_token_id(vocab['<|im_start|>'])
  w.add_eos_token_id(vocab['<|im_end|>'])
  w.add_pad_token_id(vocab['<|im_end|>'])
  w.add_add_bos_token(False)
  w.add_chat_template(CHAT_TEMPLATE)
  stored = {}
  qtype = getattr(gguf.GGMLQuantizationType, quant)
  for name, x in state.items():
    if name in gg:
      gname = gg[name]
    else:
      _, _, i, rest = name.split('.', 3)
      gname = f'blk.{i}.{sub[rest]}'
    if gname in skip:
      continue
    # Blocks run along rows, and the permutation only reorders rows, so
    # the stored values in Hugging Face layout are dequant(quant(x)).
    if x.ndim == 2 and quant != 'F32':
      stored[name] = gguf.quants.dequantize(
        gguf.quants.quantize(x, qtype), qtype
      )
    else:
      stored[name] = x
    if gname.endswith('attn_q.weight'):
      x = _permute(x, config.num_heads)  # noqa: PLW2901
    elif gname.endswith('attn_k.weight'):
      x = _permute(x, config.num_kv_heads)  # noqa: PLW2901
    if x.ndim == 2 and quant != 'F32':
      w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(gname, np.ascontiguousarray(x, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return stored


def tiny_gguf(path, *, quant='Q8_0', seed=0, **kw):
  """(config, params, stored HF state) of a tiny model written to `path`."""
  tok = tiny_bpe()
  config = tiny_config(tok.get_vocab_size(), **kw)
  params = model.init(config, jax.random.key(seed))
  params = jax.tree.map(
    lambda x: (
      np.asarray(x) + 0.05 * np.random.default_rng(seed).normal(size=x.shape)
    ),
    params,
  )
  stored = write_gguf(path, config, params, tok, quant=quant)
  return config, params, stored
