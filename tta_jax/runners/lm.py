"""The language-model runner: context methods on synthetic QA and real text.

`run(config, workdir)` loads the LM (orbax-cached), builds the configured
tasks (one domain each: `facts`, `icl`, `personalization`) and the
held-out text domain (`wiki`), runs every method of `config.methods`, and
writes `WORKDIR/results.{json,md,csv,png}` in the vision runner's schema:

    {'config', 'model', 'domains', 'qa_domains',
     'methods': {name: {'domains': {dom: {'error', 'exact_match', 'f1', 'n',
                                          'seconds', 'tokens_per_second'}},
                        'mean_error', 'mean_f1', ...}}}

`error` is 1 - exact match (SQuAD-normalised) of the generated answer;
the text domain carries `perplexity` instead: each held-out window is
scored given the window before it as context (`no_context` ignores it),
so every method is scored on the same tokens. `mean_error` averages the
QA domains. Finished methods are kept in `WORKDIR/methods/<name>.json`
(keyed by a hash of the settings they depend on) and not rerun.

Every method sees the same context stream (the episode's chunks joined
and cut into `chunk_tokens`-token chunks) and the same prompt (the cue,
or with `prompt_format='chat'` the question in the model's chat
template); they differ only in how they use the context.
"""

import hashlib
import inspect
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from tta_jax import trainers
from tta_jax._src import checkpoint, context, text_metrics
from tta_jax.data.text import corpora, synthetic
from tta_jax.methods import generative_adapter, prompting
from tta_jax.models.generators import generative_adapter_import as ga_import
from tta_jax.models.lm import generate, load as load_lib
from tta_jax.runners import artifacts, configs
from tta_jax.trainers import lm_base

TEXT_DOMAIN = 'wiki'
# Held-out windows scored with themselves as the context (reconstruction).
RECON_DOMAIN = 'wiki_recon'
# Keys of `method_configs.<name>` the LM runner reads (not the factory):
# `generator_checkpoint` is an official Generative Adapter checkpoint
# directory to evaluate instead of a generator trained here.
RUNNER_KEYS = configs.RUNNER_KEYS + ('generator_checkpoint',)


def method_factory(config, name: str) -> str:
  """The `LM_METHODS` entry of a (possibly variant) method name: a name
  with `method_configs.<name>.method` uses that method's factory."""
  return configs.resolve(config, name, prompting.LM_METHODS)


def trained_names(config) -> list[str]:
  """`config.meta_methods`: the LM methods whose trainers run first."""
  return configs.trained_names(config, trainers.LM_TRAINERS, 'LM trainer')


def artifacts_owner(config, name: str) -> str | None:
  """Whose trained generator a method uses (`meta_from`, or its own when
  it is trained), or None."""
  entry = config.method_configs.get(name, {})
  if entry.get('generator_checkpoint'):
    return None  # an official checkpoint, nothing trained here
  if entry.get('meta_from'):
    return entry['meta_from']
  return name if name in trained_names(config) else None


def validate_config(config) -> list[str]:
  names = [m.strip() for m in config.methods.split(',') if m.strip()]
  valid = sorted(set(prompting.LM_METHODS) | set(config.method_configs))
  if not names:
    raise ValueError(f'config.methods is empty; valid: {valid}')
  unknown = [
    m for m in names if method_factory(config, m) not in prompting.LM_METHODS
  ]
  if unknown:
    raise ValueError(f'unknown LM methods {unknown}; valid: {valid}')
  unknown = [
    t for t, spec in config.tasks.items()
    if spec.get('task', t) not in synthetic.TASKS
  ]  # fmt: skip
  if unknown:
    raise ValueError(
      f'unknown tasks {unknown}; valid: {sorted(synthetic.TASKS)} (or '
      "entries naming one with task='...')"
    )
  if config.prompt_format not in ('completion', 'chat'):
    raise ValueError(
      "prompt_format must be 'completion' or 'chat', got "
      f'{config.prompt_format!r}'
    )
  for name in names:  # contexts stream in the generator's own windows
    if method_factory(config, name) != 'generative_adapter':
      continue
    gen = method_kwargs(config, name).get('generator')
    window = generative_adapter.generator_config(gen).window
    if window != config.chunk_tokens:
      raise ValueError(
        f'{name}: the generator works on windows of {window} tokens but '
        f'config.chunk_tokens is {config.chunk_tokens}; set them equal'
      )
  trained_names(config)
  return names


def config_hash(config, name: str) -> str:
  keys = ('model', 'tasks', 'text', 'split', 'seed', 'prompt_format',
          'chunk_tokens', 'batch_size', 'max_new_tokens', 'bucket')  # fmt: skip
  relevant = {k: config[k] for k in keys}
  relevant['method'] = config.method_configs.get(name, {})
  owner = artifacts_owner(config, name)
  if owner is not None:  # a re-trained generator is re-evaluated
    relevant['trained'] = trainer_settings(config, owner)
  blob = json.dumps(configs.jsonable(relevant), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------
# Building the data.


def prompt_parts(tok, qa: synthetic.QA, prompt_format: str) -> str:
  """The prompt text every method is asked (after its context)."""
  if prompt_format == 'completion':
    return qa.cue
  return tok.chat([{'role': 'user', 'content': qa.question}])


def build_tasks(config) -> dict[str, list[synthetic.Episode]]:
  out = {}
  for name, spec in config.tasks.items():
    kwargs = dict(spec)
    n = kwargs.pop('num_episodes')
    task = kwargs.pop('task', name)  # e.g. facts_512: facts at ~512 tokens
    out[name] = synthetic.build(
      task, n, split=config.split, seed=config.seed, **kwargs
    )
  return out


def text_windows(config, tok) -> corpora.Windows:
  """Held-out windows of the configured corpus (`corpora.chunk`)."""
  t = config.text
  docs = {'wikipedia': corpora.wikipedia, 'lee': corpora.lee}[t.corpus]()
  _, held = corpora.split(docs, held_out_fraction=t.held_out_fraction, seed=0)
  if t.max_docs:
    held = held[: t.max_docs]
  return corpora.chunk(
    held,
    lambda s: tok.encode(s, add_bos=False),
    length=t.window,
    max_windows_per_doc=t.max_windows_per_doc,
    pad_id=tok.pad_id,
  )


def _batches(n: int, batch_size: int):
  """Index batches padded to a fixed size (the pad repeats row 0)."""
  for start in range(0, n, batch_size):
    idx = list(range(start, min(n, start + batch_size)))
    yield idx + [idx[0]] * (batch_size - len(idx)), len(idx)


# ----------------------------------------------------------------------------
# Running one method.


class _Meter:
  """Tokens per second after the first batch (which includes compiling)."""

  def __init__(self):
    self.t0 = time.perf_counter()
    self.tokens = 0
    self.first = None  # (time, tokens) at the end of the first batch

  def end_batch(self):
    if self.first is None:
      self.first = (time.perf_counter(), self.tokens)

  @property
  def seconds(self) -> float:
    return time.perf_counter() - self.t0

  @property
  def rate(self) -> float:
    now = time.perf_counter()
    if self.first is not None and self.tokens > self.first[1]:
      return (self.tokens - self.first[1]) / (now - self.first[0])
    return self.tokens / (now - self.t0)

  def summary(self) -> dict[str, float]:
    first = self.first[0] - self.t0 if self.first else self.seconds
    return {
      'seconds': self.seconds,
      'first_batch_seconds': first,
      'tokens': self.tokens,
      'tokens_per_second': self.rate,
    }


class _Compiled:
  """The method's functions, jitted once (state donated on absorb), with
  its meta-parameters (a trained generator, or None) bound."""

  def __init__(self, method: context.ContextMethod, batch_size: int,
               meta=None):  # fmt: skip
    self.init = jax.jit(method.init, static_argnums=(2,))
    absorb = jax.jit(
      lambda p, s, c, m: method.absorb(p, s, c, meta=m), donate_argnums=(1,)
    )
    answer = jax.jit(lambda p, s, c, m, r: method.answer(p, s, c, meta=m,
                                                         rng=r))  # fmt: skip
    score = jax.jit(lambda p, s, c, m: method.score(p, s, c, meta=m))
    self.absorb = lambda p, s, c: absorb(p, s, c, meta)
    self.answer = lambda p, s, c, rng=None: answer(p, s, c, meta, rng)
    self.score = lambda p, s, c: score(p, s, c, meta)
    self.batch_size = batch_size


def _absorb_all(fns, params, state, tokens, mask):
  for c in range(tokens.shape[0]):
    chunk = context.TokenChunk(jnp.asarray(tokens[c]), jnp.asarray(mask[c]))
    state = fns.absorb(params, state, chunk)
  return state


def chunk_length(config, contexts) -> int:
  """`config.chunk_tokens`, or less when every context is shorter (the
  longest context rounded up to `config.bucket`): no all-padding compute."""
  longest = max(len(c) for c in contexts)
  return min(
    config.chunk_tokens, generate.bucket_length(longest, config.bucket)
  )


def context_tokens(tok, episodes) -> list[list[int]]:
  return [tok.encode(''.join(e.context)) for e in episodes]


def run_qa(name, fns, lm, episodes, config, rng) -> dict[str, Any]:
  """Exact match and F1 of one method on one task's episodes."""
  tok = lm.tokenizer
  contexts = context_tokens(tok, episodes)
  nq = len(episodes[0].qas)
  if any(len(e.qas) != nq for e in episodes):
    raise ValueError(
      'every episode of a task needs the same number of questions'
    )
  length = chunk_length(config, contexts)
  num_chunks = max(len(context.balanced_split(c, length)) for c in contexts)
  preds, refs, kinds, examples = [], [], [], []
  meter = _Meter()
  b = config.batch_size
  for bi, (idx, real) in enumerate(_batches(len(episodes), b)):
    tokens, mask = context.chunk_stream(
      [contexts[i] for i in idx],
      length,
      pad_id=tok.pad_id,
      num_chunks=num_chunks,
    )
    state = fns.init(lm.params, jax.random.fold_in(rng, bi), b)
    state = _absorb_all(fns, lm.params, state, tokens, mask)
    if not prompting.context_fits(state):
      raise ValueError(f'{name}: the context overflowed the method state')
    meter.tokens += int(mask[:, :real].sum())
    for q in range(nq):
      texts = [
        prompt_parts(tok, episodes[i].qas[q], config.prompt_format) for i in idx
      ]
      ids, pmask = tok.encode_batch(texts, side='left', multiple=config.bucket)
      gen = fns.answer(
        lm.params,
        state,
        context.TokenChunk(jnp.asarray(ids), jnp.asarray(pmask)),
        rng=jax.random.fold_in(rng, 1000 * bi + q),
      )
      toks, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
      meter.tokens += int(
        pmask[:real].sum() + np.minimum(lengths[:real] + 1, toks.shape[1]).sum()
      )
      for r in range(real):
        text = tok.decode(toks[r, : lengths[r]])
        pred = text_metrics.cut_answer(text)
        qa = episodes[idx[r]].qas[q]
        preds.append(pred)
        refs.append(qa.answer)
        kinds.append(episodes[idx[r]].task)
        if len(examples) < 4:
          examples.append(
            {'prompt': texts[r], 'generated': text, 'answer': qa.answer}
          )
    meter.end_batch()
    if config.log_every and (bi + 1) % config.log_every == 0:
      logging.info(
        '%s: %d/%d episodes, EM %.3f, %.0f tokens/s',
        name,
        min(len(episodes), (bi + 1) * b),
        len(episodes),
        text_metrics.qa_scores(preds, refs)['exact_match'],
        meter.rate,
      )
  scores = text_metrics.qa_scores(preds, refs)
  out = {
    'error': 1.0 - scores['exact_match'],
    'exact_match': scores['exact_match'],
    'f1': scores['f1'],
    'n': len(preds),
    'context_tokens': float(np.mean([len(c) for c in contexts])),
    **meter.summary(),
    'examples': examples,
  }
  if len(set(kinds)) > 1:  # e.g. the ICL rules: scores per rule
    out['by_task'] = {
      kind: {
        **text_metrics.qa_scores(
          [p for p, k in zip(preds, kinds, strict=True) if k == kind],
          [a for a, k in zip(refs, kinds, strict=True) if k == kind],
        ),
        'n': kinds.count(kind),
      }
      for kind in sorted(set(kinds))
    }
  return out


def run_text(name, fns, lm, windows: corpora.Windows, config, rng,
             mode: str = 'completion'):  # fmt: skip
  """Perplexity of held-out windows given a context window.

  `mode` 'completion': each window (that has one) given the window before
  it in its document; 'reconstruction': the same windows given
  themselves. Contexts are streamed in `config.chunk_tokens` chunks.
  """
  if mode not in ('completion', 'reconstruction'):
    raise ValueError(f'unknown text mode {mode!r}')
  domain = TEXT_DOMAIN if mode == 'completion' else RECON_DOMAIN
  prev = {
    (d, p): i
    for i, (d, p) in enumerate(zip(windows.doc, windows.part, strict=True))
  }
  targets = [
    i
    for i, (d, p) in enumerate(zip(windows.doc, windows.part, strict=True))
    if p > 0
  ]
  if not targets:
    raise ValueError(
      'no held-out window has a previous window; use longer documents'
    )
  width = windows.tokens.shape[1]
  length = min(config.chunk_tokens, width)
  num_chunks = -(-width // length)
  nll, count, meter = 0.0, 0, _Meter()
  b = config.batch_size
  for bi, (idx, real) in enumerate(_batches(len(targets), b)):
    rows = [targets[i] for i in idx]
    if mode == 'completion':
      ctx = [prev[(windows.doc[r], windows.part[r] - 1)] for r in rows]
    else:
      ctx = rows
    tokens, mask = context.chunk_stream(
      [windows.tokens[c][windows.mask[c]].tolist() for c in ctx],
      length,
      pad_id=lm.tokenizer.pad_id,
      num_chunks=num_chunks,
    )
    state = fns.init(lm.params, jax.random.fold_in(rng, bi), b)
    state = _absorb_all(fns, lm.params, state, tokens, mask)
    text = context.TokenChunk(
      jnp.asarray(windows.tokens[rows]), jnp.asarray(windows.mask[rows])
    )
    logp = np.asarray(fns.score(lm.params, state, text))[:real]
    valid = windows.mask[rows][:real, 1:] & windows.mask[rows][:real, :-1]
    nll -= float(logp[valid].sum())
    count += int(valid.sum())
    meter.tokens += int(
      windows.mask[rows][:real].sum() + windows.mask[ctx][:real].sum()
    )
    meter.end_batch()
    if config.log_every and (bi + 1) % config.log_every == 0:
      logging.info(
        '%s/%s: %d/%d windows, perplexity %.2f, %.0f tokens/s',
        name,
        domain,
        min(len(targets), (bi + 1) * b),
        len(targets),
        text_metrics.perplexity(nll, count),
        meter.rate,
      )
  return {
    'perplexity': text_metrics.perplexity(nll, count),
    'nll': nll / count,
    'n': len(targets),
    'scored_tokens': count,
    **meter.summary(),
  }


def text_modes(config, windows) -> list[tuple[str, str]]:
  """(mode, domain) of the held-out text domains: completion ('wiki'),
  and reconstruction ('wiki_recon') when `config.text.reconstruction`."""
  if windows is None:
    return []
  modes = [('completion', TEXT_DOMAIN)]
  if config.text.get('reconstruction', False):
    modes.append(('reconstruction', RECON_DOMAIN))
  return modes


def build_method(name, config, lm, tasks, windows):
  """The method's factory called with the config's keyword arguments."""
  tok = lm.tokenizer
  kwargs = dict(
    max_new_tokens=config.max_new_tokens,
    stop_ids=tok.stop_ids,
    pad_id=tok.pad_id,
  )
  factory = prompting.LM_METHODS[method_factory(config, name)]
  if 'max_context_tokens' in inspect.signature(factory).parameters:
    # Context slots (e.g. a KV cache) for the longest context stream.
    need = [1]
    for eps in tasks.values():
      contexts = context_tokens(tok, eps)
      length = chunk_length(config, contexts)
      n = max(len(context.balanced_split(c, length)) for c in contexts)
      need.append(n * length)
    if windows is not None:
      need.append(windows.tokens.shape[1])
    kwargs['max_context_tokens'] = max(need)
  kwargs.update(method_kwargs(config, name))
  return factory(lm.config, **kwargs)


def method_kwargs(config, name: str) -> dict[str, Any]:
  """The factory's keyword arguments of a method (no runner keys)."""
  if name not in config.method_configs:
    return {}
  kwargs = config.method_configs[name].to_dict()
  for key in RUNNER_KEYS:
    kwargs.pop(key, None)
  return kwargs


def load_meta(config, name: str, workdir, lm_config=None):
  """The trained meta-parameters a method uses (None if it has none)."""
  path = config.method_configs.get(name, {}).get('generator_checkpoint')
  if path:
    return official_generator(config, name, path, lm_config)
  owner = artifacts_owner(config, name)
  if owner is None:
    return None
  directory = artifacts.trained_dir(workdir, owner)
  if not artifacts.is_trained(directory):
    raise FileNotFoundError(
      f'{name}: no trained {owner!r} in {directory}; run '
      'experiments.meta_train_main with this config and workdir first'
    )
  artifacts.check_settings(
    directory / 'metadata.json', trainer_settings(config, owner), 'training'
  )
  return jax.tree.map(jnp.asarray, artifacts.load_meta(directory))


def official_generator(config, name: str, path, lm_config):
  """An official checkpoint's generator, checked against the method's
  generator settings (a mismatch names both)."""
  want = generative_adapter.generator_config(
    method_kwargs(config, name).get('generator')
  )
  found, gen = ga_import.load_official(
    path, lm_config, svd=want.svd, niter=want.niter, tau=want.tau
  )
  for key in ('d_r', 'rank', 'alpha', 'target', 'norm'):
    if getattr(found, key) != getattr(want, key):
      raise ValueError(
        f'{name}: the checkpoint in {path} has {key}={getattr(found, key)!r}'
        f' but the config asks for {getattr(want, key)!r}'
      )
  return jax.tree.map(jnp.asarray, gen)


def run_method(name, config, lm, tasks, windows, workdir) -> dict[str, Any]:
  done = workdir / 'methods' / f'{name}.json'
  key = config_hash(config, name)
  if done.exists():
    cached = json.loads(done.read_text())
    if cached.get('config_hash') == key:
      logging.info('%s: already done (%s)', name, done)
      return cached
  fns = _Compiled(
    build_method(name, config, lm, tasks, windows),
    config.batch_size,
    load_meta(config, name, workdir, lm.config),
  )
  rng = jax.random.fold_in(jax.random.key(config.seed), 0)
  doms = {}
  for task, episodes in tasks.items():
    doms[task] = run_qa(f'{name}/{task}', fns, lm, episodes, config, rng)
    logging.info(
      '%s/%s: EM %.3f, F1 %.3f (%d questions, %.0f tokens/s)',
      name,
      task,
      doms[task]['exact_match'],
      doms[task]['f1'],
      doms[task]['n'],
      doms[task]['tokens_per_second'],
    )
  for mode, domain in text_modes(config, windows):
    doms[domain] = run_text(name, fns, lm, windows, config, rng, mode)
    logging.info(
      '%s/%s: perplexity %.3f (%d tokens, %.0f tokens/s)',
      name,
      domain,
      doms[domain]['perplexity'],
      doms[domain]['scored_tokens'],
      doms[domain]['tokens_per_second'],
    )
  qa = [d for d in tasks]
  seconds = sum(d['seconds'] for d in doms.values())
  out = {
    'domains': doms,
    'mean_error': float(np.mean([doms[d]['error'] for d in qa]))
    if qa
    else float('nan'),
    'mean_exact_match': float(np.mean([doms[d]['exact_match'] for d in qa]))
    if qa
    else float('nan'),
    'mean_f1': float(np.mean([doms[d]['f1'] for d in qa]))
    if qa
    else float('nan'),
    'seconds': seconds,
    'tokens_per_second': sum(d['tokens'] for d in doms.values()) / seconds,
    'config_hash': key,
  }
  done.parent.mkdir(parents=True, exist_ok=True)
  done.write_text(json.dumps(out, indent=2))
  return out


# ----------------------------------------------------------------------------
# Results files.


def markdown_table(results) -> str:
  qa, doms = results['qa_domains'], results['domains']
  texts = [d for d in (TEXT_DOMAIN, RECON_DOMAIN) if d in doms]
  header = ['method'] + [f'{d} EM / F1' for d in qa]
  header += [f'{d} ppl' for d in texts]
  header += ['mean err', 'tok/s']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for name, m in results['methods'].items():
    d = m['domains']
    row = [name] + [
      f'{100 * d[t]["exact_match"]:.1f} / {100 * d[t]["f1"]:.1f}' for t in qa
    ]
    row += [f'{d[t]["perplexity"]:.2f}' for t in texts]
    row += [f'{100 * m["mean_error"]:.1f}', f'{m["tokens_per_second"]:.0f}']
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def write_csv(results, path: pathlib.Path) -> None:
  import csv

  fields = ['method', 'domain', 'error', 'exact_match', 'f1', 'perplexity',
            'n', 'seconds', 'tokens_per_second']  # fmt: skip
  with path.open('w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
    w.writeheader()
    for name, m in results['methods'].items():
      for dom, d in m['domains'].items():
        w.writerow({'method': name, 'domain': dom, **d})


def plot(results, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  qa, methods = results['qa_domains'], results['methods']
  fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(qa) + 2), 3.5))
  width = 0.8 / max(1, len(methods))
  for k, (name, m) in enumerate(methods.items()):
    em = [100 * m['domains'][d]['exact_match'] for d in qa]
    label = name
    if TEXT_DOMAIN in m['domains']:
      label += f' (ppl {m["domains"][TEXT_DOMAIN]["perplexity"]:.1f})'
    ax.bar(np.arange(len(qa)) + k * width, em, width, label=label)
  ax.set_xticks(np.arange(len(qa)) + 0.4 - width / 2)
  ax.set_xticklabels(qa)
  ax.set_ylabel('exact match (%)')
  ax.set_title(results['model']['source'].rsplit('/', 1)[-1])
  ax.grid(alpha=0.3, axis='y')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(results, workdir: pathlib.Path) -> str:
  (workdir / 'results.json').write_text(json.dumps(results, indent=2))
  table = markdown_table(results)
  (workdir / 'results.md').write_text(table + '\n')
  write_csv(results, workdir / 'results.csv')
  plot(results, workdir / 'results.png')
  print(table, flush=True)
  return table


def run(config, workdir) -> dict[str, Any]:
  """Scores every method of `config.methods`; writes and returns results."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  names = validate_config(config)
  t0 = time.perf_counter()
  lm = load_lib.load(
    config.model.source,
    dtype=config.model.dtype,
    cache_dir=config.model.cache_dir or None,
  )
  logging.info(
    'Loaded %s (%d parameters) in %.1fs',
    lm.source,
    load_lib.describe(lm)['num_params'],
    time.perf_counter() - t0,
  )
  tasks = build_tasks(config)
  windows = text_windows(config, lm.tokenizer) if config.text.corpus else None
  results = {
    'config': configs.jsonable(config),
    'model': load_lib.describe(lm),
    'domains': list(tasks) + [d for _, d in text_modes(config, windows)],
    'qa_domains': list(tasks),
    'methods': {},
  }
  for name in names:
    results['methods'][name] = run_method(
      name, config, lm, tasks, windows, workdir
    )
  write(results, workdir)
  return results


# ----------------------------------------------------------------------------
# Training (experiments.meta_train_main with an LM config).


def trainer_settings(config, name: str) -> dict:
  """What a trained LM method depends on, as plain JSON data (a phase
  that starts from another phase depends on that one's settings too)."""
  hp = config.meta_train[name]
  settings = configs.jsonable(
    {
      'meta_train': hp,
      'method': method_kwargs(config, name),
      'model': config.model,
      'train_text': config.train_text,
      'seed': config.seed,
    }
  )
  if hp.get('init_from'):
    settings['init_from'] = trainer_settings(config, hp.init_from)
  return settings


def train_documents(config) -> list[corpora.Document]:
  """The train side of every `config.train_text.corpora` corpus (split as
  the held-out text is, so no held-out document is ever trained on)."""
  t = config.train_text
  loaders = {'wikipedia': corpora.wikipedia, 'lee': corpora.lee}
  unknown = [c for c in t.corpora if c not in loaders]
  if unknown:
    raise ValueError(f'unknown corpora {unknown}; valid: {sorted(loaders)}')
  docs = []
  for name in t.corpora:
    train_docs, _ = corpora.split(
      loaders[name](), held_out_fraction=config.text.held_out_fraction, seed=0
    )
    docs += train_docs
  return docs


def train_episodes(config, hp) -> dict[str, list[synthetic.Episode]]:
  """Train-split episodes of `hp.tasks` (instruction tuning)."""
  out = {}
  for name, spec in hp.get('tasks', {}).items():
    kwargs = dict(spec)
    n = kwargs.pop('num_episodes')
    task = kwargs.pop('task', name)
    out[name] = synthetic.build(
      task, n, split='train', seed=config.seed, **kwargs
    )
  return out


def train(config, workdir) -> dict[str, Any]:
  """Trains every `config.meta_methods` entry (in order), then returns
  their metadata; `run` evaluates them. A finished trainer is skipped; an
  interrupted one resumes from its checkpoint."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  names = trained_names(config)
  if not names:
    raise ValueError('config.meta_methods is empty: nothing to train')
  lm = load_lib.load(
    config.model.source,
    dtype=config.model.dtype,
    cache_dir=config.model.cache_dir or None,
  )
  documents = None
  out = {}
  for name in names:
    hp = config.meta_train[name]
    directory = artifacts.trained_dir(workdir, name)
    current = trainer_settings(config, name)
    artifacts.check_settings(directory / 'metadata.json', current, 'training')
    if artifacts.is_trained(directory):
      logging.info('%s: training already done (%s)', name, directory)
      out[name] = json.loads((directory / 'metadata.json').read_text())
      continue
    progress = artifacts.trainer_progress_file(workdir, name)
    artifacts.check_settings(progress, current, 'partial training')
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.write_text(json.dumps({'settings': current}, indent=2))
    init_meta = None
    if hp.get('init_from'):
      if hp.init_from not in names[: names.index(name)]:
        raise ValueError(
          f'{name}: init_from={hp.init_from!r} must be trained before it '
          '(list it earlier in config.meta_methods)'
        )
      init_meta = artifacts.load_meta(
        artifacts.trained_dir(workdir, hp.init_from)
      )
    if documents is None:
      documents = train_documents(config)
    ctx = lm_base.LMTrainContext(
      lm_config=lm.config,
      lm_params=lm.params,
      tokenizer=lm.tokenizer,
      documents=documents,
      episodes=train_episodes(config, hp),
      hparams=hp,
      method_kwargs=method_kwargs(config, name),
      init_meta=init_meta,
      seed=config.seed,
      rng=jax.random.fold_in(jax.random.key(config.seed), 1),
      checkpointer=checkpoint.StateCheckpointer(
        artifacts.trainer_checkpoint_dir(workdir, name)
      ),
      log_every=config.log_every,
    )
    trainer = trainers.LM_TRAINERS[
      configs.resolve(config, name, trainers.LM_TRAINERS)
    ]
    t0 = time.perf_counter()
    logging.info('%s: training (%s)', name, configs.jsonable(hp))
    result = trainer(ctx)
    ctx.checkpointer.close()
    metadata = {
      'method': name,
      'model': load_lib.describe(lm),
      'seconds': time.perf_counter() - t0,
      'settings': current,
    }
    artifacts.save_trained(directory, result, metadata)
    out[name] = {**metadata, 'metrics': result.metrics}
    logging.info(
      '%s: trained in %.0fs: %s', name, metadata['seconds'], result.metrics
    )
  (workdir / 'meta_train.json').write_text(
    json.dumps(out, indent=2, default=float)
  )
  return out
