"""runtime: what a command's console and log file show at each verbosity, and native (C++) stderr capture."""

import logging
import os

import pytest

from mmr_jax import runtime


def _emit():
  logging.getLogger("mmr_jax.ablation").info("row text_only")
  logging.getLogger("mmr_jax.train").info("compiled step memory")
  logging.getLogger("mmr_jax.train").warning("positives_k too small")
  logging.getLogger("mmr_jax.train").warning("positives_k too small")  # a second run's: shown once at verbosity 0
  logging.getLogger("absl").warning("read_only=True, setting create=False")
  logging.getLogger("absl").error("a library error")
  logging.getLogger("mmr_jax.evals.index").debug("leaf sizes")


def _lines(text: str) -> list[str]:
  return [line.split(": ", 1)[1] for line in text.splitlines() if ": " in line]


def test_console_shows_headline_lines_and_warnings_at_verbosity_0(capfd, tmp_path):
  log_file = tmp_path / "logs" / "x.log"
  runtime.setup_logging(0, headline=("mmr_jax.ablation",), log_file=str(log_file))
  _emit()
  err = capfd.readouterr().err
  assert _lines(err) == ["row text_only", "positives_k too small", "a library error"]
  # The file keeps every INFO line of ours and the libraries' warnings, whatever the console shows.
  assert _lines(log_file.read_text()) == ["row text_only", "compiled step memory", "positives_k too small",
                                          "positives_k too small", "read_only=True, setting create=False",
                                          "a library error"]


def test_console_verbosity_1_and_2(capfd):
  runtime.setup_logging(1, headline=("mmr_jax.ablation",))
  _emit()
  assert _lines(capfd.readouterr().err) == ["row text_only", "compiled step memory", "positives_k too small",
                                            "positives_k too small", "read_only=True, setting create=False",
                                            "a library error"]
  runtime.setup_logging(2)
  _emit()
  assert "leaf sizes" in _lines(capfd.readouterr().err)


def test_native_logs_go_to_the_log_file_not_the_console(capfd, tmp_path):
  log_file = tmp_path / "native.log"
  runtime.setup_logging(0, log_file=str(log_file))
  with runtime.native_logs():
    os.write(2, b"I0000 partitioner_factory_base.cc:58] sampled 3000\n")
  os.write(2, b"after the block\n")
  err = capfd.readouterr().err
  assert "partitioner" not in err and "after the block" in err
  assert "partitioner_factory_base.cc:58] sampled 3000" in log_file.read_text()


@pytest.mark.parametrize("verbosity,log_file", [(2, True), (0, False)])
def test_native_logs_stay_on_stderr_at_verbosity_2_or_without_a_log_file(capfd, tmp_path, verbosity, log_file):
  """Nothing is thrown away: without a file to keep them (a gs:// workdir) native logs stay on the console."""
  path = tmp_path / "x.log"
  runtime.setup_logging(verbosity, log_file=str(path) if log_file else None)
  with runtime.native_logs():
    os.write(2, b"native line\n")
  assert "native line" in capfd.readouterr().err
  assert not path.exists() or "native line" not in path.read_text()


def test_log_file_appears_with_the_first_record(tmp_path):
  """A command refused before it logs anything leaves no logs/ folder in the workdir."""
  path = tmp_path / "wd" / "logs" / "train.log"
  runtime.setup_logging(0, log_file=str(path))
  assert not (tmp_path / "wd").exists()
  logging.getLogger("mmr_jax.train").info("first")
  assert path.read_text().endswith("mmr_jax.train: first\n")


def test_setup_logging_keeps_handlers_it_did_not_install(caplog):
  """A host's handlers (here pytest's log capture) survive a command configuring logging, even twice."""
  runtime.setup_logging(0)
  runtime.setup_logging(1)
  logging.getLogger("mmr_jax.export").warning("SavedModels do not match")
  assert "SavedModels do not match" in caplog.text
  assert sum(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
             and h in runtime._handlers for h in logging.getLogger().handlers) == 1  # pylint: disable=protected-access


def test_setup_logging_replaces_a_console_handler_installed_before_it(capfd):
  """absl's basicConfig (Orbax logs while it is imported) left a console handler: no line may print twice."""
  import sys  # pylint: disable=g-import-not-at-top
  stray = logging.StreamHandler(sys.stderr)
  logging.getLogger().addHandler(stray)
  try:
    runtime.setup_logging(0, headline=("mmr_jax.ablation",))
    logging.getLogger("mmr_jax.ablation").info("row text_only")
    assert _lines(capfd.readouterr().err) == ["row text_only"]
  finally:
    logging.getLogger().removeHandler(stray)


def test_log_file_for(tmp_path):
  assert runtime.log_file_for("gs://bucket/run", "train") is None
  assert runtime.log_file_for(str(tmp_path / "wd"), "evaluate") == str(tmp_path / "wd" / "logs" / "evaluate.log")
