"""Plot labels from the catalogue (query tags, any script) are drawn, never as empty boxes."""

import logging
import warnings

import pytest
from matplotlib import font_manager

from mmr_jax import ablation


def _default_cmap():
  return font_manager.get_font(font_manager.findfont(font_manager.FontProperties())).get_charmap()


def test_labels_the_default_font_draws_are_kept():
  labels, families = ablation.drawable_labels(["overall", "colour", "красный", "ünïcödé"])
  assert labels == ["overall", "colour", "красный", "ünïcödé"]
  assert len(families) == 1


def test_characters_no_font_has_become_escapes_with_a_warning(caplog):
  with caplog.at_level(logging.WARNING, logger="mmr_jax.ablation"):
    labels, _ = ablation.drawable_labels(["red", "x\U0010fffdy"])  # a private-use code point
  assert labels == ["red", "x\\U0010fffdy"]
  assert "no installed font can draw" in caplog.text and "x\\U0010fffdy" in caplog.text


def test_another_installed_font_is_added_for_characters_the_default_lacks():
  default = _default_cmap()
  for entry in font_manager.fontManager.ttflist:
    if entry.name.startswith("Last Resort"):
      continue
    extra = [cp for cp in font_manager.get_font(entry.fname).get_charmap() if cp > 0x7F and cp not in default
             and chr(cp).isprintable()]
    if extra:
      break
  else:
    pytest.skip("no installed font has a character the default font lacks")
  label = "tag " + chr(extra[0])
  labels, families = ablation.drawable_labels([label])
  assert labels == [label] and len(families) >= 2


def test_plot_with_unseen_scripts_draws_every_label(tmp_path):
  rows = [{"row": r, "overall": {"recall@100": 0.5, "ndcg@10": 0.2},
           "by_tag": {"红色": {"recall@100": 0.4, "ndcg@10": 0.1}, "colour": {"recall@100": 0.3, "ndcg@10": 0.1},
                      "$5 中$": {"recall@100": 0.2, "ndcg@10": 0.1}, "$x^2$ gifts": {"recall@100": 0.1, "ndcg@10": 0.0}}}
          for r in ("text_only", "fusion_ft")]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ablation.plot_rows(rows, str(tmp_path / "a.png"))
  assert (tmp_path / "a.png").stat().st_size > 1000
  assert not [w for w in caught if "missing from font" in str(w.message)]
