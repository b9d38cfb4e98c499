"""Scoring the logits a method returns: error, ECE, NLL.

`per_example` runs on device inside the stream loop (no host round trip);
the runner concatenates its outputs and `summarize` reduces them per domain
on the host.
"""

import jax
import jax.numpy as jnp
import numpy as np

from tta_jax._src import losses

ECE_BINS = 15


def per_example(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per-example correctness, NLL and confidence. [B, K], [B] -> [B] each."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return {
    'correct': (jnp.argmax(logits, -1) == labels),
    'nll': losses.cross_entropy(logp, labels),
    'confidence': jnp.exp(jnp.max(logp, -1)),
  }


def expected_calibration_error(
  confidence: np.ndarray, correct: np.ndarray, num_bins: int = ECE_BINS
) -> float:
  """ECE with equal-width confidence bins (Guo et al. 2017)."""
  confidence = np.asarray(confidence, np.float64)
  correct = np.asarray(correct, np.float64)
  if confidence.size == 0:
    return float('nan')
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  bins = np.clip(
    np.digitize(confidence, edges[1:-1], right=True), 0, num_bins - 1
  )
  ece = 0.0
  for b in range(num_bins):
    sel = bins == b
    if sel.any():
      ece += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
  return float(ece)


def summarize(records: dict[str, np.ndarray]) -> dict[str, float]:
  """error, ece, nll and n of a set of per-example records."""
  correct = np.asarray(records['correct'], bool)
  n = int(correct.size)
  if n == 0:
    return {
      'error': float('nan'),
      'ece': float('nan'),
      'nll': float('nan'),
      'n': 0,
    }
  return {
    'error': float(1.0 - correct.mean()),
    'ece': expected_calibration_error(records['confidence'], correct),
    'nll': float(np.mean(records['nll'])),
    'n': n,
  }


def count_correct(
  step, state, batches, *, carry: bool = False
) -> tuple[int, int]:
  """How many valid rows of labelled batches an adapter gets right.

  The one accuracy routine of the runners (the clean-data forgetting
  check) and the trainers (validation during meta-training).

  Args:
    step: `step(state, inputs) -> (state, logits)` (jitted by the caller),
      with inputs `{'image', 'mask'}`.
    state: the state the first batch starts from.
    batches: dicts with `image`, `label` and `mask` (False on padding rows,
      which are never counted), e.g. `data.sources.padded_batches`.
    carry: each batch starts from the state the previous one returned
      (adaptation goes on over the batches); otherwise every batch is
      predicted from `state` (the clean-data forgetting check).

  Returns:
    `(correct, n)`: rows whose argmax logit is the label, valid rows.
  """
  correct, n = 0, 0
  for batch in batches:
    new, logits = step(state, {'image': batch['image'], 'mask': batch['mask']})
    if carry:
      state = new
    hit = np.asarray(logits).argmax(-1) == batch['label']
    correct += int(hit[batch['mask']].sum())
    n += int(batch['mask'].sum())
  return correct, n
