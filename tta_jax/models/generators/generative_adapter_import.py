"""The official Generative Adapter checkpoints <-> our generator parameters.

The official code (`fastlora`) wraps each adapted linear of a Hugging Face
model in a PEFT-style module and saves only the tensors whose names hold
`fastlora_` (`adapter_model.safetensors`, or `.bin`) with the PEFT config
(`adapter_config.json`: `fastlora_r`, `fastlora_inter_size`,
`fastlora_max_rank`, `fastlora_alpha`, `fastlora_param`, `fastlora_norm`,
`fastlora_window`, `fastlora_merge`). Per layer i and target T
(`self_attn.o_proj` or `mlp.down_proj`), torch Linear weights are
[out, in]:

    ...layers.{i}.{T}.fastlora_hidden_state_norm.weight  [D]
    ...layers.{i}.{T}.fastlora_A1.weight  [d_r, D_in]   -> w_q = A1ᵀ
    ...layers.{i}.{T}.fastlora_A2.weight  [d_r, D]      -> w_k = A2ᵀ
    ...layers.{i}.{T}.fastlora_A3.weight  [d_r, D]      -> w_v = A3ᵀ
    ...layers.{i}.{T}.fastlora_B.weight   [D_out, d_r]  -> w_o = Bᵀ

(any prefix, e.g. `base_model.model.model.`). The released generator for
Mistral-7B-Instruct-v0.2 has d_r = 1024, r = 128, alpha 64 (s = 1/16).

    config, gen = load_official('path/to/checkpoint_dir', lm_config)
"""

import json
import pathlib
import re
from typing import Any

import numpy as np

from tta_jax.models.generators import generative_adapter as ga

CONFIG_FILE = 'adapter_config.json'
WEIGHT_FILES = ('adapter_model.safetensors', 'adapter_model.bin')
_NAME = re.compile(
  r'(?:^|\.)layers\.(\d+)\.(self_attn\.o_proj|mlp\.down_proj)\.'
  r'fastlora_(A1|A2|A3|B|hidden_state_norm)\.weight$'
)
_MODULES = {'o_proj': 'self_attn.o_proj', 'down_proj': 'mlp.down_proj'}
# Official tensor -> (our parameter, transpose?).
_MAP = {
  'hidden_state_norm': ('hidden_norm', False),
  'A1': ('w_q', True),
  'A2': ('w_k', True),
  'A3': ('w_v', True),
  'B': ('w_o', True),
}


def config_from_official(cfg: dict[str, Any], **overrides) -> ga.GAConfig:
  """A `GAConfig` from an official `adapter_config.json` dict."""
  r = int(cfg['fastlora_r'])
  inter = int(cfg.get('fastlora_inter_size') or r)
  if inter != r:
    raise ValueError(
      f'fastlora_inter_size={inter} differs from fastlora_r={r}: only the '
      'square Gram state of the paper is supported'
    )
  merge = cfg.get('fastlora_merge', 'pre-norm-sum')
  if merge != 'pre-norm-sum':
    raise ValueError(
      f"fastlora_merge={merge!r}: only 'pre-norm-sum' (sum the Gram "
      'states, then normalise) is supported'
    )
  param = cfg.get('fastlora_param', 'o_proj')
  if isinstance(param, (list, tuple)):
    if len(param) != 1:
      raise ValueError(f'fastlora_param={param}: one target is supported')
    param = param[0]
  target = str(param).rsplit('.', 1)[-1]
  return ga.GAConfig(
    d_r=r,
    rank=int(cfg.get('fastlora_max_rank', 128)),
    alpha=float(cfg.get('fastlora_alpha', 64)),
    target=target,
    norm=cfg.get('fastlora_norm', 'svd'),
    window=int(cfg.get('fastlora_window', 1024)),
    **overrides,
  )


def config_to_official(config: ga.GAConfig) -> dict[str, Any]:
  return {
    'peft_type': 'FASTLORA',
    'fastlora_r': config.d_r,
    'fastlora_inter_size': config.d_r,
    'fastlora_max_rank': config.rank,
    'fastlora_alpha': config.alpha,
    'fastlora_param': [config.target],
    'fastlora_norm': config.norm,
    'fastlora_window': config.window,
    'fastlora_merge': 'pre-norm-sum',
    'fastlora_arch': 'aassbb',
  }


def _read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  for name in WEIGHT_FILES:
    path = directory / name
    if not path.exists():
      continue
    if path.suffix == '.safetensors':
      from safetensors.numpy import load_file

      return load_file(str(path))
    try:
      import torch
    except ImportError as e:
      raise ImportError(
        f'{path} is a torch pickle; install torch to read it, or convert '
        'it to adapter_model.safetensors'
      ) from e
    state = torch.load(str(path), map_location='cpu', weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise FileNotFoundError(
    f'no {" or ".join(WEIGHT_FILES)} in {directory} (an official '
    'Generative Adapter checkpoint directory)'
  )


def load_official(
  path, lm_config, **overrides
) -> tuple[ga.GAConfig, dict[str, np.ndarray]]:
  """(GAConfig, generator parameters) of an official checkpoint directory.

  `overrides` set `GAConfig` fields the checkpoint does not fix (e.g.
  `svd='randomized'`). Every tensor is checked against the LM: a missing
  or mismatched one is an error naming it and both shapes.
  """
  directory = pathlib.Path(path)
  cfg_path = directory / CONFIG_FILE
  if not cfg_path.exists():
    raise FileNotFoundError(f'no {CONFIG_FILE} in {directory}')
  config = config_from_official(json.loads(cfg_path.read_text()), **overrides)
  want = ga.param_shapes(config, lm_config)
  module = _MODULES[config.target]
  found: dict[tuple[int, str], np.ndarray] = {}
  for name, x in _read_tensors(directory).items():
    m = _NAME.search(name)
    if m is None or m.group(2) != module:
      continue
    found[(int(m.group(1)), m.group(3))] = np.asarray(x, np.float32)
  params = {}
  for official, (ours, transpose) in _MAP.items():
    layers = []
    for i in range(lm_config.num_layers):
      tensor = f'layers.{i}.{module}.fastlora_{official}.weight'
      expected = want[ours][1:]
      torch_shape = expected[::-1] if transpose else expected
      if (i, official) not in found:
        raise ValueError(
          f'checkpoint {directory} has no tensor {tensor} (expected shape '
          f'{torch_shape})'
        )
      x = found[(i, official)]
      if x.shape != torch_shape:
        raise ValueError(
          f'checkpoint tensor {tensor} has shape {x.shape}, but this LM '
          f'(hidden {lm_config.hidden_size}) and d_r={config.d_r} need '
          f'{torch_shape}'
        )
      layers.append(x.T if transpose else x)
    params[ours] = np.stack(layers)
  return config, params


def save_official(path, config: ga.GAConfig, params, lm_config,
                  prefix: str = 'base_model.model.model.') -> None:  # fmt: skip
  """Writes generator parameters in the official layout (safetensors)."""
  from safetensors.numpy import save_file

  ga.check_params(params, config, lm_config)
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  module = _MODULES[config.target]
  state = {}
  for official, (ours, transpose) in _MAP.items():
    stacked = np.asarray(params[ours], np.float32)
    for i in range(lm_config.num_layers):
      x = stacked[i].T if transpose else stacked[i]
      name = f'{prefix}layers.{i}.{module}.fastlora_{official}.weight'
      state[name] = np.ascontiguousarray(x)
  save_file(state, str(directory / WEIGHT_FILES[0]))
  (directory / CONFIG_FILE).write_text(
    json.dumps(config_to_official(config), indent=2)
  )
