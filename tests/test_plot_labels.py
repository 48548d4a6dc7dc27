"""Plot labels from the catalogue (query tags, any script) are drawn, never as empty boxes."""

import logging
import warnings

import pytest
from matplotlib import font_manager

from mmr_jax import ablation


def _default_font():
  return font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))


def _default_cmap():
  return _default_font().get_charmap()


def test_labels_the_default_font_draws_are_kept():
  labels, families = ablation.drawable_labels(["overall", "colour", "красный", "ünïcödé"])
  assert labels == ["overall", "colour", "красный", "ünïcödé"]
  assert len(families) == 1


def test_characters_no_font_has_become_escapes_with_a_warning(caplog):
  with caplog.at_level(logging.WARNING, logger="mmr_jax.ablation"):
    labels, _ = ablation.drawable_labels(["red", "x\U0010fffdy"])  # a private-use code point
  assert labels == ["red", "x\\U0010fffdy"]
  assert "no installed font can draw" in caplog.text and "x\\U0010fffdy" in caplog.text


def _family_file(name):
  """The file matplotlib draws family `name` with (its default style and weight)."""
  return font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)


def _family_cmap(name):
  return font_manager.get_font(_family_file(name)).get_charmap()


def _extra_family():
  """Returns (family, a character its file draws and the default font's does not), or skips."""
  default = _default_cmap()
  default_family = _default_font().family_name
  for name in dict.fromkeys(e.name for e in font_manager.fontManager.ttflist):
    if name.startswith("Last Resort") or name == default_family:
      continue
    extra = [cp for cp in _family_cmap(name) if cp > 0x7F and cp not in default and chr(cp).isprintable()]
    if extra:
      return name, chr(extra[0])
  pytest.skip("no installed font family has a character the default font lacks")


def test_another_installed_font_is_added_for_characters_the_default_lacks():
  name, char = _extra_family()
  label = "tag " + char
  labels, families = ablation.drawable_labels([label])
  assert labels == [label] and len(families) >= 2
  assert any(ord(char) in _family_cmap(f) for f in families[1:])


def test_a_character_only_another_style_of_a_family_has_is_not_counted_as_drawn(monkeypatch, caplog):
  # A font file of the default family (say its bold) holding a character the regular file lacks: naming the
  # family draws the regular file, so that file must not count as drawing the character.
  name, char = _extra_family()
  default_family = _default_font().family_name
  path = _family_file(name)
  assert ord(char) in _family_cmap(name)
  bold = font_manager.FontEntry(fname=path, name=default_family, style="normal", weight=700)
  monkeypatch.setattr(font_manager.fontManager, "ttflist", [bold] + [
      e for e in font_manager.fontManager.ttflist if e.name == default_family])
  with caplog.at_level(logging.WARNING, logger="mmr_jax.ablation"):
    labels, families = ablation.drawable_labels(["tag " + char])
  assert families == [default_family] and labels == ["tag " + char.encode("unicode_escape").decode("ascii")]
  assert "no installed font can draw" in caplog.text


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
