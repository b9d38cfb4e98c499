"""Progress you can trust: by time, with the job's position and ETAs.

A `Job` knows how many methods a run has and how long the finished ones
took; `Job.stream(name, num_batches)` gives the stream loop a reporter
that, at most every `seconds` of work, says where the run is: the method
(k of N), the batch, examples/s, the running error, and the ETA of the
method and of the job. On a terminal it is a live progress bar (tqdm);
otherwise plain log lines. Optionally every batch's metrics also go to
TensorBoard (`tensorboardX`, an optional dependency).
"""

import datetime
import math
import pathlib
import sys
import time

from absl import logging


def _eta(seconds: float) -> str:
  if not math.isfinite(seconds):  # not known yet
    return '?'
  return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class Job:
  """The methods of one run, for positions and ETAs across them."""

  def __init__(
    self,
    names,
    *,
    seconds: float = 10.0,
    bar: bool | None = None,
    tensorboard_dir: pathlib.Path | None = None,
  ):
    self.names = list(names)
    self.seconds = seconds
    self.bar = sys.stderr.isatty() if bar is None else bar
    self.tensorboard_dir = tensorboard_dir
    self.durations: list[float] = []  # seconds of the finished methods
    self.t0 = time.perf_counter()

  def position(self, name: str) -> str:
    k = self.names.index(name) + 1 if name in self.names else '?'
    return f'{name} ({k}/{len(self.names)})'

  def finished(self, seconds: float) -> None:
    self.durations.append(seconds)

  def eta(self, name: str, method_left: float, method_total: float) -> float:
    """Seconds left in the job: this method's rest, then the methods to
    come at the mean duration of the finished ones (or of this one)."""
    k = self.names.index(name) if name in self.names else len(self.names) - 1
    after = len(self.names) - k - 1
    per_method = (
      sum(self.durations) / len(self.durations)
      if self.durations
      else method_total
    )
    return method_left + after * per_method

  def stream(self, name: str, num_batches: int, start: int = 0):
    return Stream(self, name, num_batches, start)


class Stream:
  """Reports one stream's progress; `update` after every batch."""

  def __init__(self, job: Job, name: str, num_batches: int, start: int):
    self.job, self.name = job, name
    self.num_batches, self.start = num_batches, start
    self.t0 = self.last = time.perf_counter()
    self.writer = None
    self.bar = None
    if job.bar:
      from tqdm import tqdm

      self.bar = tqdm(
        total=num_batches,
        initial=start,
        desc=job.position(name),
        unit='batch',
        dynamic_ncols=True,
        leave=False,
      )
    if job.tensorboard_dir is not None:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:
        raise ImportError(
          'config.tensorboard needs tensorboardX: pip install tensorboardX'
        ) from None
      self.writer = SummaryWriter(str(job.tensorboard_dir / name))

  def due(self) -> bool:
    """Whether a progress line is due (the loop then flushes the scores)."""
    return self.bar is None and (
      time.perf_counter() - self.last >= self.job.seconds
    )

  def update(
    self, done: int, *, examples: int, running_error=None, metrics=None
  ) -> None:
    """After batch `done` (1-based): `examples` valid examples so far in
    this run, the running error if the loop flushed it."""
    now = time.perf_counter()
    elapsed = max(now - self.t0, 1e-9)
    rate = (done - self.start) / elapsed  # batches/s
    left = (self.num_batches - done) / rate if rate > 0 else float('nan')
    total = elapsed + left
    job_left = self.job.eta(self.name, left, total)
    if self.writer is not None and metrics:
      for key, value in metrics.items():
        self.writer.add_scalar(key, float(value), done)
    if self.bar is not None:
      self.bar.update(done - self.bar.n)
      postfix = {'ex/s': f'{examples / elapsed:.0f}', 'job ETA': _eta(job_left)}
      if running_error is not None:
        postfix['err'] = f'{100 * running_error:.1f}%'
      self.bar.set_postfix(postfix, refresh=False)
      return
    if running_error is None:
      return
    self.last = now
    logging.info(
      '%s: batch %d/%d, %.0f examples/s, running error %.2f%%, '
      'ETA %s (method), %s (job)',
      self.job.position(self.name),
      done,
      self.num_batches,
      examples / elapsed,
      100 * running_error,
      _eta(left),
      _eta(job_left),
    )

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.writer is not None:
      self.writer.close()
