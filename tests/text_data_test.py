"""Text data: gensim's corpora, markup stripping, splits, windows; the
synthetic tasks (determinism, disjoint splits); the SQuAD metrics."""

import functools

import numpy as np
import pytest

from tta_jax._src import context, text_metrics
from tta_jax.data.text import corpora, synthetic


@functools.cache
def _wiki():
  return corpora.wikipedia()


def test_strip_markup():
  raw = (
    "'''Foo''' is a [[bar|Bar]] of [[baz]].<ref>cite</ref> "
    '{{Infobox|a={{x}}}}\n'
    '== History ==\n* item [http://e.com Site]\n'
    '[[File:a.png|thumb|caption [[link]]]]\n{| class="t"\n| cell\n|}\n'
    '<!-- note -->&amp; done'
  )
  assert corpora.strip_markup(raw) == (
    'Foo is a Bar of baz.\nHistory\nitem Site\n\n& done'
  )


def test_wikipedia_is_clean_and_split_is_deterministic():
  docs = _wiki()
  assert len(docs) > 80
  text = ''.join(d.text for d in docs)
  for marker in ('[[', ']]', '{{', '}}', '<ref', "'''"):
    assert text.count(marker) < 20, marker
  train, held = corpora.split(docs, held_out_fraction=0.2)
  again_train, again_held = corpora.split(docs, held_out_fraction=0.2)
  assert [d.title for d in held] == [d.title for d in again_held]
  assert not {d.title for d in train} & {d.title for d in held}
  assert len(train) + len(held) == len(docs)
  assert 0.1 < len(held) / len(docs) < 0.35
  # A document's side does not depend on the others.
  _, held_half = corpora.split(docs[::2], held_out_fraction=0.2)
  assert {d.title for d in held_half} <= {d.title for d in held}
  _, other = corpora.split(docs, held_out_fraction=0.2, seed=1)
  assert {d.title for d in other} != {d.title for d in held}


def test_lee_corpus():
  docs = corpora.lee()
  assert len(docs) > 250
  assert all(len(d.text) >= 200 for d in docs)


def test_chunk_and_pack():
  docs = [corpora.Document('a', 'x' * 10), corpora.Document('b', 'y' * 3)]
  encode = lambda s: [ord(c) for c in s]
  w = corpora.chunk(docs, encode, length=4)
  assert w.tokens.shape == (4, 4)
  np.testing.assert_array_equal(w.doc, [0, 0, 0, 1])
  np.testing.assert_array_equal(w.part, [0, 1, 2, 0])
  np.testing.assert_array_equal(w.mask.sum(1), [4, 4, 2, 3])
  tokens, segs = corpora.pack(docs, encode, length=5, separator_id=0)
  assert tokens.shape == (3, 5)  # 11 + 4 tokens
  assert tokens[2, 0] == 0 and segs[2, 1] == 1  # separator, then doc b
  with pytest.raises(ValueError, match='no windows'):
    corpora.chunk([corpora.Document('e', '')], encode, length=4)
  with pytest.raises(ValueError, match='one side empty'):
    corpora.split(docs, held_out_fraction=0.01)


@pytest.mark.parametrize('task', sorted(synthetic.TASKS))
def test_synthetic_tasks_are_deterministic_and_splits_disjoint(task):
  a = synthetic.build(task, 12, split='test', seed=0)
  assert a == synthetic.build(task, 12, split='test', seed=0)
  assert a != synthetic.build(task, 12, split='test', seed=1)
  train = synthetic.build(task, 40, split='train', seed=0)
  test = synthetic.build(task, 40, split='test', seed=0)
  answers = lambda eps: {qa.answer for e in eps for qa in e.qas}
  contexts = lambda eps: {c for e in eps for c in e.context}
  if task in ('facts', 'personalization'):
    # No invented name or place appears in both splits.
    shared = {x for x in answers(train) & answers(test) if x.isalpha()}
    assert not shared, shared
  if task == 'icl':
    words = lambda eps: {c.split('\n')[0][7:] for e in eps for c in e.context}
    assert not words(train) & words(test)
  if task == 'facts':
    assert not contexts(train) & contexts(test)
  for e in test:
    assert e.context and e.qas
    for qa in e.qas:
      assert qa.answer and qa.cue and qa.question
      if task != 'icl':
        # The context states the answer; the cue alone does not.
        assert qa.answer in ''.join(e.context)
        assert qa.answer not in qa.cue


def test_icl_queries_are_not_demonstrations():
  for e in synthetic.icl(30, shots=8):
    demos = {c.split('\n')[0] for c in e.context}
    for qa in e.qas:
      assert qa.cue.split('\n')[0] not in demos
  with pytest.raises(ValueError, match='unknown ICL maps'):
    synthetic.icl(1, maps=('rot13',))
  with pytest.raises(ValueError, match='unknown split'):
    synthetic.facts(1, split='validation')


def test_squad_metrics():
  assert text_metrics.normalize_answer('The  Cat, sat!') == 'cat sat'
  assert text_metrics.exact_match('the 4821.', '4821') == 1.0
  assert text_metrics.exact_match('4822', '4821') == 0.0
  assert text_metrics.token_f1('March 3 1911', 'March 3, 1911') == 1.0
  assert text_metrics.token_f1(
    'born March 3', 'March 3, 1911'
  ) == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
  assert text_metrics.token_f1('x', ['y', 'x z']) == pytest.approx(2 / 3)
  assert text_metrics.qa_scores(['a b', 'c'], ['a b', 'd']) == {
    'exact_match': 0.5,
    'f1': 0.5,
  }
  assert text_metrics.cut_answer(' 4821. The code of X') == '4821'
  assert text_metrics.cut_answer(' March 3, 1911.\nMore') == 'March 3, 1911'
  assert text_metrics.perplexity(0.0, 5) == 1.0
  with pytest.raises(ValueError, match='no predictions'):
    text_metrics.qa_scores([], [])
  with pytest.raises(ValueError, match='zero tokens'):
    text_metrics.perplexity(1.0, 0)


def test_balanced_chunk_stream():
  assert [len(p) for p in context.balanced_split(range(1500), 1024)] == [
    750,
    750,
  ]
  assert context.balanced_split([], 4) == []
  tokens, mask = context.chunk_stream([[1, 2, 3, 4, 5], [7]], 3, pad_id=0)
  assert tokens.shape == (2, 2, 3)
  np.testing.assert_array_equal(tokens[:, 0], [[1, 2, 0], [3, 4, 5]])
  np.testing.assert_array_equal(mask[:, 1], [[1, 0, 0], [0, 0, 0]])  # [7]
  with pytest.raises(ValueError, match='more than num_chunks=1'):
    context.chunk_stream([[1, 2, 3, 4]], 2, num_chunks=1)
