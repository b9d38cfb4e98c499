"""Generative Adapter: training the generator of a frozen LM.

Only the generator learns; the LM is frozen and backpropagated through.
Every example is a set of segments of `window` tokens run in one
parallel-prefix pass (`models.generators.generative_adapter.
prefix_forward`), each segment under the adapter its merge-matrix row
selects; the loss is the next-token cross-entropy averaged over every
counted token of the batch (Hugging Face's causal-LM loss).

Objectives (`hparams.objective`):

* 'pretrain' (the paper's reconstruction + completion, built as the
  official code builds it): `num_chunks` consecutive context chunks c_0..
  c_{T-1} of packed train text, then T reconstruction windows; window j
  is the text from st ~ U[0, (j+1)·W − 1] to min(st + W, (j+1)·W),
  right-padded. Merge (`pretrain_merge`): chunk i uses chunks < i
  (completion; chunk 0 none), window j uses chunks 0..j (reconstruction).
  The official run is 8 chunks of 1,024 (a 16 × 16 merge); here T and W
  are hyperparameters.
* 'reconstruction' / 'completion': the same examples with the other
  half's labels masked (the paper's one-task ablations).
* 'sft' (instruction tuning): a train-split episode's context, balanced
  into at most `num_chunks` chunks (each under its prefix's adapter),
  then one segment with the question's cue and answer, under the adapter
  of the whole context; the loss covers the answer tokens only.

AdamW (β 0.9 / 0.999, eps 1e-8, weight decay), linear warmup then linear
decay to 0 (the Hugging Face Trainer's schedule), global-norm clipping.
The loop checkpoints every `checkpoint_every` steps and resumes from the
latest checkpoint; the data of step k depends only on (seed, k), so a
resumed run sees the same batches.
"""

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from tta_jax._src import base as base_lib, context
from tta_jax.models.generators import generative_adapter as ga
from tta_jax.models.lm import model as lm_model
from tta_jax.trainers import base, lm_base

OBJECTIVES = ('pretrain', 'reconstruction', 'completion', 'sft')

# The settings `train` reads (`ctx.hparams`), with the two the LM runner
# reads for it (`init_from`, `tasks`); others are refused as typos.
SETTINGS = frozenset({
  'objective', 'steps', 'batch_size', 'num_chunks', 'learning_rate',
  'warmup_steps', 'weight_decay', 'grad_clip', 'remat', 'checkpoint_every',
  'init_from', 'tasks',
})  # fmt: skip


# ----------------------------------------------------------------------------
# Examples.


def pack_documents(documents, tokenizer, length: int) -> np.ndarray:
  """Train documents tokenised, joined by EOS, cut into rows [N, length]."""
  stream = []
  for d in documents:
    stream.extend(tokenizer.encode(d.text, add_bos=False))
    stream.append(tokenizer.eos_id)
  n = len(stream) // length
  if n == 0:
    raise ValueError(
      f'the training text has {len(stream)} tokens, fewer than one example '
      f'of {length} (num_chunks x window); use more documents or smaller '
      'num_chunks / window'
    )
  return np.asarray(stream[: n * length], np.int32).reshape(n, length)


def pretrain_segments(
  row: np.ndarray, num_chunks: int, window: int, rng: np.random.Generator
):
  """(tokens [2T, W], mask [2T, W], kind [2T]) of one packed row.

  kind 0: context chunk (completion target); 1: reconstruction window.
  """
  t, w = num_chunks, window
  chunks = row.reshape(t, w)
  windows = np.zeros((t, w), np.int32)
  wmask = np.zeros((t, w), bool)
  for j in range(t):
    st = int(rng.integers(0, (j + 1) * w))  # inclusive of (j+1)·W − 1
    ed = min(st + w, (j + 1) * w)
    windows[j, : ed - st] = row[st:ed]
    wmask[j, : ed - st] = True
  tokens = np.concatenate([chunks, windows])
  mask = np.concatenate([np.ones((t, w), bool), wmask])
  kind = np.concatenate([np.zeros(t, np.int32), np.ones(t, np.int32)])
  return tokens, mask, kind


def sft_segments(
  episode, tokenizer, num_chunks: int, window: int, rng: np.random.Generator
):
  """(tokens [T + 1, W], mask, loss_mask) of one episode and a question.

  The context is balanced into <= T chunks (all-padding chunks after);
  the last segment is the question's cue followed by ' <answer>\\n',
  with the loss on the answer tokens.
  """
  # Encoded as the LM runner encodes contexts and prompts at test time.
  ids = tokenizer.encode(''.join(episode.context))
  pieces = context.balanced_split(ids, window)
  if len(pieces) > num_chunks:
    raise ValueError(
      f'an instruction-tuning context of {len(ids)} tokens needs '
      f'{len(pieces)} chunks of {window}, more than num_chunks={num_chunks}'
    )
  qa = episode.qas[int(rng.integers(len(episode.qas)))]
  prompt = tokenizer.encode(qa.cue)
  answer = tokenizer.encode(' ' + qa.answer + '\n', add_bos=False)
  qa_ids = prompt + answer
  if len(qa_ids) > window:
    raise ValueError(
      f'a question and answer of {len(qa_ids)} tokens do not fit one '
      f'window of {window} tokens'
    )
  tokens = np.zeros((num_chunks + 1, window), np.int32)
  mask = np.zeros((num_chunks + 1, window), bool)
  for i, p in enumerate(pieces):
    tokens[i, : len(p)] = p
    mask[i, : len(p)] = True
  tokens[-1, : len(qa_ids)] = qa_ids
  mask[-1, : len(qa_ids)] = True
  loss_mask = np.zeros_like(mask)
  loss_mask[-1, len(prompt) : len(qa_ids)] = True
  return tokens, mask, loss_mask


def sft_merge(num_chunks: int) -> np.ndarray:
  """Context chunks: strictly causal; the QA segment: every chunk."""
  m = ga.completion_merge(num_chunks + 1)
  m[-1, :num_chunks] = 1
  return m


class Batch:
  """Builds the batch of step k (a pure function of the seed and k)."""

  def __init__(self, ctx: lm_base.LMTrainContext, gc: ga.GAConfig):
    hp = ctx.hparams
    self.objective, self.seed = hp.objective, ctx.seed
    self.t, self.w, self.b = hp.num_chunks, gc.window, hp.batch_size
    self.tok = ctx.tokenizer
    if self.objective == 'sft':
      self.episodes = [e for eps in ctx.episodes.values() for e in eps]
      if not self.episodes:
        raise ValueError('objective sft needs train-split episodes')
      self.merge = sft_merge(self.t)
      self.num_examples = len(self.episodes)
    else:
      self.rows = pack_documents(ctx.documents, self.tok, self.t * self.w)
      self.merge = ga.pretrain_merge(self.t)
      self.num_examples = len(self.rows)

  def indices(self, step: int) -> np.ndarray:
    """Example ids of step `step`: epoch-wise seeded permutations."""
    n, b = self.num_examples, self.b
    epoch, k = divmod(step, max(1, n // b))
    order = np.random.default_rng([self.seed, epoch]).permutation(n)
    return np.resize(order, max(n, b))[k * b : (k + 1) * b]

  def __call__(self, step: int):
    toks, masks, losses = [], [], []
    for i, idx in enumerate(self.indices(step)):
      rng = np.random.default_rng([self.seed, step, i])
      if self.objective == 'sft':
        tokens, mask, loss = sft_segments(
          self.episodes[idx], self.tok, self.t, self.w, rng
        )
      else:
        tokens, mask, kind = pretrain_segments(
          self.rows[idx], self.t, self.w, rng
        )
        loss = mask.copy()
        if self.objective == 'reconstruction':
          loss[kind == 0] = False
        elif self.objective == 'completion':
          loss[kind == 1] = False
      toks.append(tokens)
      masks.append(mask)
      losses.append(loss)
    return np.stack(toks), np.stack(masks), np.stack(losses)


# ----------------------------------------------------------------------------
# The loss and the loop.


def loss_fn(gen, lm_params, tokens, mask, loss_mask, key, *, merge, gc,
            lm_config, train=True):  # fmt: skip
  """Mean next-token NLL over counted tokens; also per-kind sums."""
  out = ga.prefix_forward(
    gen,
    lm_params,
    tokens,
    mask,
    merge,
    config=gc,
    lm_config=lm_config,
    train=train,
    key=key,
  )
  b, s, w = tokens.shape
  flat = tokens.reshape(b * s, w)
  logp = lm_model.token_logprobs(out.logits, flat).reshape(b, s, w - 1)
  counted = (loss_mask[..., 1:] & mask[..., :-1] & mask[..., 1:]).astype(
    jnp.float32
  )
  total = jnp.sum(counted)
  nll = -jnp.sum(logp * counted) / jnp.maximum(total, 1.0)
  per_segment = -jnp.sum(logp * counted, -1)  # [B, S]
  return nll, (per_segment, jnp.sum(counted, -1))


def make_optimizer(hp) -> optax.GradientTransformation:
  warmup = min(hp.warmup_steps, max(hp.steps - 1, 0))
  schedule = optax.join_schedules(
    [
      optax.linear_schedule(0.0, hp.learning_rate, max(warmup, 1)),
      optax.linear_schedule(hp.learning_rate, 0.0, max(hp.steps - warmup, 1)),
    ],
    [warmup],
  )
  return optax.chain(
    optax.clip_by_global_norm(hp.grad_clip),
    optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                weight_decay=hp.weight_decay),
  )  # fmt: skip


def train(ctx: lm_base.LMTrainContext) -> base.TrainResult:
  """Trains the generator (see the module docstring)."""
  hp = ctx.hparams
  if hp.objective not in OBJECTIVES:
    raise ValueError(
      f'objective must be one of {OBJECTIVES}, got {hp.objective!r}'
    )
  gc = ga.GAConfig.from_dict(dict(ctx.method_kwargs.get('generator', {})))
  lm_config = ctx.lm_config
  if hp.remat:
    lm_config = dataclasses.replace(lm_config, remat=True)
  if ctx.init_meta is not None:
    ga.check_params(ctx.init_meta, gc, lm_config, ' (init_from)')
    gen = jax.tree.map(jnp.asarray, ctx.init_meta)
  else:
    gen = ga.init(gc, lm_config, jax.random.fold_in(ctx.rng, 0))
  batches = Batch(ctx, gc)
  tx = make_optimizer(hp)
  opt_state = tx.init(gen)
  start, skipped = 0, 0
  template = {
    'gen': gen,
    'opt_state': opt_state,
    'step': np.int64(0),
    'skipped': np.int64(0),
  }
  # The newest checkpoint whose checksum verifies (a damaged one is
  # skipped with a warning).
  found, restored = ctx.checkpointer.restore_latest(template)
  if found is not None:
    gen, opt_state = restored['gen'], restored['opt_state']
    start, skipped = int(restored['step']), int(restored['skipped'])
    logging.info('generative_adapter: resumed at step %d', start)

  grad_fn = jax.value_and_grad(
    lambda g, *a: loss_fn(
      g, *a, merge=batches.merge, gc=gc, lm_config=lm_config
    ),
    has_aux=True,
  )

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step_fn(gen, opt_state, lm_params, tokens, mask, loss_mask, key):
    (loss, aux), grads = grad_fn(gen, lm_params, tokens, mask, loss_mask, key)
    updates, new_opt = tx.update(grads, opt_state, gen)
    new_gen = optax.apply_updates(gen, updates)
    # A step with a non-finite loss or gradient is skipped (counted).
    ok = jnp.isfinite(loss) & base_lib.tree_finite(grads)
    keep = lambda n, o: jnp.where(ok, n, o)
    gen = jax.tree.map(keep, new_gen, gen)
    opt_state = jax.tree.map(keep, new_opt, opt_state)
    return gen, opt_state, loss, aux, optax.tree.norm(grads), ~ok

  t0, tokens_seen, metrics = time.perf_counter(), 0, {}
  window = {'loss': [], 'grad_norm': []}
  for step in range(start, hp.steps):
    tokens, mask, loss_mask = batches(step)
    gen, opt_state, loss, aux, gnorm, bad = step_fn(
      gen,
      opt_state,
      ctx.lm_params,
      jnp.asarray(tokens),
      jnp.asarray(mask),
      jnp.asarray(loss_mask),
      jax.random.fold_in(ctx.rng, step + 1),
    )
    tokens_seen += int(mask.sum())
    skipped += int(bad)
    window['loss'].append(loss)
    window['grad_norm'].append(gnorm)
    done = step + 1
    if ctx.log_every and (done % ctx.log_every == 0 or done == hp.steps):
      metrics = {k: float(np.mean(jax.device_get(v))) for k, v in
                 window.items()}  # fmt: skip
      metrics.update(_split_nll(aux, hp.num_chunks, hp.objective))
      seconds = time.perf_counter() - t0
      metrics['tokens_per_second'] = tokens_seen / max(seconds, 1e-9)
      base.log_progress(
        f'generative_adapter/{hp.objective}',
        done,
        hp.steps,
        metrics,
        seconds,
        'lower learning_rate or raise grad_clip / reset_threshold',
      )
      window = {k: [] for k in window}
    if hp.checkpoint_every and (
      done % hp.checkpoint_every == 0 or done == hp.steps
    ):
      ctx.checkpointer.save(
        done,
        {
          'gen': gen,
          'opt_state': opt_state,
          'step': np.int64(done),
          'skipped': np.int64(skipped),
        },
      )
  if not metrics and hp.steps > start:
    metrics = {'loss': float(loss)}
  metrics['steps'] = hp.steps
  metrics['skipped_steps'] = skipped
  metrics['train_seconds'] = time.perf_counter() - t0
  return base.TrainResult(meta=jax.device_get(gen), metrics=metrics)


def _split_nll(aux, num_chunks: int, objective: str) -> dict[str, float]:
  """Mean NLL of the completion and reconstruction halves (last step)."""
  per_segment, counts = (np.asarray(x) for x in jax.device_get(aux))
  if objective == 'sft':
    return {'answer_nll': float(per_segment.sum() / max(counts.sum(), 1))}
  t = num_chunks
  out: dict[str, Any] = {}
  for name, sl in (
    ('completion_nll', slice(1, t)),
    ('recon_nll', slice(t, None)),
  ):
    n = counts[:, sl].sum()
    if n:
      out[name] = float(per_segment[:, sl].sum() / n)
  return out
