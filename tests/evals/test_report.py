"""evals/report: the one Markdown table writer."""

from mmr_jax.evals import report


def test_markdown_table():
  assert report.markdown_table(["a", "b"], [["1", "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |\n"
