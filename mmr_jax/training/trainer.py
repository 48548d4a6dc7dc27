"""The compiled training step and its sharded state, for any config: what `train` runs in its loop.

`Trainer(config, workdir, mesh)` builds the model from the registry (`models.create_model`), the objective
of `config.stage` (`objectives.OBJECTIVES`), the optimizer, the parameter / optimizer-state / batch
shardings from the logical-axis rules, and one jitted step (gradient accumulation, a non-finite step leaves
the state untouched). `resolve_config` fills what a config can only know at run time.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from mmr_jax import checkpoint as ckpt_lib
from mmr_jax.data import pipeline
from mmr_jax.data import query_translation
from mmr_jax.data import sources
from mmr_jax.data import tokenizer as tok_lib
from mmr_jax.models import create_model
from mmr_jax.models import pretrained
from mmr_jax.models import two_tower
from mmr_jax import sharding as shd
from mmr_jax.training import big_vision_npz
from mmr_jax.training import objectives
from mmr_jax.training import optimizer as optim_lib

log = logging.getLogger("mmr_jax.training.trainer")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite: jax.Array  # count of steps whose loss or gradients were NaN/Inf (their update was dropped)


def resolve_config(config):
  """Fills run-time values (vocab size from the run's tokenizer); returns a locked copy.

  A configured tokenizer path becomes absolute, so the workdir's config.json names the file that
  evaluation and export must tokenise with; so does data.hard_negative_embeddings (a resume elsewhere mines
  the same file).
  """
  config = config.copy_and_resolve_references()
  with config.unlocked():
    tok_cfg = config.data.get("tokenizer")
    if tok_cfg is not None and tok_cfg.get("path"):
      tok_cfg.path = os.path.abspath(os.path.expanduser(tok_cfg.path))
    mined = config.data.get("hard_negative_embeddings")
    if mined and "://" not in mined:
      config.data.hard_negative_embeddings = os.path.abspath(os.path.expanduser(mined))
    conventions = sources.tokenizer_conventions(config.data)
    if config.model.text.get("pool") == "last" and conventions.eos != "sticky":
      raise ValueError(f"model.text.pool='last' embeds each row's last position, which is padding unless "
                       f"data.tokenizer.eos='sticky' (it is {conventions.eos!r})")
    if config.model.text.vocab_size <= 0:
      try:
        tok = tok_lib.Tokenizer(sources.tokenizer_path(config.data.dir, config.data), conventions=conventions)
      except FileNotFoundError as e:
        if tok_cfg is not None and tok_cfg.get("path"):
          raise
        raise FileNotFoundError(
            f"config.data.dir={config.data.dir!r} is not an imported catalogue ({e}). Pass the DATA_DIR that "
            "import_catalog / make_synthetic wrote: --config configs/demo.py:data=DATA_DIR or "
            "--config.data.dir=DATA_DIR") from None
      config.model.text.vocab_size = tok.vocab_size
    if config.init.get("lexical_idf") and not config.model.get("lexical_dim", 0):
      raise ValueError("config.init.lexical_idf=True starts the lexical segment's token weights at BM25's idf, "
                       "but this model has no lexical segment (config.model.lexical_dim=0)")
    config.model.contrastive = config.loss.kind
    config.model.image_words = config.stage == 1 and float(config.loss.get("image_words", 0.0)) > 0
  config.lock()
  return config


def _deepest(tree, path: str) -> tuple[Any, list[str]]:
  """Returns (subtree, keys) for the longest prefix of "a/b" that nested dict `tree` has."""
  at = []
  for key in path.split("/"):
    if not isinstance(tree, dict) or key not in tree:
      break
    tree, at = tree[key], at + [key]
  return tree, at


def _at_path(tree, path: str):
  """Returns the subtree of nested dict `tree` at "a/b" (None when absent)."""
  sub, at = _deepest(tree, path)
  return sub if len(at) == len(path.split("/")) else None


def initialised_towers(init) -> tuple[str, ...]:
  """Returns the top-level parameter names a run takes from init.two_tower_npz / init.workdir / init.vit_npz
  (a two-tower checkpoint fills the image tower, whichever text towers the model has, and the loss's
  temperature / bias)."""
  names = []
  if init.get("two_tower_npz"):
    names += ["image_tower", *pretrained.TWO_TOWER_TEXT_TOWERS, "loss"]
  if init.workdir:
    names += [n.split("/")[0] for n in init.load]
  if init.vit_npz:
    names.append("image_tower")
  return tuple(dict.fromkeys(names))


class Trainer:
  """Builds the sharded state and the compiled step for one config (train.py runs the loop around it)."""

  def __init__(self, config, workdir: str, mesh=None):
    self.config = config
    self.workdir = epath.Path(workdir)
    self.mesh = mesh if mesh is not None else shd.make_mesh(config.mesh.shape)
    self.rules = shd.logical_rules(config.mesh.rules)
    self.model = create_model(config)
    self.objective = objectives.get(config.stage)
    if config.data.batch_size % shd.data_parallel_size(self.mesh):
      raise ValueError(f"data.batch_size={config.data.batch_size} does not divide by the "
                       f"{shd.data_parallel_size(self.mesh)} data-parallel devices of mesh {dict(self.mesh.shape)}")
    accum = config.optim.grad_accum
    if config.data.batch_size % accum:
      raise ValueError(f"data.batch_size={config.data.batch_size} does not divide by optim.grad_accum={accum}")

    example = self.objective.example_batch(config, config.data.batch_size)
    init_batch = objectives.init_batch(config)
    rng = jax.random.PRNGKey(config.seed)
    with self.context():
      boxed = jax.eval_shape(lambda r: self.model.init(r, init_batch, train=False)["params"], rng)
    self.param_shardings = shd.logical_to_shardings(boxed, self.mesh, self.rules)
    abstract_params = nn.meta.unbox(boxed)
    self.tx, self.schedule = optim_lib.make_optimizer(config.optim, config.train.steps, abstract_params,
                                                      initialised_towers(config.init))
    # Optimizer-state shardings follow the parameters' by path (mu/nu of each param, also inside
    # multi_transform's masked states); XLA's propagation through tx.init would replicate them.
    rep = shd.replicated(self.mesh)
    opt_shardings = shd.param_like_shardings(jax.eval_shape(self.tx.init, abstract_params), abstract_params,
                                             self.param_shardings, rep)
    self.state_shardings = TrainState(step=rep, params=self.param_shardings, opt_state=opt_shardings, nonfinite=rep)
    self.batch_shardings = {k: shd.batch_sharding(self.mesh, np.ndim(v)) for k, v in example.items()}

    def init_fn(r):
      params = nn.meta.unbox(self.model.init(r, init_batch, train=False)["params"])
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                        nonfinite=jnp.zeros((), jnp.int32))

    with self.context():
      self._init = jax.jit(init_fn, out_shardings=self.state_shardings)
      self.abstract_state = jax.eval_shape(init_fn, rng)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_shardings)
    self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_shardings),
                         out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    self._eval = jax.jit(self._eval_step, in_shardings=(self.param_shardings, self.batch_shardings),
                         out_shardings=rep)
    self._example = example
    self._compiled = None

  def context(self):
    """Returns the mesh + logical-axis-rules context the model's tracing and evaluators need."""
    return _Context(self.mesh, self.rules)

  # ------------------------------------------------------------------------------------------ steps

  def _loss(self, params, batch, rng, train):
    return self.objective.loss(self.model, params, batch, self.config, train=train, rng=rng)

  def _train_step(self, state: TrainState, batch):
    cfg = self.config
    rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state.step)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    accum = cfg.optim.grad_accum
    if accum == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, rng, True)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        (l, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), True)
        acc_g, acc_l, acc_m = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, jax.tree.map(jnp.add, acc_m, m)), None

      zeros_g = jax.tree.map(jnp.zeros_like, state.params)
      first = jax.tree.map(lambda x: x[0], micro)
      _, m_shape = jax.eval_shape(lambda: self._loss(state.params, first, rng, True))
      zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
      (grads, loss, metrics), _ = jax.lax.scan(body, (zeros_g, 0.0, zeros_m), (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      metrics = jax.tree.map(lambda m: m / accum, metrics)

    grad_norm = optax.global_norm(grads)
    # NaN/Inf anywhere in the gradients makes their global norm non-finite: one scalar check.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(operands):
      params, opt_state, g = operands
      updates, new_opt = self.tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), new_opt

    # A non-finite step leaves params and optimizer state untouched; the host decides to stop or go on.
    # (lax.cond rather than a per-leaf select: the select over every leaf made XLA's CPU compile 4x slower.)
    new_params, new_opt = jax.lax.cond(finite, apply, lambda ops: (ops[0], ops[1]),
                                       (state.params, state.opt_state, grads))
    new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt,
                           nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=self.schedule(state.step),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics

  def _eval_step(self, params, batch):
    _, metrics = self._loss(params, batch, jax.random.PRNGKey(0), False)
    return metrics

  # ------------------------------------------------------------------------------------------ state

  def init_state(self) -> TrainState:
    with self.context():
      state = self._init(jax.random.PRNGKey(self.config.seed))
    return self._load_init_weights(state)

  def _load_init_weights(self, state: TrainState) -> TrainState:
    """Overwrites parameters from a big_vision two-tower .npz, a stage-1 workdir and/or a ViT .npz."""
    cfg = self.config.init
    params = jax.device_get(state.params)
    changed = False
    if cfg.get("two_tower_npz"):
      params, report = big_vision_npz.load_two_tower_npz_into(params, os.path.expanduser(cfg.two_tower_npz))
      log.info("initialised %d arrays from %s; identity heads %s; %d arrays kept at init: %s",
               len(report["loaded"]), cfg.two_tower_npz, report["identity"], len(report["kept_init"]),
               sorted({"/".join(k.split("/")[:2]) for k in report["kept_init"]}))
      changed = True
    if cfg.get("lexical_idf"):
      idf = pipeline.token_idf(self.config.data.dir, self.config.data, int(self.config.model.text.vocab_size))
      params = pretrained.merge_subtree(params, {"token_weight": two_tower.lexical_token_weights(idf)}, "lexical")
      log.info("initialised lexical/token_weight from the catalogue's idf (%.2f at the median, %.2f .. %.2f)",
               float(np.median(idf)), float(idf.min()), float(idf.max()))
      changed = True
    translation_k = int(self.config.model.get("query_translation_k", 0))
    # A table that init.load takes from init.workdir replaces the fitted one, so it is not fitted.
    if translation_k and "query_translation" in params and "query_translation" not in initialised_towers(cfg):
      params = self._fit_query_translation(params, translation_k)
      changed = True
    if cfg.workdir:
      src, step = ckpt_lib.restore_params(cfg.workdir)
      loaded = []
      for name in cfg.load:
        sub, mine = _at_path(src, name), _at_path(params, name)
        if mine is None:
          # A head this variant does not use (text_only has no heads/image_words) is expected; a top-level part
          # the model lacks (`lexical` with model.lexical_dim=0, a misspelt name) is worth a warning.
          level = logging.INFO if name.split("/")[0] in params else logging.WARNING
          log.log(level, "init.load names %r, which this model does not have: not loaded", name)
          continue
        if sub is None:
          have, at = _deepest(src, name)
          raise KeyError(f"init.load names {name!r} but {cfg.workdir} has only {sorted(have)} at "
                         f"{'/'.join(at) or 'its top level'} (drop {name!r} from config.init.load to start it afresh)")
        params = pretrained.merge_subtree(params, sub, name)
        loaded.append(name)
      log.info("initialised %s from %s (step %d)", loaded, cfg.workdir, step)
      changed = True
    if cfg.vit_npz:
      params = big_vision_npz.load_vit_npz_into(params, cfg.vit_npz, prefix="image_tower")
      log.info("initialised image_tower from %s", cfg.vit_npz)
      changed = True
    if not changed:
      return state
    params = jax.device_put(params, self.param_shardings)
    with self.context():
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state)

  def _fit_query_translation(self, params, k: int):
    """Returns `params` with query_translation/targets fitted on the data's training pairs; writes the table's
    report to the workdir's query_translation.json."""
    qt = self.config.data.query_translation
    targets, report = query_translation.fit(
        self.config.data.dir, self.config.data, int(self.config.model.text.vocab_size), k,
        min_prob=float(qt.min_prob), min_lift=float(qt.min_lift), min_queries=int(qt.min_queries))
    if jax.process_index() == 0:
      ckpt_lib.write_json(self.workdir / "query_translation.json", report)
    shown = ", ".join(f"{e['token']} -> {' '.join(t['token'] for t in e['targets'])}" for e in report["entries"][:8])
    log.info("query translation: %d of the %d query tokens that no product uses translated "
             "(query_translation.json): %s", report["translated"], report["unmatched_query_tokens"], shown or "none")
    return pretrained.merge_subtree(params, {"targets": targets.astype(np.float32)}, "query_translation")

  def memory_analysis(self) -> dict:
    """Returns the compiled step's memory figures (bytes), logged before the loop."""
    compiled = self.compiled_step()
    mem = compiled.memory_analysis()
    out = {}
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "alias_size_in_bytes"):
      if mem is not None and hasattr(mem, k):
        out[k] = int(getattr(mem, k))
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0] if cost else {}
    if cost and "flops" in cost:
      out["xla_flops_per_step"] = float(cost["flops"])
    return out

  def compiled_step(self):
    """Returns the step compiled once for the example batch's shapes (memory analysis and the loop share it)."""
    if self._compiled is None:
      batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=self.batch_shardings[k])
               for k, v in self._example.items()}
      with self.context():
        self._compiled = self._step.lower(self.abstract_state, batch).compile()
    return self._compiled

  def step(self, state, host_batch):
    batch = shd.host_batch_to_global(host_batch, self.mesh)
    return self.compiled_step()(state, batch)

  def objective_metric_names(self) -> set[str]:
    """Returns the names of the objective's metrics (from their shapes, without running it)."""
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in self._example.items()}
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.abstract_state.params)
    with self.context():
      out = jax.eval_shape(self._eval_step, params, batch)
    return set(out)

  def objective_metrics(self, params, batch) -> dict:
    """Returns the objective's metrics on a global batch, without an update (the validation loss)."""
    return self._eval(params, batch)


class _Context:
  """Enters the mesh and the logical-axis rules together (both are needed while tracing)."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules
    self._rules_cm = None

  def __enter__(self):
    self._mesh_cm = jax.set_mesh(self.mesh)
    self._mesh_cm.__enter__()
    self._rules_cm = nn.logical_axis_rules(self.rules)
    self._rules_cm.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules_cm.__exit__(*exc)
    self._mesh_cm.__exit__(*exc)
