"""Llama-family language models in JAX: the decoder, generation, import.

    from tta_jax.models import lm
    m = lm.load('smollm2')          # or a .gguf file / Hugging Face dir
    out = lm.apply(m.params, tokens, config=m.config, return_hidden=True)
    lm.generate_text(m, ['The capital of France is'], max_new_tokens=8)

`model` holds the decoder (`apply`, `init`, `LlamaConfig`, `KVCache`,
`LowRank`, `LayerHook`); `generate` the jitted KV-cache generation; `hf`
and `gguf_file` the checkpoint importers; `tokenizer` the `tokenizers`
wrapper with chat templates; `load` the cached loader.
"""

from tta_jax.models.lm import generate, gguf_file, hf, load, model, tokenizer
from tta_jax.models.lm.generate import (
  GREEDY,
  Generation,
  Sampling,
  generate_text,
)
from tta_jax.models.lm.load import LM
from tta_jax.models.lm.model import (
  KVCache,
  LayerHook,
  LlamaConfig,
  LMOutput,
  LowRank,
  apply,
  init,
  init_cache,
)
from tta_jax.models.lm.tokenizer import Tokenizer

__all__ = [
  'GREEDY',
  'LM',
  'Generation',
  'KVCache',
  'LMOutput',
  'LayerHook',
  'LlamaConfig',
  'LowRank',
  'Sampling',
  'Tokenizer',
  'apply',
  'generate',
  'generate_text',
  'gguf_file',
  'hf',
  'init',
  'init_cache',
  'load',
  'model',
  'tokenizer',
]
