"""Context methods: a frozen LM absorbs a streamed context, then answers.

The language-model counterpart of `Adapter(init, step)`. A context (a few
documents, in-context demonstrations, a user's dialogue) arrives as a
stream of token chunks; a method turns it into a state (a KV cache, a
generated low-rank adapter, fine-tuned LoRA weights) and then answers
prompts from that state:

    state = method.init(params, rng, batch_size)
    for chunk in chunks:                     # TokenChunk([B, L], [B, L])
      state = method.absorb(params, state, chunk)
    gen = method.answer(params, state, prompt)        # a `Generation`
    logp = method.score(params, state, text)          # [B, L - 1]

All four are pure functions of pytrees and jit as they are: the frozen LM
`params` are an argument (never inside the state, so the state can be
donated), the state is pure data with a fixed structure across `absorb`
calls (so a stream can be a `lax.scan`), and learned method weights (a
generator) come in through `meta`, as in `Adapter.step`. Rows of a batch
are independent contexts; a row whose chunk is all padding is unchanged.
"""

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import jax
import numpy as np

Params = Any
State = Any


class TokenChunk(NamedTuple):
  tokens: jax.Array  # [B, L] int32
  mask: jax.Array  # [B, L] bool: real tokens (padding anywhere)


class ContextInitFn(Protocol):
  def __call__(
    self, params: Params, rng: jax.Array, batch_size: int
  ) -> State: ...


class ContextAbsorbFn(Protocol):
  def __call__(
    self, params: Params, state: State, chunk: TokenChunk, *, meta=None
  ) -> State: ...


class ContextAnswerFn(Protocol):
  """Returns a `tta_jax.models.lm.generate.Generation` per row; `rng` is
  the sampling key (greedy decoding ignores it)."""

  def __call__(
    self,
    params: Params,
    state: State,
    prompt: TokenChunk,
    *,
    meta=None,
    rng: jax.Array | None = None,
  ) -> Any: ...


class ContextScoreFn(Protocol):
  """log p(text.tokens[:, t + 1] | context, text[:, :t + 1]): [B, L - 1]."""

  def __call__(
    self, params: Params, state: State, text: TokenChunk, *, meta=None
  ) -> jax.Array: ...


class ContextMethod(NamedTuple):
  """Pure functions that condition a frozen LM on a streamed context.

  Attributes:
    init: `init(params, rng, batch_size) -> state`, the empty context.
    absorb: `absorb(params, state, chunk, *, meta=None) -> state`.
    answer: `answer(params, state, prompt, *, meta=None, rng=None) ->
      Generation`; prompts are usually left-padded.
    score: `score(params, state, text, *, meta=None) -> [B, L - 1]`
      log-probabilities of each next token of `text` (right-padded) given
      the context; used for perplexity.
  """

  init: ContextInitFn
  absorb: ContextAbsorbFn
  answer: ContextAnswerFn
  score: ContextScoreFn


# ----------------------------------------------------------------------------
# Host-side helpers: contexts to fixed-shape chunk streams.


def balanced_split(ids: Sequence[int], max_len: int) -> list[list[int]]:
  """ceil(N / max_len) consecutive pieces of (nearly) equal length.

  1,500 tokens with max_len 1,024 give 750 + 750, not 1,024 + 476, as the
  Generative Adapter's streaming code splits its contexts.
  """
  if max_len < 1:
    raise ValueError(f'max_len must be >= 1, got {max_len}')
  ids = list(ids)
  if not ids:
    return []
  n = -(-len(ids) // max_len)
  bounds = np.linspace(0, len(ids), n + 1).round().astype(int)
  return [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def chunk_stream(
  contexts: Sequence[Sequence[int]],
  max_len: int,
  *,
  pad_id: int = 0,
  num_chunks: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """A batch of token contexts as a stream of chunks.

  Each row's context is `balanced_split` into chunks of at most `max_len`
  tokens, right-padded to `max_len`. Rows with fewer chunks get all-padding
  chunks at the end.

  Returns:
    (tokens [C, B, max_len] int32, mask [C, B, max_len] bool), C =
    `num_chunks` or the largest number of chunks of any row.
  """
  pieces = [balanced_split(c, max_len) for c in contexts]
  c = max(len(p) for p in pieces) if num_chunks is None else num_chunks
  if any(len(p) > c for p in pieces):
    raise ValueError(f'a context needs more than num_chunks={c} chunks')
  tokens = np.full((c, len(contexts), max_len), pad_id, np.int32)
  mask = np.zeros((c, len(contexts), max_len), bool)
  for b, p in enumerate(pieces):
    for i, piece in enumerate(p):
      tokens[i, b, : len(piece)] = piece
      mask[i, b, : len(piece)] = True
  return tokens, mask
