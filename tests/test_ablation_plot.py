"""The ablation plot: each row per tag, and each learned row minus keyword search."""

import numpy as np
import pytest

from mmr_jax import ablation


def _row(name, overall, tags):
  return {"row": name, "overall": dict(zip(("recall@100", "ndcg@10"), overall)),
          "by_tag": {t: dict(zip(("recall@100", "ndcg@10"), v)) for t, v in tags.items()}}


def _heights(ax):
  return [round(p.get_height(), 6) for p in ax.patches]


def test_the_plot_draws_every_learned_row_minus_bm25():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [_row("text_only", (0.50, 0.30), {"colour": (0.40, 0.20)}),
          _row("fusion_ft", (0.70, 0.45), {"colour": (0.80, 0.35)}),
          _row("bm25", (0.60, 0.40), {"colour": (0.30, 0.25)})]
  fig = ablation.draw_rows(rows, ["overall", "colour"], ["overall", "colour"])
  try:
    assert [ax.get_title() for ax in fig.axes] == ["recall@100", "ndcg@10", "recall@100 minus bm25",
                                                   "ndcg@10 minus bm25"]
    # Bars go row by row, each over the groups (overall, colour).
    assert _heights(fig.axes[0]) == pytest.approx([50, 40, 70, 80, 60, 30])
    assert _heights(fig.axes[2]) == pytest.approx([-10, 10, 10, 50])  # text_only, fusion_ft minus bm25
    assert _heights(fig.axes[3]) == pytest.approx([-10, -5, 5, 10])
  finally:
    plt.close(fig)


def test_without_a_bm25_row_the_plot_has_only_the_rows():
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [_row("text_only", (0.5, 0.3), {}), _row("fusion_ft", (0.7, 0.4), {})]
  fig = ablation.draw_rows(rows, ["overall"], ["overall"])
  try:
    assert [ax.get_title() for ax in fig.axes] == ["recall@100", "ndcg@10"]
    assert np.allclose(_heights(fig.axes[1]), [30, 40])
  finally:
    plt.close(fig)
