r"""Generative Adapter on SmolLM2-135M, at the scale two CPU cores allow.

Pre-train the generator (reconstruction + completion on gensim's train
text, then instruction tuning on train-split synthetic tasks), then
evaluate it beside the base LM, full-context prompting and a LoRA
fine-tuned on each context:

  python -m experiments.meta_train_main \
      --config=configs/generative_adapter.py --workdir=runs/ga
  python -m experiments.adapt_main \
      --config=configs/generative_adapter.py --workdir=runs/ga

Methods in results.json: `no_context`, `prompting`, `lora_sft`,
`generative_adapter` (pre-trained + instruction-tuned, as the paper's
released generator) and `ga_pretrain` (pre-training only). Domains:
knowledge acquisition (`facts_<k>`: fact documents joined into contexts of
about k tokens, k = 128 .. 2,048, closed-book questions), in-context
learning (`icl_<K>`: K = 1 .. 16 demonstrations), personalisation (a
conversation, then questions about the user), and held-out Wikipedia
perplexity given the previous window (`wiki`, completion) and given the
window itself (`wiki_recon`, reconstruction).

The paper's scale: Mistral-7B-Instruct-v0.2, d_r 1024, r 128, s 1/16,
windows of 1,024 tokens (8 chunks + 8 reconstruction windows, a 16 × 16
merge), 1 B SlimPajama tokens, batch 8, lr 1e-4 (see
configs/generative_adapter_mistral.py). Here: d_r 64, r 16, s 1/16,
windows of 64 tokens with the same 8 + 8 segment structure, 700
pre-training steps (~0.7 M tokens, 1.3 passes over the train text) and 200
instruction-tuning steps.

Arguments (`--config=configs/generative_adapter.py:ARG`):
  ablations: also pre-train and evaluate the paper's cheap ablations
    (Frobenius normalisation, reconstruction only, completion only, the
    FFN down-projection target), each for `ablation_steps` steps beside a
    default run of the same length.
  quick: a shorter evaluation (knowledge at k = 128, 4-shot ICL and
    personalisation on fewer episodes, 8 held-out articles) for a busy
    machine; training is unchanged.
  small: a seconds-long version (tests; pair with a tiny model).
"""

import ml_collections

from configs import common


def _generator(**overrides):
  gen = dict(
    d_r=64,
    rank=16,
    alpha=4.0,  # s = alpha / d_r = 1/16, the paper's Mistral scale
    target='o_proj',
    norm='svd',
    svd='exact',
    niter=1,
    tau=1e-6,
    reset_threshold=1e-7,
    norm_eps=1e-6,
    window=64,
  )
  gen.update(overrides)
  return gen


def _trainer(**overrides):
  hp = dict(
    objective='pretrain',
    # Measured on a quiet 2-core machine: ~3 s per step (1,024 tokens
    # through SmolLM2-135M forward and backward; 6x slower or worse when
    # other jobs share the cores); 700 + 200 steps keep both phases under
    # an hour there. Raise `steps` where cores allow (the paper trains on
    # 1 B tokens).
    steps=700,
    batch_size=1,  # examples of num_chunks x window tokens (+ windows)
    num_chunks=8,  # 8 chunks + 8 reconstruction windows: a 16 x 16 merge
    learning_rate=1e-3,
    warmup_steps=35,
    weight_decay=0.01,
    grad_clip=1.0,
    remat=False,
    checkpoint_every=50,
    init_from='',
    tasks={},
  )
  hp.update(overrides)
  return hp


def get_config(arg=None):
  arg = common.parse_arg(
    arg, small=False, quick=False, ablations=False, ablation_steps=150
  )
  config = ml_collections.ConfigDict()
  config.runner = 'lm'
  config.seed = 0
  config.model = dict(source='smollm2', dtype='float32', cache_dir='')
  gen = _generator()
  config.methods = (
    'no_context,prompting,lora_sft,ga_pretrain,generative_adapter'
  )
  config.method_configs = {
    'no_context': {},
    'prompting': {},
    'lora_sft': dict(
      rank=8,
      alpha=16.0,
      targets=('q_proj', 'v_proj', 'o_proj', 'down_proj'),
      learning_rate=3e-3,
      steps=8,
    ),
    'ga_pretrain': dict(method='generative_adapter', generator=gen),
    # generator_checkpoint: an official checkpoint directory to evaluate
    # instead of the generator trained here (see
    # configs/generative_adapter_mistral.py).
    'generative_adapter': dict(generator=gen, generator_checkpoint=''),
  }
  # Trained methods, in order (a phase may start from an earlier one).
  config.meta_methods = 'ga_pretrain,generative_adapter'
  config.meta_train = {
    'ga_pretrain': _trainer(),
    'generative_adapter': _trainer(
      objective='sft',
      init_from='ga_pretrain',
      steps=200,
      batch_size=2,
      num_chunks=6,  # contexts of up to 6 x 64 tokens
      learning_rate=5e-4,
      warmup_steps=10,
      tasks=dict(
        facts_2=dict(
          task='facts',
          num_episodes=300,
          people_per_episode=2,
          questions_per_episode=3,
        ),
        facts_5=dict(
          task='facts',
          num_episodes=150,
          people_per_episode=5,
          questions_per_episode=3,
        ),
        icl_4=dict(task='icl', num_episodes=150, shots=4),
        icl_16=dict(task='icl', num_episodes=150, shots=16),
        personalization=dict(num_episodes=200, questions_per_episode=3),
      ),
    ),
  }
  # Self-supervised pre-training text: the train side of these corpora
  # (split as the held-out text is).
  config.train_text = dict(corpora=('wikipedia', 'lee'))

  config.split = 'test'
  facts = dict(task='facts', questions_per_episode=3)
  config.tasks = dict(
    # ~53 tokens per fact document: 2, 5, 10, 20, 39 documents per context.
    facts_128=dict(**facts, num_episodes=48, people_per_episode=2),
    facts_256=dict(**facts, num_episodes=32, people_per_episode=5),
    facts_512=dict(**facts, num_episodes=32, people_per_episode=10),
    facts_1k=dict(**facts, num_episodes=16, people_per_episode=20),
    facts_2k=dict(**facts, num_episodes=16, people_per_episode=39),
    icl_1=dict(task='icl', num_episodes=32, shots=1, questions_per_episode=2),
    icl_4=dict(task='icl', num_episodes=32, shots=4, questions_per_episode=2),
    icl_16=dict(task='icl', num_episodes=32, shots=16, questions_per_episode=2),
    personalization=dict(num_episodes=32, questions_per_episode=2),
  )
  config.text = dict(
    corpus='wikipedia',
    held_out_fraction=0.2,
    window=64,  # one generator window: completion from the previous one
    max_windows_per_doc=4,
    max_docs=0,
    reconstruction=True,  # also score each window given itself
  )
  config.prompt_format = 'completion'
  config.chunk_tokens = gen['window']  # stream contexts in generator windows
  config.batch_size = 16
  config.max_new_tokens = 12
  config.bucket = 32
  config.log_every = 10

  if arg.ablations:
    steps = arg.ablation_steps
    short = dict(steps=steps, checkpoint_every=steps)
    variants = {
      'ga_short': ({}, {}),
      'ga_frobenius': (dict(norm='frobenius'), {}),
      'ga_recon_only': ({}, dict(objective='reconstruction')),
      'ga_completion_only': ({}, dict(objective='completion')),
      'ga_ffn': (dict(target='down_proj'), {}),
    }
    for name, (g, t) in variants.items():
      config.method_configs[name] = dict(
        method='generative_adapter', generator=_generator(**g)
      )
      config.meta_train[name] = _trainer(**short, **t)
    config.meta_methods += ',' + ','.join(variants)
    config.methods = ','.join(variants)
    config.tasks = dict(
      facts_128=dict(**facts, num_episodes=48, people_per_episode=2)
    )

  if arg.quick:
    config.tasks = dict(
      facts_128=config.tasks.facts_128,
      icl_4=dict(task='icl', num_episodes=16, shots=4, questions_per_episode=2),
      personalization=dict(num_episodes=16, questions_per_episode=2),
    )
    config.text.max_docs = 8

  if arg.small:
    tiny = dict(d_r=16, rank=4, alpha=1.0, window=48)
    for name in ('ga_pretrain', 'generative_adapter'):
      config.method_configs[name].generator.update(tiny)
    config.meta_train.ga_pretrain.update(
      steps=3, num_chunks=2, checkpoint_every=2
    )
    config.meta_train.generative_adapter.update(
      steps=2, num_chunks=8, batch_size=2
    )
    config.meta_train.generative_adapter.tasks = dict(
      facts=dict(num_episodes=4, people_per_episode=1, questions_per_episode=2),
      icl=dict(num_episodes=2, shots=2, questions_per_episode=1),
    )
    config.method_configs.lora_sft.update(steps=2)
    config.tasks = dict(
      facts_128=dict(**facts, num_episodes=3, people_per_episode=1),
      icl_1=dict(task='icl', num_episodes=2, shots=1, questions_per_episode=1),
    )
    config.text.update(max_docs=2, max_windows_per_doc=2, window=48)
    config.chunk_tokens = 48
    config.batch_size = 4
    config.max_new_tokens = 4
    config.log_every = 1
  return config
