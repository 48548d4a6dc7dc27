"""Every config family loads, is internally consistent, and its runlocal mode trains."""

import importlib.util
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from mmr_jax import config as config_lib
from mmr_jax.models import layers

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.py"))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_there_are_config_families():
  assert {p.stem for p in CONFIGS} >= {"demo", "vit_b16_pod", "vit_b16_gpu"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_family(path):
  mod = _load(path)
  assert mod.__doc__ and "python -m" in mod.__doc__, "docstring must give the exact command"
  for arg in ("stage=1", "stage=2,variant=fusion", "stage=2,variant=text_only,runlocal=True"):
    cfg = mod.get_config(arg)
    assert cfg.stage == int(arg.split(",")[0].split("=")[1])
    assert cfg.data.batch_size % cfg.optim.grad_accum == 0
    if "variant=" in arg:
      assert cfg.model.variant == arg.split("variant=")[1].split(",")[0]
    assert set(cfg.optim.lr_mult) >= {"image_tower", "query_tower", "heads", "loss"}
    for tower in ("vit", "text", "fusion"):  # names the models only check when they build the stack
      t = cfg.model[tower]
      assert t.attention_impl in layers.ATTENTION_IMPLS, (tower, t.attention_impl)
      assert hasattr(jax.checkpoint_policies, t.remat_policy), (tower, t.remat_policy)
  with pytest.raises(KeyError, match="not_a_key"):
    mod.get_config("not_a_key=1")
  # Every family takes the budgets: budget= multiplies its own step count, steps= sets the count outright.
  for stage in (1, 2):
    steps = mod.get_config(f"stage={stage}").train.steps
    assert mod.get_config(f"stage={stage},budget=long").train.steps == steps * config_lib.BUDGETS["long"]
    assert mod.get_config(f"stage={stage},budget=long,steps=7").train.steps == 7
  with pytest.raises(ValueError, match="budget='longer'"):
    mod.get_config("budget=longer")
  if hasattr(mod, "get_sweep"):
    base = mod.get_config("stage=2")
    for point in mod.get_sweep(""):
      for key in point:
        if key == "name":
          continue
        node = base
        for part in key.split("."):
          assert part in node, f"sweep key {key} not in {path.name}'s config"
          node = node[part]


def test_demo_text_size_preset():
  demo = _load(ROOT / "configs" / "demo.py")
  small, big = demo.get_config("stage=2"), demo.get_config("stage=2,text=B")
  assert (big.model.text.width, big.model.text.depth, big.model.text.num_heads) == (768, 12, 12)
  assert big.model.fusion.width == 768 and big.model.fusion.num_heads == 12
  assert big.model.text.vocab_size == small.model.text.vocab_size  # still taken from the tokenizer
  assert big.model.text.max_len == small.model.text.max_len and small.model.text.width < 768
  with pytest.raises(ValueError, match="runlocal"):
    demo.get_config("stage=2,text=B,runlocal=True")


def test_demo_long_budget_halves_the_fused_branchs_own_term():
  demo = _load(ROOT / "configs" / "demo.py")
  assert demo.get_config("stage=2").loss.aux_query_fused == 1.0
  assert demo.get_config("stage=2,budget=long").loss.aux_query_fused == 0.5
  # Stage 1 has no fused branch; the long budget changes only its steps there.
  default, long = demo.get_config("stage=1").to_dict(), demo.get_config("stage=1,budget=long").to_dict()
  assert long["train"].pop("steps") == 5 * default["train"].pop("steps") and long == default


@pytest.mark.parametrize("name", ["vit_b16_pod", "vit_b16_gpu"])
def test_scale_configs_train_the_fused_branch_on_its_own(name):
  mod = _load(ROOT / "configs" / f"{name}.py")
  assert mod.get_config("stage=2").loss.aux_query_fused == 0.5
  assert mod.get_config("stage=1").loss.aux_query_fused == 0.0  # stage 1 has no fused branch


@pytest.mark.slow
def test_pod_config_runlocal_trains(tiny_data, tmp_path):
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  cfg = _load(ROOT / "configs" / "vit_b16_pod.py").get_config(f"stage=2,runlocal=True,data={tiny_data}")
  cfg.train.progress = False
  out = train.train_and_evaluate(cfg, str(tmp_path / "pod"))
  assert out["loss"] > 0 and out["nonfinite_steps"] == 0
  # Stage 2 trains the fused branch on its own too (loss.aux_query_fused): its term is logged.
  rows = [json.loads(line) for line in (tmp_path / "pod" / "metrics.jsonl").read_text().splitlines()]
  assert any(np.isfinite(r.get("q2f/loss", np.nan)) for r in rows)


# Modules whose `config` is `config.data` (the pipelines take only that part).
DATA_CONFIG_MODULES = ("mmr_jax/batch_spec.py", "mmr_jax/data/pipeline.py", "mmr_jax/data/sources.py",
                       "mmr_jax/data/transforms.py")
# `.get("key"` on objects named like configs that are not the run's config.
NOT_THE_CONFIG = {"mmr_jax/evals/index.py": "cfg is the ScaNN index's own saved json"}
_METHODS = {"get", "unlocked", "to_dict", "copy_and_resolve_references", "update", "lock", "items", "keys"}


def _config_reads():
  """Yields (file:line, key path as read, found in base_config()) for every config read the code spells out."""
  base = config_lib.base_config()
  sections = "|".join(k for k, v in base.items() if isinstance(v, config_lib.ConfigDict))
  all_keys = set()

  def walk(node):
    for k, v in node.items():
      all_keys.add(k)
      if isinstance(v, config_lib.ConfigDict):
        walk(v)
  walk(base)
  chain = re.compile(r"(?<![\w.])config((?:\.\w+)+)")
  get = re.compile(r"\b(?:config|cfg|\w+_cfg|\w+_config)(?:\.\w+)*\.get\(\s*[\"'](\w+)[\"']")
  # getattr(config, "key", default) and helpers of that shape.
  call = re.compile(r"\b(?!hasattr\b)\w+\(\s*(?:self\.)?(?:config|cfg)(?:\.\w+)*\s*,\s*[\"'](\w+)[\"']")
  for path in sorted((ROOT / "mmr_jax").rglob("*.py")):
    rel = path.relative_to(ROOT).as_posix()
    for n, line in enumerate(path.read_text().splitlines(), 1):
      for m in chain.finditer(line):
        parts = m.group(1).split(".")[1:]
        if re.fullmatch(sections, parts[0]):
          node = base
        elif rel in DATA_CONFIG_MODULES:
          node = base.data
        else:
          continue  # `config` of a submodule (e.g. config.model inside the models)
        for part in parts:
          if part in _METHODS or not isinstance(node, config_lib.ConfigDict):
            break
          yield f"{rel}:{n}", m.group(0), part in node
          if part not in node:
            break
          node = node[part]
      if rel not in NOT_THE_CONFIG:
        for m in (*get.finditer(line), *call.finditer(line)):
          yield f"{rel}:{n}", m.group(0), m.group(1) in all_keys


def test_code_reads_only_keys_of_the_base_config():
  # base_config() promises every key a run reads, with its default: a key read with a fallback default
  # in code (`.get("key", default)`) but missing there could not be set from the command line.
  reads = list(_config_reads())
  assert any("read_threads" in what for _, what, _ in reads)  # the scan sees the pipeline's reads
  missing = [(where, what) for where, what, ok in reads if not ok]
  assert not missing, f"config keys read but not in config.base_config(): {missing}"


def test_fill_defaults_adds_keys_an_older_config_json_lacks():
  saved = config_lib.base_config().to_dict()
  del saved["data"]["read_threads"], saved["data"]["shuffle_seed"], saved["model"]["lexical_dim"]
  saved["data"]["batch_size"] = 3
  cfg = config_lib.fill_defaults(config_lib.ConfigDict(json.loads(json.dumps(saved))))
  assert (cfg.data.read_threads, cfg.data.shuffle_seed, cfg.model.lexical_dim) == (8, None, 0)
  assert cfg.data.batch_size == 3  # what the workdir saved stays


def test_fill_defaults_drops_keys_removed_since_and_refuses_a_part_the_code_no_longer_has():
  saved = config_lib.base_config().to_dict()
  saved["model"]["query_expansion_k"], saved["loss"]["query_words"] = 0, 0.0
  saved["optim"]["lr_mult"]["query_expansion"] = 10.0  # a rate of a head that was off: nothing to keep
  cfg = config_lib.fill_defaults(config_lib.ConfigDict(json.loads(json.dumps(saved))))
  as_json = lambda c: json.loads(json.dumps(c.to_dict()))  # noqa: E731  (tuples saved as lists)
  assert as_json(cfg) == as_json(config_lib.base_config())  # what today's code trains without them
  saved["model"]["query_expansion_k"] = 16
  with pytest.raises(ValueError, match=r"config.model.query_expansion_k=16: .* part the code no longer has"):
    config_lib.fill_defaults(config_lib.ConfigDict(json.loads(json.dumps(saved))))
