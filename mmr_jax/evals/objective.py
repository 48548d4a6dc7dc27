"""The training objective's own metrics (loss, in-batch accuracy) on held-out batches, as an evaluator."""

from __future__ import annotations

from typing import Callable, Iterable

import jax

from mmr_jax import sharding as shd


class ObjectiveEvaluator:
  """Means of `eval_fn(params, batch)`'s metrics over the batches `batches()` yields, prefixed "val/".

  `eval_fn` is the trainer's jitted loss without the update (it knows the model and the objective);
  `batches` returns a fresh iterator of host batches each run, so every run scores the same examples.
  """

  def __init__(self, eval_fn: Callable, batches: Callable[[], Iterable[dict]], mesh, metric_names: set[str],
               prefix: str = "val/"):
    self._eval_fn, self._batches, self._mesh, self.prefix = eval_fn, batches, mesh, prefix
    self._names = {prefix + k for k in metric_names}

  def metric_names(self) -> set[str]:
    return set(self._names)

  def run(self, params) -> dict[str, float]:
    sums, n = {}, 0
    for host_batch in self._batches():
      m = jax.device_get(self._eval_fn(params, shd.host_batch_to_global(host_batch, self._mesh)))
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      n += 1
    return {self.prefix + k: v / max(n, 1) for k, v in sums.items()}
