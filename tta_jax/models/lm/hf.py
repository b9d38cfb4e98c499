"""Hugging Face checkpoints: `config.json` + `*.safetensors`, without torch.

    config, params = hf.load('path/to/Llama-3.2-1B')
    hf.save('out_dir', config, params)   # the inverse, loadable by transformers

Llama-2/3 (incl. Llama-3.1 rope scaling), Mistral (sliding window) and
SmolLM2 share one layout. Every tensor is checked by name and shape against
what the config implies; a missing, unexpected or mis-shaped tensor is a
one-line error naming it and the expected shape.
"""

import json
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from tta_jax.models.lm import model as model_lib

MODEL_TYPES = ('llama', 'mistral')

# (Hugging Face name inside `model.layers.{i}.`, path in our layer params).
_LAYER_TENSORS = (
  ('input_layernorm.weight', ('input_layernorm', 'scale')),
  ('post_attention_layernorm.weight', ('post_attention_layernorm', 'scale')),
  *(
    (f'self_attn.{n}.{w}', ('self_attn', n, k))
    for n in ('q_proj', 'k_proj', 'v_proj', 'o_proj')
    for w, k in (('weight', 'kernel'), ('bias', 'bias'))
  ),
  *(
    (f'mlp.{n}.{w}', ('mlp', n, k))
    for n in ('gate_proj', 'up_proj', 'down_proj')
    for w, k in (('weight', 'kernel'), ('bias', 'bias'))
  ),
)
_TOP_TENSORS = (
  ('model.embed_tokens.weight', ('embed_tokens', 'embedding')),
  ('model.norm.weight', ('norm', 'scale')),
  ('lm_head.weight', ('lm_head', 'kernel')),
)
# Buffers some checkpoints carry that hold no parameters.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


def config_from_hf(d: Mapping[str, Any], *, dtype: str = 'float32'):
  """A `LlamaConfig` from a `config.json` dict (transformers 4 or 5)."""
  model_type = d.get('model_type')
  if model_type not in MODEL_TYPES:
    raise ValueError(
      f'config.json model_type {model_type!r} is not supported; '
      f'supported: {list(MODEL_TYPES)}'
    )
  required = (
    'vocab_size',
    'hidden_size',
    'intermediate_size',
    'num_hidden_layers',
    'num_attention_heads',
  )
  missing = [k for k in required if k not in d]
  if missing:
    raise ValueError(f'config.json lacks {missing}')
  if d.get('hidden_act', 'silu') != 'silu':
    raise ValueError(f'hidden_act {d["hidden_act"]!r} is not silu')
  # transformers 5 keeps the rope settings in `rope_parameters`.
  rope = dict(d.get('rope_parameters') or d.get('rope_scaling') or {})
  theta = rope.pop('rope_theta', d.get('rope_theta', 10000.0))
  kind = rope.get('rope_type', rope.get('type', 'default'))
  scaling = None if kind == 'default' else tuple(sorted(rope.items()))
  return model_lib.LlamaConfig(
    vocab_size=d['vocab_size'],
    hidden_size=d['hidden_size'],
    intermediate_size=d['intermediate_size'],
    num_layers=d['num_hidden_layers'],
    num_heads=d['num_attention_heads'],
    num_kv_heads=d.get('num_key_value_heads') or d['num_attention_heads'],
    head_dim=d.get('head_dim'),
    rope_theta=float(theta),
    rope_scaling=scaling,
    rms_norm_eps=float(d.get('rms_norm_eps', 1e-6)),
    tie_embeddings=bool(d.get('tie_word_embeddings', False)),
    max_position_embeddings=int(d.get('max_position_embeddings', 4096)),
    sliding_window=d.get('sliding_window') if model_type == 'mistral' else None,
    attention_bias=bool(d.get('attention_bias', False)),
    mlp_bias=bool(d.get('mlp_bias', False)),
    dtype=dtype,
  )


def config_to_hf(config: model_lib.LlamaConfig) -> dict[str, Any]:
  """A `config.json` dict transformers reads back into the same model."""
  c = config
  model_type = 'mistral' if c.sliding_window else 'llama'
  rope = {'rope_type': 'default', 'rope_theta': c.rope_theta}
  if c.rope_scaling is not None:
    rope = {**dict(c.rope_scaling), 'rope_theta': c.rope_theta}
  d = {
    'architectures': [
      'MistralForCausalLM' if c.sliding_window else 'LlamaForCausalLM'
    ],
    'model_type': model_type,
    'vocab_size': c.vocab_size,
    'hidden_size': c.hidden_size,
    'intermediate_size': c.intermediate_size,
    'num_hidden_layers': c.num_layers,
    'num_attention_heads': c.num_heads,
    'num_key_value_heads': c.num_kv_heads,
    'head_dim': c.head_size,
    'hidden_act': 'silu',
    'rms_norm_eps': c.rms_norm_eps,
    'rope_theta': c.rope_theta,
    'rope_parameters': rope,
    'tie_word_embeddings': c.tie_embeddings,
    'max_position_embeddings': c.max_position_embeddings,
    'attention_bias': c.attention_bias,
    'mlp_bias': c.mlp_bias,
    'torch_dtype': 'float32',
  }
  if c.rope_scaling is not None:
    d['rope_scaling'] = dict(c.rope_scaling)
  if c.sliding_window:
    d['sliding_window'] = c.sliding_window
  return d


def _expected(config) -> dict[str, tuple[tuple[str, ...], int | None, tuple]]:
  """HF name -> (our path, layer index or None, HF shape)."""
  shapes = jax.eval_shape(
    lambda k: model_lib.init(config, k), jax.random.key(0)
  )
  out = {}

  def hf_shape(path, shape):
    return tuple(reversed(shape)) if path[-1] == 'kernel' else tuple(shape)

  for name, path in _TOP_TENSORS:
    node = shapes
    for k in path:
      node = node.get(k) if isinstance(node, dict) else None
    if node is not None:
      out[name] = (path, None, hf_shape(path, node.shape))
  layers = shapes['layers']
  for sub, path in _LAYER_TENSORS:
    node = layers
    for k in path:
      node = node.get(k) if isinstance(node, dict) else None
    if node is None:
      continue
    for i in range(config.num_layers):
      out[f'model.layers.{i}.{sub}'] = (path, i, hf_shape(path, node.shape[1:]))
  return out


def params_from_state_dict(
  tensors: Mapping[str, np.ndarray],
  config: model_lib.LlamaConfig,
  *,
  dtype=np.float32,
  where: str = 'checkpoint',
):
  """Our parameter pytree from Hugging Face-named [out, in] arrays.

  Raises:
    ValueError: a tensor is missing, unexpected or has the wrong shape
      (the message names it and the shape the config implies).
  """
  expected = _expected(config)
  names = [
    n
    for n in tensors
    if not n.endswith(_IGNORED_SUFFIXES)
    and not (n == 'lm_head.weight' and config.tie_embeddings)
  ]
  unexpected = sorted(set(names) - set(expected))
  if unexpected:
    raise ValueError(
      f'{where} has tensor {unexpected[0]!r} that the config does not '
      f'use ({len(unexpected)} unexpected in all)'
    )
  for name, (_, _, shape) in expected.items():
    if name not in tensors:
      raise ValueError(
        f'{where} lacks tensor {name!r} (expected shape {shape})'
      )
    got = tuple(tensors[name].shape)
    if got != shape:
      raise ValueError(
        f'{where} tensor {name!r} has shape {got}; the config expects {shape}'
      )
  params: dict[str, Any] = {}
  per_layer: dict[tuple[str, ...], list] = {}
  for name, (path, layer, _) in expected.items():
    x = np.asarray(tensors[name])
    x = (x.T if path[-1] == 'kernel' else x).astype(dtype)
    if layer is None:
      node = params
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = x
    else:
      per_layer.setdefault(path, [None] * config.num_layers)[layer] = x
  for path, xs in per_layer.items():
    node = params.setdefault('layers', {})
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = np.stack(xs)
  return params


def state_dict_from_params(params, config) -> dict[str, np.ndarray]:
  """The inverse of `params_from_state_dict` (float32 numpy arrays)."""
  out = {}
  for name, (path, layer, _) in _expected(config).items():
    node = params if layer is None else params['layers']
    for k in path:
      node = node[k]
    x = np.asarray(node if layer is None else node[layer], np.float32)
    out[name] = np.ascontiguousarray(x.T if path[-1] == 'kernel' else x)
  return out


def _safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
  index = directory / 'model.safetensors.index.json'
  if index.exists():
    shards = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    return [directory / s for s in shards]
  files = sorted(directory.glob('*.safetensors'))
  if not files:
    raise FileNotFoundError(f'no *.safetensors files in {directory}')
  return files


def read_safetensors(files) -> Iterator[tuple[str, np.ndarray]]:
  """(name, float32 numpy array) for every tensor, bfloat16 included."""
  from safetensors import safe_open

  cpu = jax.devices('cpu')[0]
  for path in files:
    # The flax backend reads bfloat16 (numpy's does not); keep it on CPU.
    with jax.default_device(cpu), safe_open(path, framework='flax') as f:
      for name in f.keys():
        yield name, np.asarray(f.get_tensor(name), np.float32)


def load(directory, *, dtype: str = 'float32'):
  """(config, params) from a Hugging Face model directory."""
  directory = pathlib.Path(directory)
  cfg_path = directory / 'config.json'
  if not cfg_path.exists():
    raise FileNotFoundError(f'no config.json in {directory}')
  config = config_from_hf(json.loads(cfg_path.read_text()), dtype=dtype)
  tensors = dict(read_safetensors(_safetensors_files(directory)))
  params = params_from_state_dict(
    tensors, config, dtype=jax.numpy.dtype(dtype), where=str(directory)
  )
  return config, params


def save(directory, config, params) -> None:
  """Writes `config.json` and `model.safetensors` (float32)."""
  from safetensors.numpy import save_file

  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'config.json').write_text(
    json.dumps(config_to_hf(config), indent=2)
  )
  save_file(
    state_dict_from_params(params, config),
    str(directory / 'model.safetensors'),
    metadata={'format': 'pt'},
  )
