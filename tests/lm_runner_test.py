"""The LM runner end to end through the adapt binary's entry point, on a
tiny GGUF model.

`python -m experiments.adapt_main --config=configs/lm_smollm2.py:small`
with the model swapped for a tiny random Llama written as a GGUF file, so
the whole path (GGUF import, orbax cache, tasks, gensim text, methods,
results files, resume) runs in seconds without SmolLM2.
"""

import json

import pytest

from tests import lm_fixtures
from tta_jax.runners import lm


def _run_main(workdir, **overrides):
  """What `python -m experiments.adapt_main
  --config=configs/lm_smollm2.py:small --workdir=WORKDIR --config.KEY=VALUE`
  runs after parsing: the config check, then `adapt.run`."""
  from configs import lm_smollm2
  from tta_jax.runners import adapt

  config = lm_smollm2.get_config('small')
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.lock()
  adapt.validate_config(config)
  adapt.run(config, str(workdir))


def test_adapt_main_runs_the_lm_runner_and_resumes(tmp_path, monkeypatch):
  model_path = tmp_path / 'tiny.gguf'
  lm_fixtures.tiny_gguf(model_path)
  workdir = tmp_path / 'work'
  overrides = {
    'model.source': str(model_path),
    'model.cache_dir': str(tmp_path / 'cache'),
    'text.corpus': 'lee',
    'text.window': 32,
    'chunk_tokens': 64,
  }
  _run_main(workdir, **overrides)
  results = json.loads((workdir / 'results.json').read_text())
  for suffix in ('md', 'csv', 'png'):
    assert (workdir / f'results.{suffix}').stat().st_size > 0
  assert results['qa_domains'] == ['facts', 'icl']
  assert results['domains'] == ['facts', 'icl', 'wiki']
  assert set(results['methods']) == {'no_context', 'prompting'}
  for m in results['methods'].values():
    for dom in results['qa_domains']:
      d = m['domains'][dom]
      assert d['error'] == pytest.approx(1 - d['exact_match'])
      assert 0 <= d['f1'] <= 1 and d['n'] > 0 and d['tokens_per_second'] > 0
    assert m['domains']['wiki']['perplexity'] > 1
    # ICL episodes cycle through the rules: scores per rule add up.
    icl = m['domains']['icl']
    by = icl['by_task']
    assert set(by) == {'icl_reverse', 'icl_upper'}
    assert sum(v['n'] for v in by.values()) == icl['n']
    assert sum(v['n'] * v['exact_match'] for v in by.values()) == (
      pytest.approx(icl['n'] * icl['exact_match'])
    )
    assert 'by_task' not in m['domains']['facts']  # one kind of episode
    assert m['mean_error'] == pytest.approx(
      (m['domains']['facts']['error'] + m['domains']['icl']['error']) / 2
    )
  # A random model knows nothing; the context can still change the text.
  ppl = {
    n: m['domains']['wiki']['perplexity'] for n, m in results['methods'].items()
  }
  assert ppl['no_context'] != ppl['prompting']

  # Finished methods are read back, not rerun.
  def fail(*args, **kwargs):
    raise AssertionError('a finished method was rerun')

  monkeypatch.setattr(lm, 'run_qa', fail)
  _run_main(workdir, **overrides)
  assert (
    json.loads((workdir / 'results.json').read_text())['methods']
    == results['methods']
  )
  # A changed setting reruns.
  with pytest.raises(AssertionError, match='rerun'):
    _run_main(workdir, **overrides, max_new_tokens=3)


def test_bad_method_and_task_names():
  from configs import lm_smollm2

  config = lm_smollm2.get_config('small')
  config.methods = 'no_context,tent'
  with pytest.raises(ValueError, match=r"unknown LM methods \['tent'\]"):
    lm.validate_config(config)
  config.methods = 'no_context'
  config.prompt_format = 'poem'
  with pytest.raises(
    ValueError, match="prompt_format must be 'completion' or 'chat'"
  ):
    lm.validate_config(config)


def test_generator_window_must_equal_the_context_chunks():
  from configs import generative_adapter as ga_config

  config = ga_config.get_config('small')
  lm.validate_config(config)
  config.chunk_tokens += 16
  with pytest.raises(ValueError, match='windows of 48 tokens but .* 64'):
    lm.validate_config(config)


def test_misspelled_generator_trainer_settings_are_refused():
  from configs import generative_adapter as ga_config

  config = ga_config.get_config('small')
  config.meta_train.generative_adapter.warmup_step = 5  # warmup_steps
  with pytest.raises(
    ValueError,
    match=r"unknown generative_adapter trainer settings \['warmup_step'\]",
  ):
    lm.validate_config(config)
