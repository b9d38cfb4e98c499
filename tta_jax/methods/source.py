"""Source: the unadapted model, normalising with its source statistics."""

from tta_jax._src import base, params as params_lib


def source(apply_fn) -> base.Adapter:
  """No adaptation: predicts with the source parameters and statistics.

  Args:
    apply_fn: the model's `ApplyFn`.

  Returns:
    An `Adapter` whose state never changes except for its step counter.
  """

  def init_fn(variables, rng):
    return base.init_state(variables, rng)

  def step_fn(state, batch, *, meta=None, **extra_args):
    del meta, extra_args
    out = apply_fn(state.params, state.batch_stats, batch['image'])
    return state._replace(step=state.step + 1), base.StepOutput(out.logits, {})

  return base.adapter(init_fn, step_fn, params_lib.no_params)
