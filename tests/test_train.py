"""The trainer: learning, two-stage init, exact resume, SIGTERM, NaN handling, config errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mmr_jax import checkpoint as ckpt_lib
from mmr_jax import config as config_lib
from mmr_jax.data import pipeline
from mmr_jax.data import query_translation
from mmr_jax.evals import embedding
from mmr_jax.evals import retrieval
from mmr_jax import train
from mmr_jax.training import trainer as trainer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _losses(workdir):
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _quiet(cfg, **train_kw):
  cfg.train.progress = False
  for k, v in train_kw.items():
    cfg.train[k] = v
  return cfg


@pytest.mark.parametrize("variant", ["fusion", "text_only"])
def test_loss_decreases(tiny_data, tmp_path, variant):
  cfg = _quiet(tiny_config(tiny_data, variant=variant), steps=40, log_every=5, eval_every=0, ckpt_every=40)
  cfg.optim.lr = 3e-3
  cfg.data.pseudo_queries = 0.0  # the loss of the labelled pairs alone, comparable from step to step
  if variant in ("image_only", "fusion_qw"):
    # No product text tower / three query segments: no lexical segment, so nothing that adds words to it.
    cfg.model.lexical_dim, cfg.model.image_expansion_k, cfg.model.query_translation_k = 0, 0, 0
  train.train_and_evaluate(cfg, str(tmp_path / variant))
  losses = _losses(tmp_path / variant)
  first, last = np.mean([losses[5], losses[10]]), np.mean([losses[35], losses[40]])
  assert last < 0.8 * first, losses


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["image_only", "concat", "fusion_qw"])
def test_loss_decreases_other_variants(tiny_data, tmp_path, variant):
  test_loss_decreases(tiny_data, tmp_path, variant)


def test_stage1_learns_and_stage2_loads_its_image_tower(tiny_data, tmp_path, caplog):
  s1 = tmp_path / "s1"
  cfg1 = _quiet(tiny_config(tiny_data, stage=1), steps=30, log_every=5, eval_every=0, ckpt_every=30)
  cfg1.optim.lr = 3e-3
  train.train_and_evaluate(cfg1, str(s1))
  l1 = _losses(s1)
  assert np.mean([l1[25], l1[30]]) < np.mean([l1[5], l1[10]])

  cfg2 = _quiet(tiny_config(tiny_data, stage=2), steps=1, eval_every=0)
  cfg2.init.workdir = str(s1)
  cfg2.init.load = ("image_tower", "heads/image_words")  # the head that puts the image's words in the product's bag
  cfg2 = train.resolve_config(cfg2)
  assert cfg2.model.image_expansion_k > 0
  trainer = train.Trainer(cfg2, str(tmp_path / "s2"))
  state = trainer.init_state()
  with caplog.at_level("WARNING"):
    src, _ = ckpt_lib.restore_params(str(s1))
  assert "could not be restored" not in caplog.text  # the data iterator item is known, just not read
  got = jax.device_get(state.params)
  for part in ("image_tower", "heads/image_words"):
    mine, theirs = trainer_lib._at_path(got, part), trainer_lib._at_path(src, part)
    for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(mine), strict=True):
      np.testing.assert_array_equal(a, b)
  # Towers not named in init.load keep their fresh initialisation.
  fresh = jax.device_get(train.Trainer(cfg2.copy_and_resolve_references(), str(tmp_path / "s3"))._init(
      jax.random.PRNGKey(cfg2.seed)).params)
  for a, b in zip(jax.tree.leaves(fresh["query_tower"]), jax.tree.leaves(got["query_tower"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh["image_tower"]),
                                                       jax.tree.leaves(got["image_tower"])))
  # A part this model has and stage 1 does not (the demo adds the image's words in stage 2 only): the error names
  # what is there at that level.
  cfg2 = cfg2.copy_and_resolve_references()
  with cfg2.unlocked():
    cfg2.init.load = ("heads/image_expansion_scale",)
  with pytest.raises(KeyError, match=r"has only \[.*'image_words'.*\] at heads \(drop 'heads/image_expansion_scale'"):
    train.Trainer(cfg2, str(tmp_path / "s4")).init_state()
  # init.lexical_idf starts the lexical segment at the catalogue's BM25 idf; a `lexical` in init.load replaces it.
  def token_weight(load):
    c = cfg2.copy_and_resolve_references()
    with c.unlocked():
      c.init.load, c.init.lexical_idf = load, True
    params = jax.device_get(train.Trainer(c, str(tmp_path / "s5")).init_state().params)
    return np.asarray(jax.tree.leaves(trainer_lib._at_path(params, "lexical/token_weight"))[0])
  idf = pipeline.token_idf(tiny_data, cfg2.data, cfg2.model.text.vocab_size)
  np.testing.assert_allclose(jax.nn.softplus(token_weight(("image_tower",))) ** 2, np.maximum(idf, 1e-4), rtol=1e-4)
  np.testing.assert_array_equal(token_weight(("image_tower", "lexical")),
                                jax.tree.leaves(trainer_lib._at_path(src, "lexical/token_weight"))[0])
  # Without a lexical segment the setting is refused before any work.
  bad = tiny_config(tiny_data, stage=2)
  bad.init.lexical_idf, bad.model.lexical_dim, bad.model.image_expansion_k = True, 0, 0
  with pytest.raises(ValueError, match=r"init.lexical_idf=True .* no lexical segment \(config.model.lexical_dim=0\)"):
    train.resolve_config(bad)


def test_query_translation_is_fitted_at_init_and_kept_through_training(tiny_workdir, tiny_data, tmp_path):
  cfg = embedding.load_config(tiny_workdir)
  k, qt = int(cfg.model.query_translation_k), cfg.data.query_translation
  assert k > 0 and cfg.optim.lr_mult.query_translation == 0.0  # the demo's setting, frozen
  targets, report = query_translation.fit(tiny_data, cfg.data, cfg.model.text.vocab_size, k, min_prob=qt.min_prob,
                                          min_lift=qt.min_lift, min_queries=qt.min_queries)
  # The fixture's run takes one training query as evidence enough (min_queries=1): the tiny catalogue's two
  # tokens that no product uses are translated.
  assert qt.min_queries == 1 and report["translated"] > 0
  assert json.loads((pathlib.Path(tiny_workdir) / "query_translation.json").read_text()) == report
  params, step = ckpt_lib.restore_params(tiny_workdir)
  assert step > 0  # trained, and the table is as fitted (empty slots -1 too: no weight decay, no update)
  np.testing.assert_array_equal(params["query_translation"]["targets"], targets.astype(np.float32))
  # A table that init.load takes from a trained run replaces the fit: the demo's min_queries=2 would leave it empty.
  two = tiny_config(tiny_data)
  two.init.workdir, two.init.load = tiny_workdir, ("image_tower", "query_translation")
  assert query_translation.fit(tiny_data, two.data, cfg.model.text.vocab_size, k)[1]["translated"] == 0
  state = trainer_lib.Trainer(train.resolve_config(two), str(tmp_path)).init_state()
  np.testing.assert_array_equal(jax.device_get(state.params)["query_translation"]["targets"],
                                targets.astype(np.float32))
  assert not (tmp_path / "query_translation.json").exists()  # no fit, so no report of one


def _final_params(workdir):
  params, step = ckpt_lib.restore_params(str(workdir))
  return params, step


def test_sigterm_checkpoint_then_resume_equals_uninterrupted(tiny_data, tmp_path):
  def cfg():
    return _quiet(tiny_config(tiny_data), steps=8, log_every=1, eval_every=0, ckpt_every=100)

  full = tmp_path / "full"
  train.train_and_evaluate(cfg(), str(full))

  part = tmp_path / "part"

  def preempt_at_3(step, state):
    del state
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  train.train_and_evaluate(cfg(), str(part), hooks=[preempt_at_3])
  # SIGTERM left a restorable checkpoint at the step it arrived, and the run stopped there.
  assert ckpt_lib.Checkpointer(str(part)).all_steps() == [3]
  assert max(_losses(part)) == 3
  train.train_and_evaluate(cfg(), str(part))  # auto-resume from step 3

  lf, lp = _losses(full), _losses(part)
  assert sorted(lp) == list(range(1, 9))
  for s in range(1, 9):
    assert lp[s] == lf[s], (s, lp[s], lf[s])  # bit-exact on CPU
  pf, _ = _final_params(full)
  pp, step = _final_params(part)
  assert step == 8
  for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(pp)):
    np.testing.assert_array_equal(a, b)


# Run as a separate process by the kill -9 test: trains with Orbax's commit of step 4 (the rename of
# `4.orbax-checkpoint-tmp` to `4`, after every file of the step is written) replaced by "write the marker
# file, then block forever", so the parent kills it at exactly that point, not at whatever a timer hits.
_KILLED_IN_COMMIT_CHILD = r"""
import json, pathlib, sys, threading
from orbax.checkpoint._src.path import atomicity

workdir, data_dir, marker, train_kw = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), json.loads(sys.argv[4])
commit = atomicity.AtomicRenameTemporaryPath.finalize

async def finalize(self):
  if self.get_final().name == "4":
    marker.write_text(str(self.get()))
    threading.Event().wait()  # Orbax's background commit thread stops here until the SIGKILL
  return await commit(self)

atomicity.AtomicRenameTemporaryPath.finalize = finalize
from conftest import tiny_config
from mmr_jax import train
train.train_and_evaluate(tiny_config(data_dir, **train_kw), workdir)
sys.exit("trained to the end: the commit of step 4 was never reached")
"""


def test_kill9_during_a_checkpoint_commit_resumes_from_the_previous_step(tiny_data, tmp_path, caplog):
  train_kw = dict(progress=False, steps=6, log_every=1, eval_every=0, ckpt_every=2)
  wd, marker, child_log = tmp_path / "w", tmp_path / "in_commit", tmp_path / "child.log"
  with child_log.open("w") as log_file:  # a file, not a pipe: a full pipe would block the child
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_IN_COMMIT_CHILD, str(wd), tiny_data, str(marker), json.dumps(train_kw)],
        cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")])))
    try:
      # The marker, not a delay, says when to kill: the wait only bounds a child that never gets there.
      deadline, tail = time.monotonic() + 600, lambda: child_log.read_text()[-3000:]
      while not marker.exists():
        assert child.poll() is None, f"child exited ({child.returncode}) before the commit:\n{tail()}"
        assert time.monotonic() < deadline, f"child never reached the commit:\n{tail()}"
        time.sleep(0.2)
      os.kill(child.pid, signal.SIGKILL)
    finally:
      if child.poll() is None:
        child.kill()
      child.wait()
  assert child.returncode == -signal.SIGKILL

  ckpts = wd / "checkpoints"
  partial = ckpts / "4.orbax-checkpoint-tmp"
  assert marker.read_text() == str(partial)
  # Step 4's files are all there (state and data iterator); only the rename that commits it is missing.
  assert (partial / "state").is_dir() and (partial / "data").is_dir() and not (ckpts / "4").exists()
  assert ckpt_lib.Checkpointer(str(wd)).all_steps() == [2]

  steps_run = []
  with caplog.at_level("INFO", logger="mmr_jax.train"):
    last = train.train_and_evaluate(_quiet(tiny_config(tiny_data), **train_kw), str(wd),
                                    hooks=[lambda step, state: steps_run.append(step)])
  assert "resumed from step 2" in caplog.text
  assert steps_run == [3, 4, 5, 6] and last["step"] == 6
  # Rows the child logged past step 2 were replaced, not doubled.
  assert [json.loads(l)["step"] for l in (wd / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
  assert ckpt_lib.Checkpointer(str(wd)).all_steps() == [4, 6]
  # Saving step 4 again cleared the dead run's temporary folder (Orbax removes an unfinished one it would reuse).
  assert not list(ckpts.glob("*.orbax-checkpoint-tmp*"))


def test_metrics_log_stays_one_history_after_crashes(tiny_data, tmp_path):
  # A run killed before its first checkpoint left rows 1-3; the restart from step 0 must replace them.
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)))
  cfg = lambda steps: _quiet(tiny_config(tiny_data), steps=steps, log_every=1, eval_every=0, ckpt_every=2)  # noqa: E731
  train.train_and_evaluate(cfg(2), str(wd))
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] != 9.0 for r in rows)
  # A line torn by a crash mid-write does not block the resume, and is dropped.
  with (wd / "metrics.jsonl").open("a") as f:
    f.write('{"step": 3, "loss": 2.')
  train.train_and_evaluate(cfg(3), str(wd))
  assert [json.loads(l)["step"] for l in (wd / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

  # A checkpoint damaged after it was written: the error names it and the step to fall back to, and
  # nothing in the workdir changes.
  damaged = wd / "checkpoints" / "3" / "data" / "process_0-of-1.json"
  damaged.write_text("")
  before = (wd / "metrics.jsonl").read_text()
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match=r"checkpoints/3 could not be read.*from step 2"):
    train.train_and_evaluate(cfg(4), str(wd))
  assert (wd / "metrics.jsonl").read_text() == before


def test_nan_stop_keeps_last_good_checkpoint(tiny_data, tmp_path):
  cfg = _quiet(tiny_config(tiny_data), steps=12, log_every=4, eval_every=0, ckpt_every=1)
  cfg.optim.lr = 1e30  # blows the parameters up within a few steps
  cfg.optim.grad_clip = 0.0
  cfg.optim.warmup_steps = 0
  with pytest.raises(train.NonFiniteLossError, match="NaN/Inf"):
    train.train_and_evaluate(cfg, str(tmp_path / "nan"))
  params, step = _final_params(tmp_path / "nan")
  assert step >= 1
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_nan_skip_policy_finishes(tiny_data, tmp_path):
  cfg = _quiet(tiny_config(tiny_data), steps=8, log_every=4, eval_every=0, ckpt_every=8, nan_policy="skip")
  cfg.optim.lr = 1e30
  cfg.optim.grad_clip = 0.0
  cfg.optim.warmup_steps = 0
  last = train.train_and_evaluate(cfg, str(tmp_path / "skip"))
  assert last["nonfinite_steps"] > 0
  params, step = _final_params(tmp_path / "skip")
  assert step == 8 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_checkpoint_shape_mismatch_names_parameters(tiny_workdir, tiny_data):
  cfg = json.loads((pathlib.Path(tiny_workdir) / "config.json").read_text())
  cfg = config_lib.ConfigDict(cfg)
  cfg.model.embed_dim = cfg.model.embed_dim * 2
  cfg.train.steps = cfg.train.steps + 2
  before = (pathlib.Path(tiny_workdir) / "config.json").read_text()
  with pytest.raises(ckpt_lib.CheckpointShapeError, match=r"heads/query/kernel"):
    train.train_and_evaluate(cfg, tiny_workdir)
  assert (pathlib.Path(tiny_workdir) / "config.json").read_text() == before


def test_parse_arg_rejects_unknown_and_badly_typed_keys():
  with pytest.raises(KeyError, match="colour"):
    config_lib.parse_arg("colour=red", stage=2)
  with pytest.raises(ValueError):
    config_lib.parse_arg("stage=two", stage=2)
  assert config_lib.parse_arg("stage=1,variant=concat", stage=2, variant="fusion").variant == "concat"
  with pytest.raises(ValueError, match="config argument steps='1.5e0'"):
    config_lib.parse_arg("steps=1.5e0", steps=2)
  assert config_lib.parse_arg("steps=1e3", steps=2).steps == 1000


def test_ablation_overrides_are_typed_like_the_config():
  from mmr_jax import ablation  # pylint: disable=g-import-not-at-top
  cfg = config_lib.base_config()
  ablation.apply_overrides(cfg, {"train.async_checkpoint": "False", "train.steps": "1e3", "optim.lr": "3e-4",
                                 "model.variant": "concat", "train.keep": 7, "name": "ignored"})
  assert cfg.train.async_checkpoint is False and cfg.train.steps == 1000 and cfg.optim.lr == 3e-4
  assert cfg.model.variant == "concat" and cfg.train.keep == 7
  with pytest.raises(ValueError, match="override train.progress='maybe'"):
    ablation.apply_overrides(cfg, {"train.progress": "maybe"})
  with pytest.raises(KeyError, match="colour"):
    ablation.apply_overrides(cfg, {"model.colour": "red"})


def test_missing_inputs_are_named_before_any_work(tiny_data, tmp_path, monkeypatch):
  cfg = tiny_config(str(tmp_path / "no_data"))
  with pytest.raises(FileNotFoundError, match=r"config.data.dir=.*no_data.* is not an imported catalogue.*:data="):
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()
  cfg = tiny_config(tiny_data)
  cfg.init.workdir = str(tmp_path / "typo_stage1")
  with pytest.raises(FileNotFoundError, match="init.workdir=.*typo_stage1.* holds no checkpoint"):
    train.train_and_evaluate(cfg, str(tmp_path / "w2"))
  assert not (tmp_path / "w2").exists() or not any((tmp_path / "w2").iterdir())
  (tmp_path / "home" / "s1" / "checkpoints" / "4").mkdir(parents=True)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  cfg.init.workdir = "~/s1"  # expanded, as the restore itself does
  train._check_init_sources(cfg.init, tmp_path / "w3")  # pylint: disable=protected-access


def test_cli_rejects_unknown_config_key(tmp_path):
  r = subprocess.run([sys.executable, "-m", "mmr_jax.train", "--config", "configs/demo.py:runlocal=True",
                      "--workdir", str(tmp_path / "w"), "--config.train.step=3"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2
  # One line naming the flag and the key it probably meant, not a traceback.
  assert r.stderr.strip().splitlines()[-1] == (
      'error: --config.train.step names no config key. Did you mean "steps" instead of "step"?')
  assert "Traceback" not in r.stderr
  r = subprocess.run([sys.executable, "-m", "mmr_jax.train", "--config", "configs/demo.py:runlocal=True,dat=x",
                      "--workdir", str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
      "error: unknown config argument 'dat'; known: [")
  assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_cli_evaluate_after_the_last_step(tiny_data, tmp_path):
  # What cluster jobs of a sweep run: train, then evaluate in the same job (metrics.json marks it done).
  wd = tmp_path / "w"
  cmd = [sys.executable, "-m", "mmr_jax.train", "--config", f"configs/demo.py:runlocal=True,data={tiny_data}",
         "--workdir", str(wd), "--evaluate", "--config.train.eval_every=0", "--config.train.progress=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", MMR_COMPILATION_CACHE="none")
  r = subprocess.run(cmd + ["--config.train.steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  metrics = json.loads((wd / "metrics.json").read_text())
  assert metrics["step"] == 2 and "test" in metrics["splits"]
  assert "Retrieval metrics" in r.stdout


def test_workdir_paths_are_made_absolute_for_orbax(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert str(ckpt_lib.absolute("workdirs/x")) == str(tmp_path / "workdirs" / "x")
  assert str(ckpt_lib.absolute("gs://bucket/run")) == "gs://bucket/run"
  ck = ckpt_lib.Checkpointer("rel_run", async_save=False)
  assert str(ck.directory).startswith(str(tmp_path))
  ck.close()


def test_best_metric_is_resolved_against_what_validation_logs():
  tcfg = config_lib.base_config().train
  logged = {"val/q2p/loss", "val/q2p/acc_a2b"} | {f"val/{k}" for k in retrieval.RetrievalEvaluator.METRICS}
  assert train.resolve_best_metric(tcfg, logged) == ("val/ndcg@10", "max")
  assert train.resolve_best_metric(tcfg, {"val/i2t/loss", "val/i2t/acc_a2b"}) == ("val/i2t/loss", "min")
  with tcfg.unlocked():
    tcfg.best_metric = "val/loss"  # logged by no stage: keep_best would keep nothing
  with pytest.raises(ValueError, match=r"train.best_metric='val/loss' is not a metric .*val/i2t/loss"):
    train.resolve_best_metric(tcfg, {"val/i2t/loss"})
  with tcfg.unlocked():
    tcfg.best_metric, tcfg.best_mode = "val/mrr", "Max"
  with pytest.raises(ValueError, match=r"train.best_mode='Max'"):
    train.resolve_best_metric(tcfg, logged)


def test_init_lr_mult_slows_only_the_towers_loaded_from_init():
  import optax  # pylint: disable=g-import-not-at-top
  from mmr_jax.training import optimizer as optim_lib  # pylint: disable=g-import-not-at-top
  ocfg = config_lib.base_config().optim
  with ocfg.unlocked():
    ocfg.init_lr_mult.image_tower, ocfg.weight_decay, ocfg.warmup_steps, ocfg.grad_clip = 0.25, 0.0, 0, 0.0
  params = {"image_tower": {"w": np.zeros((2, 2), np.float32)}, "heads": {"w": np.zeros((2, 2), np.float32)}}
  grads = jax.tree.map(np.ones_like, params)
  # heads were loaded too but have no init_lr_mult entry: full rate.
  for initialised, ratio in (((), 1.0), (("image_tower", "heads"), 0.25)):
    tx, _ = optim_lib.make_optimizer(ocfg, 10, params, initialised)
    updates, _ = tx.update(grads, tx.init(params), params)
    u = jax.device_get(updates)
    np.testing.assert_allclose(u["image_tower"]["w"], ratio * u["heads"]["w"], rtol=1e-6)
  def init(**kw):
    return config_lib.ConfigDict(dict(dict(workdir="", load=("image_tower",), vit_npz="", two_tower_npz=""), **kw))
  assert trainer_lib.initialised_towers(init()) == ()
  assert trainer_lib.initialised_towers(init(workdir="s1", load=("image_tower", "heads"), vit_npz="v.npz")) == (
      "image_tower", "heads")
  # A SigLIP / LiT checkpoint fills the image tower, every text tower and the temperature.
  assert set(trainer_lib.initialised_towers(init(two_tower_npz="siglip.npz"))) == {
      "image_tower", "text_tower", "query_tower", "product_text_tower", "loss"}
  # The B/16 stage 2 slows the image tower it takes from stage 1, not one it trains from scratch.
  b16 = config_lib.set_b16_stage2(config_lib.base_config())
  assert b16.optim.lr_mult.image_tower == 1.0 and b16.optim.init_lr_mult.image_tower == 0.1


def test_a_run_from_a_stage1_over_its_pairs_starts_its_stream_after_stage1s_batches(tmp_path):
  def run(stage, **data):
    c = config_lib.base_config()
    c.stage, c.seed = stage, 3
    c.data.update(data)
    return c
  def saved(name, cfg, step):
    (tmp_path / name / "checkpoints" / str(step)).mkdir(parents=True)
    (tmp_path / name / "config.json").write_text(json.dumps(cfg.to_dict()))
    return str(tmp_path / name)
  over_pairs = saved("s1_pairs", run(1, stage1_source="pairs"), 250)
  over_products = saved("s1_products", run(1, stage1_source="products"), 250)
  other_seed = run(1, stage1_source="pairs")
  other_seed.seed = 4
  other_seed = saved("s1_other_seed", other_seed, 250)
  stage2 = run(2, stream_offset=250)
  stage2.init.workdir = over_pairs
  stage2.train.steps = 200
  continued = saved("s2", stage2, 200)
  def offset(init_workdir, stage=2, **data):
    c = run(stage, **data)
    c.init.workdir = init_workdir
    return train.resolve_stream_offset(c)
  assert offset(over_pairs) == 250  # stage 2 continues stage 1's stream
  assert offset(continued) == 450  # ... and a run from that one continues after both
  assert offset(over_products) == 0  # another stream: nothing replayed
  assert offset(other_seed) == 0
  assert offset(over_pairs, batch_size=32) == 0
  assert offset("") == 0
  assert offset(over_pairs, stream_offset=0) == 0 and offset(over_pairs, stream_offset=7) == 7  # as set
  with pytest.raises(ValueError, match=r"data.stream_offset=-2"):
    offset(over_pairs, stream_offset=-2)


def test_validation_logs_retrieval_metrics_and_keeps_the_best(tiny_data, tmp_path):
  cfg = _quiet(tiny_config(tiny_data, variant="text_only"), steps=4, log_every=2, eval_every=2, ckpt_every=2,
               keep=1, keep_best=1)
  train.train_and_evaluate(cfg, str(tmp_path / "r"))
  # A run starting from step 0 writes how product_len cuts the catalogue's text.
  assert json.loads((tmp_path / "r" / "product_truncation.json").read_text())["product_len"] == cfg.data.product_len
  rows = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
  val = [r for r in rows if "val/ndcg@10" in r]
  assert [r["step"] for r in val] == [2, 4]
  for r in val:
    assert 0.0 <= r["val/ndcg@10"] <= 1.0 and 0.0 <= r["val/recall@10"] <= r["val/recall@100"] <= 1.0
  # keep=1 keeps the latest checkpoint, keep_best=1 the one with the best val/ndcg@10 (the default best_metric).
  best = max(val, key=lambda r: r["val/ndcg@10"])["step"]
  kept = {int(p.name) for p in (tmp_path / "r" / "checkpoints").iterdir() if p.name.isdigit()}
  assert kept == {4, best}
  # The catalogue's validation queries over the whole catalogue: the same numbers evaluate computes.
  from mmr_jax import evaluate  # pylint: disable=g-import-not-at-top
  res = evaluate.evaluate_workdir(str(tmp_path / "r"), splits=("validation",), keyword_search=False,
                                  save_index=False, out_name="val_metrics")
  assert res["splits"]["validation"]["exact"]["ndcg@10"] == pytest.approx(val[-1]["val/ndcg@10"], abs=1e-5)


def test_training_reports_how_product_len_cuts_the_product_text(tiny_data, tmp_path, caplog):
  from etils import epath  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(tiny_data, variant="text_only")
  for product_len, cut in ((4, True), (512, False)):
    cfg.data.product_len = product_len
    out = tmp_path / str(product_len)
    out.mkdir()
    caplog.clear()
    with caplog.at_level("INFO", logger="mmr_jax.train"):
      train._report_truncation(cfg, epath.Path(out))  # pylint: disable=protected-access
    rep = json.loads((out / "product_truncation.json").read_text())
    assert rep == json.loads(json.dumps(pipeline.product_truncation(tiny_data, cfg.data)))
    assert (rep["truncated"] > 0) == cut and (rep["by_field"]["attributes"] > 0) == cut
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if cut:
      assert len(warned) == 1 and "data.product_len=4 cuts the text of" in warned[0] and "attributes" in warned[0]
    else:
      assert not warned and "product text fits data.product_len=512" in caplog.text


@pytest.mark.parametrize("key,value", [("nan_policy", "Stop"), ("best_mode", "maximum")])
def test_bad_choice_options_are_refused_before_any_work(tiny_data, tmp_path, key, value):
  cfg = _quiet(tiny_config(tiny_data), **{key: value})
  with pytest.raises(ValueError, match=rf"train.{key}='{value}' is not one of"):
    train.train_and_evaluate(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # refused before the workdir, the compile or a checkpoint


def _report_nonfinite_at(monkeypatch, steps):
  """Makes the trainer's step count the given steps as non-finite (dropped), as the compiled step does on a NaN."""
  orig = train.Trainer.step

  def step(self, state, host_batch):
    state, metrics = orig(self, state, host_batch)
    if int(jax.device_get(state.step)) in steps:
      state = state.replace(nonfinite=jax.device_put(state.nonfinite + 1, self.state_shardings.nonfinite))
    return state, metrics

  monkeypatch.setattr(train.Trainer, "step", step)


def test_nan_stop_last_good_checkpoint_resumes(tiny_data, tmp_path, monkeypatch):
  # ckpt_every is not a multiple of log_every: checkpoints fall between a NaN step and the next log step.
  cfg = lambda policy: _quiet(tiny_config(tiny_data), steps=6, log_every=4, eval_every=0, ckpt_every=1,  # noqa: E731
                              nan_policy=policy)
  wd = tmp_path / "w"
  bad = {2}
  _report_nonfinite_at(monkeypatch, bad)
  with pytest.raises(train.NonFiniteLossError, match=r"1 step\(s\) between steps 0 and 2.*Last good checkpoint: step 1"):
    train.train_and_evaluate(cfg("stop"), str(wd))
  assert ckpt_lib.Checkpointer(str(wd)).all_steps() == [1]  # nothing saved past the NaN step
  bad.clear()
  assert train.train_and_evaluate(cfg("stop"), str(wd))["step"] == 6  # the named checkpoint resumes

  # A checkpoint that carries non-finite steps allowed under nan_policy=skip resumes under stop.
  wd2 = tmp_path / "w2"
  bad.add(2)
  c = cfg("skip")
  c.train.steps = 4
  assert train.train_and_evaluate(c, str(wd2))["nonfinite_steps"] == 1
  bad.clear()
  last = train.train_and_evaluate(cfg("stop"), str(wd2))
  assert last["step"] == 6 and last["nonfinite_steps"] == 1


def test_workdir_refuses_a_reimported_data_dir(tiny_data, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  data = tmp_path / "data"
  shutil.copytree(tiny_data, data)
  cfg = lambda steps: _quiet(tiny_config(str(data)), steps=steps, log_every=1, eval_every=0, ckpt_every=1)  # noqa: E731
  wd = tmp_path / "w"
  train.train_and_evaluate(cfg(2), str(wd))
  embedding.load_trained(str(wd))  # the same data: accepted
  # As `import_catalog --overwrite` of a catalogue whose products come in another order leaves it: same path,
  # same vocabulary size, another product order.
  info = json.loads((data / "catalog_info.json").read_text())
  assert info["products_sha256"]
  info["products_sha256"] = "0" * 64
  (data / "catalog_info.json").write_text(json.dumps(info))
  with pytest.raises(ckpt_lib.DataDirMismatchError, match=r"is not the DATA_DIR .* was trained on.*products_sha256"):
    train.train_and_evaluate(cfg(3), str(wd))  # resume
  with pytest.raises(ckpt_lib.DataDirMismatchError, match=r"products_sha256 .* -> 000000000000"):
    embedding.load_trained(str(wd))  # evaluate and export
  assert ckpt_lib.Checkpointer(str(wd)).all_steps() == [1, 2]


def test_resume_on_another_process_count_restarts_the_data_at_the_step(tiny_data, tmp_path, caplog):
  # A checkpoint written by 2 processes (grain's process_0-of-2 / process_1-of-2 iterator states),
  # resumed by one: there is no process_0-of-1 state to restore.
  cfg = lambda steps: _quiet(tiny_config(tiny_data), steps=steps, log_every=1, eval_every=0, ckpt_every=2)  # noqa: E731
  wd = tmp_path / "w"
  train.train_and_evaluate(cfg(2), str(wd))
  data = wd / "checkpoints" / "2" / "data"
  batch = tiny_config(tiny_data).data.batch_size
  assert json.loads((data / "process_0-of-1.json").read_text()) == {"next_index": 2 * batch}
  (data / "process_0-of-1.json").unlink()
  for p in range(2):
    (data / f"process_{p}-of-2.json").write_text(json.dumps({"next_index": batch}))
  with caplog.at_level("WARNING", logger="mmr_jax.train"):
    assert train.train_and_evaluate(cfg(4), str(wd))["step"] == 4
  assert "written by 2 process(es), on 1" in caplog.text and f"restarts at element {2 * batch}" in caplog.text
  # Two steps after position 2 * batch of the one stream, as if one process had trained all along.
  state = json.loads((wd / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text())
  assert state == {"next_index": 4 * batch}


@pytest.mark.parametrize("grades, warns", [(["E"], True), (["E", "S"], False)])
def test_grade_weighting_on_pairs_of_one_grade_warns_that_it_changes_nothing(tmp_path, caplog, grades, warns):
  data = tmp_path / "data"
  data.mkdir()
  (data / "catalog_info.json").write_text(json.dumps({"pair_grades": grades}))
  cfg = config_lib.base_config()
  cfg.data.dir = str(data)
  cfg.loss.grade_weighted = True
  with caplog.at_level("WARNING", logger="mmr_jax.train"):
    train.check_loss_settings(cfg)
  assert ("changes nothing" in caplog.text) == warns
  caplog.clear()
  cfg.loss.grade_weighted = False
  with caplog.at_level("WARNING", logger="mmr_jax.train"):
    train.check_loss_settings(cfg)
  assert not caplog.text


def test_stage1_lock_text_without_a_text_term_warns(tmp_path, caplog):
  cfg = config_lib.base_config()
  cfg.stage = 1
  cfg.loss.stage1_lock_text = True
  with caplog.at_level("WARNING", logger="mmr_jax.train"):
    train.check_loss_settings(cfg)
  assert "aligns with untrained text towers" in caplog.text
  caplog.clear()
  cfg.data.stage1_source = "pairs"  # stage 1 trains the text towers on queries: nothing to warn about
  with caplog.at_level("WARNING", logger="mmr_jax.train"):
    train.check_loss_settings(cfg)
  assert not caplog.text


def test_stage1_text_weight_without_a_text_term_warns(caplog):
  cfg = config_lib.base_config()
  cfg.stage = 1
  cfg.loss.stage1_text = 2.0
  with caplog.at_level("WARNING", logger="mmr_jax.train"):
    train.check_loss_settings(cfg)
  assert "loss.stage1_text=2.0" in caplog.text and "changes nothing" in caplog.text
  caplog.clear()
  cfg.data.stage1_source = "pairs"  # a query <-> product-text term for the weight to scale
  with caplog.at_level("WARNING", logger="mmr_jax.train"):
    train.check_loss_settings(cfg)
  assert not caplog.text
