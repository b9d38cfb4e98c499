"""Training the Generative Adapter's generator on a tiny random Llama.

The examples are built as the official code builds them; only the
generator learns (the frozen LM is untouched, though backpropagated
through); an interrupted run resumes to the same generator; a reloaded
generator gives bit-identical adapters; the binaries route LM configs.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests import lm_fixtures
from tta_jax._src import checkpoint
from tta_jax.data.text import corpora, synthetic
from tta_jax.models.generators import generative_adapter as ga
from tta_jax.models.lm import model, tokenizer as tokenizer_lib
from tta_jax.runners import artifacts
from tta_jax.trainers import base, generative_adapter as trainer, lm_base

GEN = dict(d_r=8, rank=2, alpha=0.5, window=8)


@pytest.fixture(scope='module')
def tiny():
  tok = lm_fixtures.tiny_bpe()
  config = lm_fixtures.tiny_config(tok.get_vocab_size())
  params = model.init(config, jax.random.key(0))
  vocab = tok.get_vocab()
  wrapped = tokenizer_lib.Tokenizer(
    tok, bos_id=None, eos_id=vocab['<|im_end|>']
  )
  return config, params, wrapped


def _hparams(**kw):
  hp = dict(
    objective='pretrain',
    steps=4,
    batch_size=2,
    num_chunks=2,
    learning_rate=1e-2,
    warmup_steps=1,
    weight_decay=0.01,
    grad_clip=1.0,
    remat=False,
    checkpoint_every=2,
    init_from='',
    tasks={},
  )
  hp.update(kw)
  return ml_collections.ConfigDict(hp)


def _ctx(tiny, directory, gen=None, **kw):
  config, params, tok = tiny
  docs = [corpora.Document(f'd{i}', ' '.join(lm_fixtures.CORPUS[i:i + 8]))
          for i in range(12)]  # fmt: skip
  episodes = {
    'facts': synthetic.facts(
      4, split='train', people_per_episode=1, questions_per_episode=2
    )
  }
  return lm_base.LMTrainContext(
    lm_config=config,
    lm_params=params,
    tokenizer=tok,
    documents=docs,
    episodes=episodes,
    hparams=_hparams(**kw),
    method_kwargs={'generator': gen or GEN},
    init_meta=None,
    seed=0,
    rng=jax.random.key(0),
    checkpointer=checkpoint.StateCheckpointer(directory),
    log_every=0,
  )


def test_pretraining_examples_follow_the_official_construction():
  row = np.arange(100, 100 + 4 * 8, dtype=np.int32)  # 4 chunks of 8
  for seed in range(20):
    tokens, mask, kind = trainer.pretrain_segments(
      row, 4, 8, np.random.default_rng(seed)
    )
    np.testing.assert_array_equal(tokens[:4].reshape(-1), row)
    np.testing.assert_array_equal(kind, [0] * 4 + [1] * 4)
    for j in range(4):
      window = tokens[4 + j][mask[4 + j]]
      assert 1 <= len(window) <= 8
      start = window[0] - 100
      # A contiguous span that starts and ends inside chunks 0..j.
      np.testing.assert_array_equal(window, row[start : start + len(window)])
      assert start + len(window) <= 8 * (j + 1)
      assert not tokens[4 + j][~mask[4 + j]].any()  # right-padded
  # Step k's batch is a pure function of (seed, k).
  a = trainer.pretrain_segments(row, 4, 8, np.random.default_rng([0, 3, 1]))
  b = trainer.pretrain_segments(row, 4, 8, np.random.default_rng([0, 3, 1]))
  np.testing.assert_array_equal(a[0], b[0])


def test_instruction_tuning_examples(tiny):
  _, _, tok = tiny
  episode = synthetic.facts(
    1, split='train', people_per_episode=1, questions_per_episode=1
  )[0]
  tokens, mask, loss = trainer.sft_segments(
    episode, tok, 4, 48, np.random.default_rng(0)
  )
  qa = episode.qas[0]
  answer_ids = tok.encode(' ' + qa.answer + '\n')
  # The loss covers exactly the answer tokens of the last segment.
  assert not loss[:-1].any()
  np.testing.assert_array_equal(tokens[-1][loss[-1]], answer_ids[: loss.sum()])
  context_ids = tokens[:-1][mask[:-1]]
  assert tok.decode(context_ids) == ''.join(episode.context)
  assert not mask[-2].any()  # 3 context chunks of 4: one all-padding
  m = trainer.sft_merge(3)
  np.testing.assert_array_equal(m[-1], [1, 1, 1, 0])
  with pytest.raises(ValueError, match='more than num_chunks=1'):
    trainer.sft_segments(episode, tok, 1, 48, np.random.default_rng(0))
  with pytest.raises(ValueError, match='do not fit one window of 8'):
    trainer.sft_segments(episode, tok, 40, 8, np.random.default_rng(0))


@pytest.mark.parametrize('objective', ['pretrain', 'sft'])
def test_only_the_generator_learns(tiny, tmp_path, objective):
  config, params, _ = tiny
  before = jax.tree.map(np.asarray, params)
  # (the tiny tokenizer spells invented names letter by letter: a
  # question and its answer take about 40 tokens)
  gen_kw = dict(GEN, window=48) if objective == 'sft' else GEN
  result = trainer.train(
    _ctx(tiny, tmp_path, gen=gen_kw, objective=objective, num_chunks=3)
  )
  assert isinstance(result, base.TrainResult) and result.variables is None
  gen = result.meta
  gc = ga.GAConfig(**gen_kw)
  ga.check_params(gen, gc, config)
  assert np.asarray(gen['w_o']).any()  # W_O left zero: it learned
  assert np.isfinite(result.metrics['loss'])
  # The frozen LM is exactly what it was (the trainer neither returns nor
  # writes into it).
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(params))
  # The LM is backpropagated through (its gradient exists) but is not a
  # parameter of the update: the generator's gradient is what moves.
  batch = trainer.Batch(
    _ctx(tiny, tmp_path / 'b', gen=gen_kw, objective=objective, num_chunks=3),
    gc,
  )
  tokens, mask, loss_mask = (jnp.asarray(x) for x in batch(0))

  def loss(g, p):
    return trainer.loss_fn(
      g,
      p,
      tokens,
      mask,
      loss_mask,
      jax.random.key(0),
      merge=batch.merge,
      gc=gc,
      lm_config=config,
    )[0]

  g_gen, g_lm = jax.grad(loss, argnums=(0, 1))(gen, params)
  for g in jax.tree.leaves((g_gen, g_lm)):
    assert np.isfinite(np.asarray(g)).all()
  assert np.asarray(g_gen['w_o']).any()
  assert any(np.asarray(g).any() for g in jax.tree.leaves(g_lm))


def test_training_resumes_to_the_same_generator(tiny, tmp_path, monkeypatch):
  straight = trainer.train(_ctx(tiny, tmp_path / 'a')).meta
  real_call = trainer.Batch.__call__

  def interrupted(self, step):
    if step == 3:
      raise KeyboardInterrupt
    return real_call(self, step)

  monkeypatch.setattr(trainer.Batch, '__call__', interrupted)
  with pytest.raises(KeyboardInterrupt):
    trainer.train(_ctx(tiny, tmp_path / 'b'))
  monkeypatch.setattr(trainer.Batch, '__call__', real_call)
  ctx = _ctx(tiny, tmp_path / 'b')
  assert ctx.checkpointer.latest_step() == 2
  steps = []

  def counted(self, step):
    steps.append(step)
    return real_call(self, step)

  monkeypatch.setattr(trainer.Batch, '__call__', counted)
  resumed = trainer.train(ctx).meta
  assert steps and min(steps) == 2, steps  # from the checkpoint, not step 0
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)


def test_a_reloaded_generator_gives_bit_identical_adapters(tiny, tmp_path):
  config, params, _ = tiny
  gc = ga.GAConfig(**GEN)
  gen = ga.init(gc, config, jax.random.key(1))
  gen['w_o'] = jax.random.normal(jax.random.key(2), gen['w_o'].shape)
  artifacts.save_trained(
    tmp_path, base.TrainResult(meta=jax.device_get(gen)), {'method': 'ga'}
  )
  loaded = jax.tree.map(jnp.asarray, artifacts.load_meta(tmp_path))
  ids = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
  adapters = [
    ga.adapter(
      g,
      ga.contextualize(g, params, ids, config=gc, lm_config=config),
      gc,
    )
    for g in (gen, loaded)
  ]
  jax.tree.map(np.testing.assert_array_equal, *adapters)


def test_bad_trainer_settings(tiny, tmp_path):
  with pytest.raises(ValueError, match='objective must be one of'):
    trainer.train(_ctx(tiny, tmp_path, objective='distill'))
  with pytest.raises(ValueError, match='fewer than one example'):
    trainer.train(_ctx(tiny, tmp_path, num_chunks=4000))


def test_train_run_routes_lm_configs(monkeypatch, tmp_path):
  """runners.train (what meta_train_main runs) hands runner='lm' configs
  to the LM trainer runner and checks them with its validation."""
  from configs import generative_adapter as cfg
  from tta_jax.runners import lm, train

  config = cfg.get_config('small')
  assert train.validate_config(config) == ['ga_pretrain', 'generative_adapter']
  calls = []
  monkeypatch.setattr(lm, 'train', lambda c, w: calls.append((c.runner, w)))
  train.run(config, tmp_path)
  assert calls == [('lm', tmp_path)]
  config.meta_methods = 'prompting'
  with pytest.raises(ValueError, match='no LM trainer'):
    train.validate_config(config)


def test_config_is_consistent():
  from configs import generative_adapter as cfg
  from tta_jax.runners import lm

  for arg in ('', 'small', 'ablations'):
    config = cfg.get_config(arg)
    names = lm.validate_config(config)
    for name in names:
      owner = lm.artifacts_owner(config, name)
      if lm.method_factory(config, name) == 'generative_adapter':
        assert owner is not None, name  # every generator is trained
    # Training and evaluation stream contexts in the generator's window.
    gen = config.method_configs.generative_adapter.generator
    assert config.chunk_tokens == gen.window
    json.dumps(lm.trainer_settings(config, 'generative_adapter'))


def _main(binary, workdir, model_path, *extra):
  """`python -m experiments.<binary> --config=configs/generative_adapter.py
  :small --workdir=WORKDIR ...` on a tiny GGUF model; returns its log."""
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[1]
  cmd = [
    sys.executable,
    '-m',
    f'experiments.{binary}',
    '--config=configs/generative_adapter.py:small',
    f'--workdir={workdir}',
    f'--config.model.source={model_path}',
    f'--config.model.cache_dir={workdir.parent / "cache"}',
    '--config.text.corpus=lee',
    "--config.train_text.corpora=('lee',)",
    *extra,
  ]
  env = {**os.environ, 'PYTHONPATH': str(root)}
  out = subprocess.run(
    cmd, cwd=root, env=env, capture_output=True, text=True, check=False
  )
  if out.returncode:
    raise RuntimeError(f'{binary} failed:\n{out.stderr[-3000:]}')
  return out.stderr


@pytest.mark.slow
def test_binaries_train_then_evaluate(tmp_path):
  """meta_train_main pre-trains (and instruction-tunes) the generator,
  adapt_main evaluates every method into results.json; both resume."""
  model_path = tmp_path / 'tiny.gguf'
  lm_fixtures.tiny_gguf(model_path)
  workdir = tmp_path / 'work'
  with pytest.raises(RuntimeError, match='run experiments.meta_train_main'):
    _main('adapt_main', workdir, model_path)
  _main('meta_train_main', workdir, model_path)
  for name in ('ga_pretrain', 'generative_adapter'):
    meta = json.loads((workdir / 'meta' / name / 'metadata.json').read_text())
    assert np.isfinite(meta['metrics']['loss'])
  _main('adapt_main', workdir, model_path)
  results = json.loads((workdir / 'results.json').read_text())
  assert set(results['methods']) == {
    'no_context', 'prompting', 'lora_sft', 'ga_pretrain', 'generative_adapter'
  }  # fmt: skip
  assert results['domains'] == ['facts_128', 'icl_1', 'wiki', 'wiki_recon']
  for m in results['methods'].values():
    for dom in results['qa_domains']:
      d = m['domains'][dom]
      assert d['error'] == pytest.approx(1 - d['exact_match'])
    assert m['domains']['wiki_recon']['perplexity'] > 1
  # Finished trainers are not rerun; changed settings are refused.
  log = _main('meta_train_main', workdir, model_path)
  assert log.count('training already done') == 2
  with pytest.raises(RuntimeError, match='other settings'):
    _main(
      'meta_train_main',
      workdir,
      model_path,
      '--config.meta_train.ga_pretrain.learning_rate=0.5',
    )
