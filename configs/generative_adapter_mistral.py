r"""Generative Adapter at the paper's scale: Mistral-7B-Instruct-v0.2 (GPU).

The paper's generator: every layer's `o_proj`, d_r 1024, r 128, alpha 64
(s = 1/16), windows of 1,024 tokens, pre-trained on 1 B tokens of
SlimPajama packed to 8,192 tokens (8 chunks + 8 reconstruction windows, a
16 × 16 merge), AdamW lr 1e-4, warmup 100, weight decay 0.01, global
batch 8, about 15 K steps, bf16; then instruction tuning (lr 5e-5).

Evaluate the generator released with the official code (a directory with
`adapter_config.json` and `adapter_model.safetensors`, e.g. from the
`generative-adaptor/Generative-Adapter-Mistral-7B-Instruct-v0.2` repository)
on a local Hugging Face copy of the base model:

  python -m experiments.adapt_main \
      --config=configs/generative_adapter_mistral.py:official=/ckpt/ga \
      --config.model.source=/models/Mistral-7B-Instruct-v0.2 \
      --workdir=runs/ga_mistral

or train one here (offline, the corpus is gensim's text: a stand-in for
SlimPajama; point `train_text` at more text for a real run):

  python -m experiments.meta_train_main \
      --config=configs/generative_adapter_mistral.py \
      --config.model.source=/models/Mistral-7B-Instruct-v0.2 \
      --workdir=runs/ga_mistral
"""

import ml_collections

from configs import common, generative_adapter


def get_config(arg=None):
  arg = common.parse_arg(arg, official='', small=False)
  config = generative_adapter.get_config('small' if arg.small else None)
  if arg.small:  # the seconds-long test version of the base config
    return config
  config.model = dict(
    source='Mistral-7B-Instruct-v0.2',  # a Hugging Face directory
    dtype='bfloat16',
    cache_dir='',
  )
  gen = dict(
    d_r=1024,
    rank=128,
    alpha=64.0,  # s = 64 / 1024 = 1/16
    target='o_proj',
    norm='svd',
    svd='exact',  # the official code: 'randomized' (q = r, niter = 1)
    niter=1,
    tau=1e-6,
    reset_threshold=1e-7,
    norm_eps=1e-6,
    window=1024,
  )
  config.method_configs.ga_pretrain.generator = gen
  config.method_configs.generative_adapter.generator = gen
  config.meta_train.ga_pretrain.update(
    steps=15000,  # ~1 B tokens at 8 x 8,192 tokens per step
    batch_size=8,
    num_chunks=8,
    learning_rate=1e-4,
    warmup_steps=100,
    remat=True,
    checkpoint_every=500,
  )
  config.meta_train.generative_adapter.update(
    steps=2000,
    batch_size=32,
    num_chunks=8,
    learning_rate=5e-5,
    warmup_steps=100,
    remat=True,
    checkpoint_every=500,
  )
  config.chunk_tokens = gen['window']
  config.text.window = gen['window']
  config.batch_size = 4
  config.method_configs.lora_sft.update(rank=16, learning_rate=1e-4)
  if arg.official:
    config.methods = 'no_context,prompting,generative_adapter'
    config.meta_methods = ''
    config.method_configs.generative_adapter.generator_checkpoint = arg.official
  return ml_collections.ConfigDict(config)
