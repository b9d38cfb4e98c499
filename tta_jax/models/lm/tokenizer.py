"""Tokenizers built with the `tokenizers` library, and chat templates.

`from_gguf` rebuilds a byte-level BPE tokenizer from a GGUF file's metadata
(vocabulary, merges, the pre-tokenizer llama.cpp names, control tokens);
`from_directory` reads a Hugging Face `tokenizer.json` and
`tokenizer_config.json`. Both give a `Tokenizer` with one-line errors for
empty text, over-long prompts and unknown special tokens.
"""

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models as tok_models, pre_tokenizers

# End-of-turn / end-of-text tokens that stop generation when present.
STOP_TOKENS = (
  '<|endoftext|>',
  '<|im_end|>',
  '<|eot_id|>',
  '<|end_of_text|>',
  '</s>',
)
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
  r' ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+'
)


def _pre_tokenizer(name: str):
  """The pre-tokenizer llama.cpp calls `name` (`tokenizer.ggml.pre`)."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if name in ('default', 'gpt2', 'gpt-2'):
    return byte_level
  if name == 'smollm':  # single digits, then GPT-2's split
    return pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  if name in ('llama3', 'llama-bpe', 'llama-v3'):
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Split(
          tokenizers.Regex(_LLAMA3_SPLIT), behavior='isolated'
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
      ]
    )
  raise ValueError(
    f'GGUF pre-tokenizer {name!r} is not supported; supported: default, '
    'gpt2, smollm, llama-bpe (or load a Hugging Face tokenizer.json)'
  )


class Tokenizer:
  """Text <-> token ids, with the model's special tokens and chat template.

  Attributes:
    bos_id, eos_id, pad_id: special ids (bos may be None).
    add_bos: whether `encode` prepends bos by default.
    stop_ids: ids that end generation (eos and the end-of-turn tokens).
    chat_template: a Jinja template, or None.
  """

  def __init__(
    self,
    tok: tokenizers.Tokenizer,
    *,
    bos_id: int | None,
    eos_id: int,
    pad_id: int | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
  ):
    self.tok = tok
    self.bos_id, self.eos_id = bos_id, eos_id
    self.pad_id = eos_id if pad_id is None else pad_id
    self.add_bos = add_bos
    self.chat_template = chat_template
    vocab = tok.get_vocab(with_added_tokens=True)
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    self.special_tokens = {t: vocab[t] for t in sorted(specials)}
    stops = {eos_id} | {
      self.special_tokens[t] for t in STOP_TOKENS if t in self.special_tokens
    }
    self.stop_ids = tuple(sorted(stops))

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str) -> int:
    """The id of a special token, e.g. '<|im_end|>'."""
    if token not in self.special_tokens:
      raise ValueError(
        f'unknown special token {token!r}; this vocabulary has '
        f'{list(self.special_tokens)[:12]}'
      )
    return self.special_tokens[token]

  def encode(
    self,
    text: str,
    *,
    add_bos: bool | None = None,
    max_length: int | None = None,
    truncate: bool = False,
  ) -> list[int]:
    """Token ids of `text`.

    Args:
      text: non-empty text; special tokens written in it (e.g. from a chat
        template) are recognised.
      add_bos: prepend bos (default: the model's convention).
      max_length: the most tokens allowed (e.g. the model's context).
      truncate: over `max_length`, keep the last `max_length` tokens
        instead of raising.
    """
    if not isinstance(text, str):
      raise TypeError(f'text must be a str, got {type(text).__name__}')
    if not text:
      raise ValueError('empty text: there is nothing to tokenise')
    ids = self.tok.encode(text, add_special_tokens=False).ids
    if (
      self.add_bos if add_bos is None else add_bos
    ) and self.bos_id is not None:
      ids = [self.bos_id] + ids
    if max_length is not None and len(ids) > max_length:
      if not truncate:
        raise ValueError(
          f'text has {len(ids)} tokens, more than max_length={max_length}; '
          'shorten it or pass truncate=True to keep the last tokens'
        )
      ids = ids[-max_length:]
    return ids

  def encode_batch(
    self,
    texts: Sequence[str],
    *,
    side: str = 'left',
    multiple: int = 1,
    **kwargs: Any,
  ) -> tuple[np.ndarray, np.ndarray]:
    """Padded (tokens [B, T] int32, mask [B, T] bool); T is a multiple of
    `multiple`. `side` 'left' suits generation, 'right' scoring."""
    if side not in ('left', 'right'):
      raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not texts:
      raise ValueError('empty batch: no texts to tokenise')
    rows = [self.encode(t, **kwargs) for t in texts]
    return pad_rows(rows, side=side, multiple=multiple, pad_id=self.pad_id)

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def chat(
    self,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
  ) -> str:
    """Renders messages ({'role', 'content'}) with the chat template."""
    if self.chat_template is None:
      raise ValueError('this tokenizer has no chat template')
    import jinja2
    from jinja2 import sandbox

    def raise_exception(message):
      raise jinja2.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True
    )
    env.globals['raise_exception'] = raise_exception
    inv = {v: k for k, v in self.special_tokens.items()}
    return env.from_string(self.chat_template).render(
      messages=list(messages),
      add_generation_prompt=add_generation_prompt,
      bos_token=inv.get(self.bos_id, ''),
      eos_token=inv.get(self.eos_id, ''),
    )

  def to_dict(self) -> dict[str, Any]:
    return {
      'tokenizer_json': self.tok.to_str(),
      'bos_id': self.bos_id,
      'eos_id': self.eos_id,
      'pad_id': self.pad_id,
      'add_bos': self.add_bos,
      'chat_template': self.chat_template,
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Tokenizer':
    d = dict(d)
    tok = tokenizers.Tokenizer.from_str(d.pop('tokenizer_json'))
    return cls(tok, **d)


def pad_rows(rows, *, side='left', multiple=1, pad_id=0):
  """Lists of ids -> (tokens [B, T] int32, mask [B, T] bool)."""
  t = max(len(r) for r in rows)
  t = -(-t // multiple) * multiple
  tokens = np.full((len(rows), t), pad_id, np.int32)
  mask = np.zeros((len(rows), t), bool)
  for i, r in enumerate(rows):
    sl = slice(t - len(r), t) if side == 'left' else slice(0, len(r))
    tokens[i, sl] = r
    mask[i, sl] = True
  return tokens, mask


def from_gguf(reader) -> Tokenizer:
  """A byte-level BPE tokenizer from GGUF metadata (`gguf.GGUFReader`)."""
  from tta_jax.models.lm.gguf_file import field

  kind = field(reader, 'tokenizer.ggml.model')
  if kind != 'gpt2':
    raise ValueError(
      f'GGUF tokenizer model {kind!r} is not supported (byte-level BPE, '
      "'gpt2', is); load the Hugging Face tokenizer.json instead"
    )
  tokens = field(reader, 'tokenizer.ggml.tokens')
  types = field(reader, 'tokenizer.ggml.token_type')
  merges = [
    tuple(m.split(' ', 1)) for m in field(reader, 'tokenizer.ggml.merges')
  ]
  bpe = tok_models.BPE(
    {t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False
  )
  tok = tokenizers.Tokenizer(bpe)
  tok.pre_tokenizer = _pre_tokenizer(
    field(reader, 'tokenizer.ggml.pre', 'default')
  )
  tok.decoder = decoders.ByteLevel()
  # llama.cpp token types: 3 control (special), 4 user-defined.
  added = [
    tokenizers.AddedToken(t, special=ty == 3, normalized=False)
    for t, ty in zip(tokens, types, strict=True)
    if ty in (3, 4)
  ]
  tok.add_tokens(added)
  eos = int(field(reader, 'tokenizer.ggml.eos_token_id'))
  bos = field(reader, 'tokenizer.ggml.bos_token_id')
  return Tokenizer(
    tok,
    bos_id=None if bos is None else int(bos),
    eos_id=eos,
    pad_id=field(reader, 'tokenizer.ggml.padding_token_id', eos),
    add_bos=bool(field(reader, 'tokenizer.ggml.add_bos_token', False)),
    chat_template=field(reader, 'tokenizer.chat_template'),
  )


def from_directory(directory) -> Tokenizer:
  """A Hugging Face tokenizer: `tokenizer.json` + `tokenizer_config.json`."""
  directory = pathlib.Path(directory)
  path = directory / 'tokenizer.json'
  if not path.exists():
    raise FileNotFoundError(f'no tokenizer.json in {directory}')
  tok = tokenizers.Tokenizer.from_file(str(path))
  cfg_path = directory / 'tokenizer_config.json'
  cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
  template = cfg.get('chat_template')
  jinja = directory / 'chat_template.jinja'
  if template is None and jinja.exists():
    template = jinja.read_text()

  def special(key):
    value = cfg.get(key)
    if isinstance(value, Mapping):
      value = value.get('content')
    return None if value is None else tok.token_to_id(value)

  eos = special('eos_token')
  if eos is None:
    raise ValueError(f'{cfg_path} names no eos_token in the vocabulary')
  bos = special('bos_token')
  add_bos = cfg.get('add_bos_token')
  if add_bos is None:  # what the tokenizer's own post-processor does
    probe = tok.encode('a', add_special_tokens=True).ids
    add_bos = bos is not None and probe[:1] == [bos]
  return Tokenizer(
    tok,
    bos_id=bos,
    eos_id=eos,
    pad_id=special('pad_token'),
    add_bos=bool(add_bos),
    chat_template=template,
  )
