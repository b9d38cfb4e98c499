"""Trainers: everything that learns before test time.

A trainer is a function `TrainContext -> TrainResult` (`trainers.base`)
registered here by the name of the method whose artifacts it makes:
`experiments.meta_train_main` runs the trainers of `config.meta_methods`,
and `experiments.adapt_main` evaluates the method on what they learned.
Source training (`trainers.source`) is the recipe every source model (and
GeneralizeFormer's meta-source backbones) is trained with, unless the
config names another source recipe (`config.pretrain.trainer`, one of
`SOURCE_TRAINERS`: LiT for the vision-language dual encoder).
"""

from collections.abc import Callable

from tta_jax.trainers import (
  base,
  coop,
  generalizeformer,
  generative_adapter,
  lit,
  lm_base,
  meta_ttt,
  mgg,
  sapt,
)

TRAINERS: dict[str, Callable[[base.TrainContext], base.TrainResult]] = {
  'meta_ttt': meta_ttt.train,
  'generalizeformer': generalizeformer.train,
  'mgg': mgg.train,
  # CoOp's prompt context (zero-shot -> `coop`, TPT -> `tpt_coop`).
  'coop': coop.train,
  # TLLA's sharpness-aware prompt tuning (-> `sapt`, and `tlla` with STSS).
  'sapt': sapt.train,
}

# Source recipes other than supervised training (`trainers.source`), by
# `config.pretrain.trainer`: their `TrainResult.variables` are the source
# model.
SOURCE_TRAINERS: dict[str, Callable[[base.TrainContext], base.TrainResult]] = {
  'lit': lit.train,
}

# Trainers around a frozen language model (`lm_base.LMTrainContext ->
# base.TrainResult`), run by `tta_jax.runners.lm.train`.
LM_TRAINERS: dict[str, Callable[[lm_base.LMTrainContext], base.TrainResult]] = {
  'generative_adapter': generative_adapter.train,
}

# The settings each trainer of `TRAINERS`, `SOURCE_TRAINERS` and
# `LM_TRAINERS` reads.
SETTINGS: dict[str, frozenset[str]] = {
  'meta_ttt': meta_ttt.SETTINGS,
  'generalizeformer': generalizeformer.SETTINGS,
  'mgg': frozenset(mgg.DEFAULTS),
  'coop': coop.SETTINGS,
  'sapt': sapt.SETTINGS,
  'lit': lit.SETTINGS,
  'generative_adapter': generative_adapter.SETTINGS,
}


def check_settings(trainer: str, hparams, *, ignore=()) -> None:
  """Raises ValueError naming the settings `trainer` does not read (a
  misspelled key would otherwise leave its default in place). A trainer
  registered without an entry in `SETTINGS` is not checked."""
  allowed = SETTINGS.get(trainer)
  if allowed is None:
    return
  unknown = sorted(set(hparams) - allowed - set(ignore))
  if unknown:
    raise ValueError(
      f'unknown {trainer} trainer settings {unknown}; valid: {sorted(allowed)}'
    )
