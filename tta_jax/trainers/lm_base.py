"""What a language-model trainer gets (it returns a `base.TrainResult`).

`base.TrainContext` describes image classifiers (input shapes, classes,
labelled domains); a trainer that learns something around a frozen
language model (a context-to-adapter generator, a learned prompt) needs
other things: the LM, its tokenizer, text to learn from and synthetic
train-split tasks. Everything arrives as an explicit field; the trainer
never reads an experiment config or works out a directory.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple


class LMTrainContext(NamedTuple):
  """The inputs of a language-model trainer."""

  lm_config: Any  # models.lm.LlamaConfig of the frozen LM
  lm_params: Any  # its parameters (never updated)
  tokenizer: Any  # models.lm.Tokenizer
  # Train-split documents (data.text.corpora.Document) for
  # self-supervised objectives; held-out documents are never here.
  documents: Sequence[Any]
  # Train-split episodes of synthetic tasks (data.text.synthetic), by
  # task name, for instruction tuning; test-split entities never appear.
  episodes: Mapping[str, Sequence[Any]]
  hparams: Any  # the trainer's own settings (a ConfigDict, read-only)
  # The method's keyword arguments at test time, so training and
  # evaluation build the same generator.
  method_kwargs: Mapping[str, Any]
  init_meta: Any  # meta-parameters to start from (an earlier phase) or None
  seed: int  # numpy data order
  rng: Any  # jax key for initialisation and sampling
  checkpointer: Any  # checkpoint.StateCheckpointer: resume a long loop
  log_every: int  # steps between progress lines (0: none)
