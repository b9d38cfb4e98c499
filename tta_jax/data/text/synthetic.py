"""Seeded synthetic tasks whose answers only the context can give.

Three families, each a list of `Episode`s (a context streamed in chunks,
then questions about it), with disjoint `train` / `test` splits:

* `facts`: documents about invented people ("The code of Vorla Quint is
  4821.", where they grew up, their birth date); questions ask for one
  fact. No pretrained LM can know them, so closed-book accuracy is chance
  and what a method absorbs from the context is measured directly.
* `icl`: in-context learning of a deterministic string map (reverse a
  word, upper-case it, or a label rule) from `Input: / Output:` pairs.
* `personalization`: a dialogue in which a user mentions facts about
  themselves among small talk; questions at the end ask for them.

Every question has a natural form (`question`, for chat prompts) and a
completion cue (`cue`, the text the answer directly follows). Splits are
disjoint by construction: invented names and words are assigned to a
split by a hash, so no train entity or word appears in a test episode.
"""

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

SPLITS = ('train', 'test')


class QA(NamedTuple):
  question: str  # 'What is the code of Vorla Quint?'
  cue: str  # 'The code of Vorla Quint is'
  answer: str  # '4821'


class Episode(NamedTuple):
  task: str
  context: tuple[str, ...]  # chunks in stream order (each ends a unit)
  qas: tuple[QA, ...]


def _in_split(key: str, split: str) -> bool:
  """Deterministic split membership of a name or word (about 50/50)."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; valid: {SPLITS}')
  bit = hashlib.sha256(key.encode()).digest()[0] & 1
  return bit == SPLITS.index(split)


def _rng(task: str, split: str, seed: int) -> np.random.Generator:
  h = hashlib.sha256(f'{task}:{split}:{seed}'.encode()).digest()
  return np.random.default_rng(int.from_bytes(h[:8], 'little'))


_ONSETS = ('b', 'd', 'f', 'g', 'k', 'l', 'm', 'n', 'p', 'r', 's', 't', 'v',
           'z', 'th', 'br', 'dr', 'kr', 'st', 'tr', 'qu', 'sh')  # fmt: skip
_VOWELS = ('a', 'e', 'i', 'o', 'u', 'ai', 'ei', 'ou')
_CODAS = ('', '', 'n', 'r', 'l', 's', 'x', 'th', 'nd', 'rk')
_PLACE_SUFFIXES = ('ford', 'vale', 'holm', 'mere', 'wick', 'stad',
                   'burg', 'haven', 'moor', 'dell')  # fmt: skip
_MONTHS = ('January', 'February', 'March', 'April', 'May', 'June',
           'July', 'August', 'September', 'October', 'November',
           'December')  # fmt: skip


def _word(rng, syllables) -> str:
  return ''.join(
    rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
    for _ in range(syllables)
  )


def _invented(rng, split: str, make, used: set) -> str:
  """A fresh invented string of `split`'s half of the name space."""
  for _ in range(10_000):
    s = make()
    if s not in used and _in_split(s, split):
      used.add(s)
      return s
  raise RuntimeError('could not draw a fresh invented name')


def _person(rng, split, used) -> str:
  return _invented(
    rng,
    split,
    lambda: f'{_word(rng, 2).capitalize()} {_word(rng, 2).capitalize()}',
    used,
  )


def _place(rng, split, used) -> str:
  return _invented(
    rng,
    split,
    lambda: _word(rng, 1).capitalize() + rng.choice(_PLACE_SUFFIXES),
    used,
  )


# ----------------------------------------------------------------------------
# Facts about invented people.


def facts(
  num_episodes: int,
  *,
  split: str = 'test',
  seed: int = 0,
  people_per_episode: int = 2,
  questions_per_episode: int = 3,
) -> list[Episode]:
  """Documents about invented people, one document per person.

  Each document states three facts (code, home town, birth date); the
  questions ask for `questions_per_episode` distinct facts of the episode.
  """
  if questions_per_episode > 3 * people_per_episode:
    raise ValueError('more questions than facts in an episode')
  rng, used = _rng('facts', split, seed), set()
  episodes = []
  for _ in range(num_episodes):
    docs, qas = [], []
    for _ in range(people_per_episode):
      name = _person(rng, split, used)
      code = f'{rng.integers(1000, 10000)}'
      town = _place(rng, split, used)
      date = (
        f'{_MONTHS[rng.integers(12)]} {rng.integers(1, 29)}, '
        f'{rng.integers(1900, 2000)}'
      )
      docs.append(
        f'The code of {name} is {code}. {name} grew up in {town}. '
        f'{name} was born on {date}.\n\n'
      )
      qas += [
        QA(f'What is the code of {name}?', f'The code of {name} is', code),
        QA(f'Where did {name} grow up?', f'{name} grew up in', town),
        QA(f'When was {name} born?', f'{name} was born on', date),
      ]
    pick = rng.choice(len(qas), questions_per_episode, replace=False)
    episodes.append(
      Episode('facts', tuple(docs), tuple(qas[i] for i in sorted(pick)))
    )
  return episodes


# ----------------------------------------------------------------------------
# In-context learning of string maps.

WORDS = tuple(
  """apple river stone cloud bread candle garden pencil window mirror
  basket bottle button carpet castle cherry copper cotton desert dragon
  engine forest galaxy ginger hammer harbor helmet island jacket jungle
  kettle ladder lemon magnet marble meadow monkey needle orange palace
  parrot pepper planet pocket puzzle rabbit rocket saddle salmon silver
  spider spring summer tablet tiger tomato tunnel turtle valley velvet
  violin walnut wizard yellow anchor badger beacon blossom bridge canyon
  cactus cobalt comet crayon dolphin falcon feather fiddle glacier goblet
  granite hazel iron jigsaw kernel lantern lizard lobster maple meteor
  mitten nectar nickel oyster panda pebble pigeon pillow prism quartz
  quill raven ribbon saffron sapphire shadow sparrow squirrel thistle
  thunder timber trumpet tulip vapor walrus willow zebra acorn almond
  arrow banjo bison camel cedar clover coral daisy eagle ember fossil
  gravel heron igloo ivory jasmine koala lagoon llama lotus mango mosaic
  nutmeg olive otter paddle peach poppy quiver radish reef rhino satin
  scarf sequoia sloth sonnet spruce tundra umbrella vanilla wagon whale
  yacht yarn zenith""".split()
)


def _reverse(w):
  return w[::-1]


def _upper(w):
  return w.upper()


def _label(w):
  # A rule the demonstrations must reveal: vowel-initial words are 'alpha'.
  return 'alpha' if w[0] in 'aeiou' else 'beta'


ICL_MAPS = {'reverse': _reverse, 'upper': _upper, 'label': _label}


def icl(
  num_episodes: int,
  *,
  split: str = 'test',
  seed: int = 0,
  maps: Sequence[str] = tuple(ICL_MAPS),
  shots: int = 8,
  questions_per_episode: int = 2,
) -> list[Episode]:
  """`shots` demonstrations `Input: w\\nOutput: f(w)`, then queries.

  Episodes cycle through `maps`. Words come from `split`'s half of
  `WORDS`; query words never appear among the episode's demonstrations.
  """
  unknown = [m for m in maps if m not in ICL_MAPS]
  if unknown:
    raise ValueError(f'unknown ICL maps {unknown}; valid: {sorted(ICL_MAPS)}')
  pool = [w for w in WORDS if _in_split(w, split)]
  if shots + questions_per_episode > len(pool):
    raise ValueError(f'{shots} shots + queries exceed the {len(pool)} words')
  rng = _rng('icl', split, seed)
  episodes = []
  for e in range(num_episodes):
    name = maps[e % len(maps)]
    f = ICL_MAPS[name]
    words = rng.choice(pool, shots + questions_per_episode, replace=False)
    demos = tuple(f'Input: {w}\nOutput: {f(w)}\n\n' for w in words[:shots])
    qas = tuple(
      QA(
        f'Apply the same rule. Input: {w}',
        f'Input: {w}\nOutput:',
        f(w),
      )
      for w in words[shots:]
    )
    episodes.append(Episode(f'icl_{name}', demos, qas))
  return episodes


# ----------------------------------------------------------------------------
# Personalisation: a user's facts spread over a conversation.

_SMALL_TALK = (
  ('How are you today?', 'I am doing well, thank you for asking.'),
  ('Can you recommend a good book?', 'Many people enjoy a classic novel.'),
  ('What is a quick breakfast idea?', 'Oatmeal with fruit is quick.'),
  ('Any tips for sleeping better?', 'Keep a regular bedtime.'),
  ('I watched a film last night.', 'Nice! Did you enjoy it?'),
  ('The weather is nice here.', 'That sounds lovely.'),
  ('I might start running.', 'Running is a great habit.'),
  ('What should I cook tonight?', 'A simple pasta is always good.'),
)


def personalization(
  num_episodes: int,
  *,
  split: str = 'test',
  seed: int = 0,
  small_talk_turns: int = 3,
  questions_per_episode: int = 2,
) -> list[Episode]:
  """Dialogues (one chunk per turn pair) with user facts among small talk.

  The user states three facts (their pet's name, their home town, their
  locker number); questions at the end ask for them.
  """
  rng, used = _rng('personalization', split, seed), set()
  episodes = []
  for _ in range(num_episodes):
    pet = _person(rng, split, used).split()[0]
    town = _place(rng, split, used)
    locker = f'{rng.integers(100, 1000)}'
    facts_ = [
      (f'My cat is called {pet}.', 'What a lovely name for a cat!'),
      (f'I live in {town}.', 'That sounds like a nice place to live.'),
      (f'My locker number is {locker}.', 'Noted, I will remember that.'),
    ]
    talk = [
      _SMALL_TALK[i]
      for i in rng.choice(len(_SMALL_TALK), small_talk_turns, replace=False)
    ]
    turns = facts_ + talk
    order = rng.permutation(len(turns))
    chunks = tuple(
      f'User: {turns[i][0]}\nAssistant: {turns[i][1]}\n\n' for i in order
    )
    qas = [
      QA(
        "What is my cat's name?",
        "User: What is my cat's name?\nAssistant: Your cat is called",
        pet,
      ),
      QA(
        'Where do I live?',
        'User: Where do I live?\nAssistant: You live in',
        town,
      ),
      QA(
        'What is my locker number?',
        'User: What is my locker number?\nAssistant: Your locker number is',
        locker,
      ),
    ]
    pick = sorted(rng.choice(3, questions_per_episode, replace=False))
    episodes.append(
      Episode('personalization', chunks, tuple(qas[i] for i in pick))
    )
  return episodes


TASKS = {'facts': facts, 'icl': icl, 'personalization': personalization}


def build(name: str, num_episodes: int, **kwargs) -> list[Episode]:
  """Episodes of a registered task family."""
  if name not in TASKS:
    raise ValueError(f'unknown task {name!r}; valid: {sorted(TASKS)}')
  return TASKS[name](num_episodes, **kwargs)
