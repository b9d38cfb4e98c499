"""OpenAI / OpenCLIP checkpoints -> `VLMClassifier` variables.

OpenAI's released CLIP checkpoints and OpenCLIP's checkpoints of the same
architectures share one state-dict layout (`visual.*` for the image tower,
`transformer.*`, `token_embedding`, `positional_embedding`, `ln_final`,
`text_projection` for the text tower, `logit_scale`). `infer_arch` reads the
architecture from the tensor shapes (as OpenAI's `build_model` does),
`convert` maps the tensors onto the flax towers of `tta_jax.models.vlm.clip`
(RN50-family `ModifiedResNet` or ViT), and `load` builds the classifier and
its variables in one call:

  module, variables = clip_import.load('ViT-B-16.safetensors', classnames)

Safetensors files are read with `safetensors` (no torch); `.pt` / `.bin`
files (OpenAI's TorchScript archives, OpenCLIP's pickled state dicts) need
torch, imported only for them.
"""

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Entries of OpenAI's archives that are not weights.
_IGNORED = ('input_resolution', 'context_length', 'vocab_size', 'attn_mask')


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A checkpoint's tensors as float32 numpy arrays.

  `.safetensors` is read without torch; anything else is tried as a
  TorchScript archive (OpenAI), then as a pickled state dict (OpenCLIP,
  possibly under `'state_dict'` with DDP's `module.` prefix).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'no CLIP checkpoint at {path}')
  if path.suffix == '.safetensors':
    from safetensors.numpy import load_file

    state = load_file(str(path))
  else:
    try:
      import torch
    except ModuleNotFoundError:
      raise ModuleNotFoundError(
        f'reading {path.name} needs torch (pip install torch), or convert '
        'it to .safetensors'
      ) from None
    try:
      tensors = torch.jit.load(str(path), map_location='cpu').state_dict()
    except RuntimeError:
      tensors = torch.load(str(path), map_location='cpu', weights_only=True)
      if 'state_dict' in tensors:
        tensors = tensors['state_dict']
    state = {k: v.float().numpy() for k, v in tensors.items()}
  return clean_state_dict(state)


def clean_state_dict(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The weights of a CLIP state dict (numpy arrays or anything
  `np.asarray` takes) as float32 arrays, without the entries that are not
  weights (OpenAI's `input_resolution`, BN's `num_batches_tracked`, ...)."""
  return {
    k.removeprefix('module.'): np.asarray(v, np.float32)
    for k, v in state.items()
    if k.split('.')[-1] not in _IGNORED and 'num_batches_tracked' not in k
  }


def infer_arch(
  state: Mapping[str, np.ndarray], head_width: int = 64
) -> dict[str, Any]:
  """The architecture (`clip.ARCHS`-style dict) of a CLIP state dict.

  Head counts are not stored; CLIP's use `width // head_width` (64).
  """
  if 'text_projection' not in state or 'token_embedding.weight' not in state:
    raise ValueError(
      'not a CLIP state dict (no text_projection / token_embedding); keys: '
      f'{sorted(state)[:6]}...'
    )
  arch: dict[str, Any] = {}
  if 'visual.proj' in state:
    width = state['visual.conv1.weight'].shape[0]
    patch = state['visual.conv1.weight'].shape[-1]
    grid = round((state['visual.positional_embedding'].shape[0] - 1) ** 0.5)
    arch.update(
      vision_width=width,
      vision_layers=len(
        [
          k
          for k in state
          if k.startswith('visual.') and k.endswith('.attn.in_proj_weight')
        ]
      ),
      vision_heads=width // head_width,
      patch_size=patch,
      image_size=patch * grid,
    )
  else:
    counts = tuple(
      len({k.split('.')[2] for k in state if k.startswith(f'visual.layer{b}.')})
      for b in (1, 2, 3, 4)
    )
    width = state['visual.layer1.0.conv1.weight'].shape[0]
    out = round(
      (state['visual.attnpool.positional_embedding'].shape[0] - 1) ** 0.5
    )
    arch.update(
      vision_width=width,
      vision_layers=counts,
      vision_heads=width * 32 // head_width,
      patch_size=None,
      image_size=out * 32,
    )
  text_width = state['ln_final.weight'].shape[0]
  arch.update(
    embed_dim=state['text_projection'].shape[1],
    context_length=state['positional_embedding'].shape[0],
    vocab_size=state['token_embedding.weight'].shape[0],
    text_width=text_width,
    text_heads=text_width // head_width,
    text_layers=len(
      {k.split('.')[2] for k in state if k.startswith('transformer.resblocks.')}
    ),
  )
  return arch


def _linear(state, prefix, bias=True):
  out = {'kernel': state[f'{prefix}.weight'].T}
  if bias:
    out['bias'] = state[f'{prefix}.bias']
  return out


def _norm(state, prefix):
  return {'scale': state[f'{prefix}.weight'], 'bias': state[f'{prefix}.bias']}


def _conv(state, prefix):
  return {'kernel': state[f'{prefix}.weight'].transpose(2, 3, 1, 0)}


def _bn(state, prefix, params, stats, name):
  params[name] = _norm(state, prefix)
  stats[name] = {
    'mean': state[f'{prefix}.running_mean'],
    'var': state[f'{prefix}.running_var'],
  }


def _block(state, prefix):
  return {
    'ln_1': _norm(state, f'{prefix}.ln_1'),
    'attn': {
      'in_proj': {
        'kernel': state[f'{prefix}.attn.in_proj_weight'].T,
        'bias': state[f'{prefix}.attn.in_proj_bias'],
      },
      'out_proj': _linear(state, f'{prefix}.attn.out_proj'),
    },
    'ln_2': _norm(state, f'{prefix}.ln_2'),
    'c_fc': _linear(state, f'{prefix}.mlp.c_fc'),
    'c_proj': _linear(state, f'{prefix}.mlp.c_proj'),
  }


def _resnet(state, arch):
  params, stats = {}, {}
  for i in (1, 2, 3):
    params[f'conv{i}'] = _conv(state, f'visual.conv{i}')
    _bn(state, f'visual.bn{i}', params, stats, f'bn{i}')
  for s, blocks in enumerate(arch['vision_layers']):
    for j in range(blocks):
      src, name = f'visual.layer{s + 1}.{j}', f'layer{s + 1}_{j}'
      p, b = {}, {}
      for i in (1, 2, 3):
        p[f'conv{i}'] = _conv(state, f'{src}.conv{i}')
        _bn(state, f'{src}.bn{i}', p, b, f'bn{i}')
      if f'{src}.downsample.0.weight' in state:
        p['downsample_0'] = _conv(state, f'{src}.downsample.0')
        _bn(state, f'{src}.downsample.1', p, b, 'downsample_1')
      params[name], stats[name] = p, b
  pool = {'positional_embedding': state['visual.attnpool.positional_embedding']}
  for n in ('q_proj', 'k_proj', 'v_proj', 'c_proj'):
    pool[n] = _linear(state, f'visual.attnpool.{n}')
  params['attnpool'] = pool
  return params, stats


def _vit(state, arch):
  params = {
    'conv1': _conv(state, 'visual.conv1'),
    'class_embedding': state['visual.class_embedding'],
    'positional_embedding': state['visual.positional_embedding'],
    'ln_pre': _norm(state, 'visual.ln_pre'),
    'ln_post': _norm(state, 'visual.ln_post'),
    'proj': state['visual.proj'],
  }
  for i in range(arch['vision_layers']):
    params[f'resblocks_{i}'] = _block(
      state, f'visual.transformer.resblocks.{i}'
    )
  return params, {}


def convert(
  state: Mapping[str, np.ndarray], arch: Mapping[str, Any]
) -> dict[str, Any]:
  """A CLIP state dict -> `{'params': {image, text, logit_scale},
  'batch_stats': {image}}` (no `prompt`: see `load_variables`)."""
  if arch['patch_size'] is None:
    image, stats = _resnet(state, arch)
  else:
    image, stats = _vit(state, arch)
  text = {
    'token_embedding': {'embedding': state['token_embedding.weight']},
    'positional_embedding': state['positional_embedding'],
    'ln_final': _norm(state, 'ln_final'),
    'text_projection': state['text_projection'],
  }
  for i in range(arch['text_layers']):
    text[f'resblocks_{i}'] = _block(state, f'transformer.resblocks.{i}')
  params = {
    'image': image,
    'text': text,
    'logit_scale': np.asarray(state['logit_scale'], np.float32).reshape(()),
  }
  return {'params': params, 'batch_stats': {'image': stats} if stats else {}}


def load_variables(module, state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """`module`'s variables from a CLIP state dict, checked leaf by leaf.

  The context (`prompt/ctx`) is the checkpoint's embedding of the module's
  `ctx_init` words.

  Raises:
    ValueError: the checkpoint and the module disagree on a path or shape.
  """
  from flax import traverse_util

  from tta_jax.models import vlm

  arch = _arch_of(module)
  found = infer_arch(state)
  differ = {k: (found[k], v) for k, v in arch.items() if found[k] != v}
  if differ:
    raise ValueError(
      'checkpoint does not match the model: (checkpoint, model) differ in '
      f'{differ}'
    )
  converted = convert(state, arch)
  shape = (1, *module.input_shape)
  template = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
  template = {
    'params': {k: v for k, v in template['params'].items() if k != 'prompt'},
    'batch_stats': template.get('batch_stats', {}),
  }
  want = traverse_util.flatten_dict(template)
  got = traverse_util.flatten_dict(converted)
  missing = sorted('/'.join(k) for k in want.keys() - got.keys())
  extra = sorted('/'.join(k) for k in got.keys() - want.keys())
  if missing or extra:
    raise ValueError(
      f'checkpoint does not match the model: missing {missing[:5]}, '
      f'unexpected {extra[:5]}'
    )
  for k, v in want.items():
    if tuple(v.shape) != tuple(np.shape(got[k])):
      raise ValueError(
        f'checkpoint {"/".join(k)} has shape {np.shape(got[k])}, the model '
        f'expects {v.shape}'
      )
  variables = jax.tree.map(jnp.asarray, converted)
  params = variables['params']
  if module.n_ctx and module.ctx_init is not None:
    params = vlm.reset_context(module, params)
  elif module.n_ctx:  # CoOp's random initialisation, N(0, 0.02^2)
    dim = module.text.token_dim
    ctx = 0.02 * jax.random.normal(jax.random.key(0), (module.n_ctx, dim))
    params = {**params, 'prompt': {'ctx': ctx}}
  return {'params': params, 'batch_stats': variables['batch_stats']}


def _arch_of(module) -> dict[str, Any]:
  """The `ARCHS`-style dict of a CLIP `VLMClassifier` (heads left out)."""
  from tta_jax.models.vlm import clip

  img, txt = module.image, module.text
  if not isinstance(txt, clip.TextTransformer):
    raise ValueError('not a CLIP classifier (its text tower is not CLIP)')
  if isinstance(img, clip.ModifiedResNet):
    vision = dict(
      vision_layers=tuple(img.layers),
      vision_width=img.width,
      patch_size=None,
      image_size=img.image_size,
    )
  else:
    vision = dict(
      vision_layers=img.layers,
      vision_width=img.width,
      patch_size=img.patch_size,
      image_size=img.image_size,
    )
  return dict(
    **vision,
    embed_dim=txt.output_dim,
    context_length=txt.context_length,
    vocab_size=txt.vocab_size,
    text_width=txt.width,
    text_layers=txt.layers,
  )


def load(
  path: str | pathlib.Path,
  classnames: Sequence[str],
  *,
  head_width: int = 64,
  **classifier_kwargs,
):
  """`(module, variables)`: a CLIP checkpoint as a `VLMClassifier`.

  Args:
    path: `.safetensors`, `.pt` or `.bin` (see `read_state_dict`).
    classnames: the class names of the prompts.
    head_width: attention head width (64 for every released CLIP).
    **classifier_kwargs: `vlm.clip_classifier` arguments (`prompt`,
      `templates`, `n_ctx`, `ctx_init`, `quick_gelu`, `bpe_path`).
  """
  from tta_jax.models import vlm

  state = read_state_dict(path)
  arch = infer_arch(state, head_width)
  module = vlm.clip_classifier(
    classnames=classnames,
    arch='ViT-B/16',
    arch_overrides=arch,
    **classifier_kwargs,
  )
  return module, load_variables(module, state)
