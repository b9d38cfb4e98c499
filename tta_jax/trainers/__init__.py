"""Trainers: everything that learns before test time.

A trainer is a function `TrainContext -> TrainResult` (`trainers.base`)
registered here by the name of the method whose artifacts it makes:
`experiments.meta_train_main` runs the trainers of `config.meta_methods`,
and `experiments.adapt_main` evaluates the method on what they learned.
Source training (`trainers.source`) is the recipe every source model (and
GeneralizeFormer's meta-source backbones) is trained with.
"""

from collections.abc import Callable

from tta_jax.trainers import (
  base,
  generalizeformer,
  generative_adapter,
  lm_base,
  meta_ttt,
)

TRAINERS: dict[str, Callable[[base.TrainContext], base.TrainResult]] = {
  'meta_ttt': meta_ttt.train,
  'generalizeformer': generalizeformer.train,
}

# Trainers around a frozen language model (`lm_base.LMTrainContext ->
# base.TrainResult`), run by `tta_jax.runners.lm.train`.
LM_TRAINERS: dict[str, Callable[[lm_base.LMTrainContext], base.TrainResult]] = {
  'generative_adapter': generative_adapter.train,
}
