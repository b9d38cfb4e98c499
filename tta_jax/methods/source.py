"""Source: the unadapted model, normalising with its source statistics."""

from tta_jax._src import base, params as params_lib


def source(apply_fn, *, cache_class_head: bool = True) -> base.Adapter:
  """No adaptation: predicts with the source parameters and statistics.

  For a dual encoder (`apply_fn.class_head`, `models.vlm`) the class text
  features are encoded once, in `init`, and every step meets them with the
  image features alone: the model's own logits, `scale * features @
  text.T`, without running the text tower per batch (CLIP's 80-template
  ImageNet ensemble is 80,000 prompts).

  Args:
    apply_fn: the model's `ApplyFn`.
    cache_class_head: encode a dual encoder's classes once (False: with
      every batch, as the model's call does).

  Returns:
    An `Adapter` whose state never changes except for its step counter.
  """
  head_fn = getattr(apply_fn, 'class_head', None) if cache_class_head else None

  def init_fn(variables, rng):
    if head_fn is None:
      return base.init_state(variables, rng)
    return base.init_state(variables, rng, extra=head_fn(variables['params']))

  def step_fn(state, batch, *, meta=None, **extra_args):
    del meta, extra_args
    out = apply_fn(state.params, state.batch_stats, batch['image'])
    if head_fn is None:
      logits = out.logits
    else:
      # Only the image features are used: jit drops the model's own
      # logits, and with them the text tower, from the compiled step.
      text, scale = state.extra
      logits = scale * out.features['pre_logits'] @ text.T
    return state._replace(step=state.step + 1), base.StepOutput(logits, {})

  return base.adapter(init_fn, step_fn, params_lib.no_params)
