r"""Benchmarks the training step: throughput, model FLOPs utilisation, and the sharded loss's memory.

  python tools/bench_train.py                                   # ViT-S-sized two-tower (fusion), CPU
  python tools/bench_train.py --size mu --image_size 32 --patch 8 --batch 64 --steps 20
  python tools/bench_train.py --config configs/demo.py:variant=text_only --size B --dtype bfloat16
  python tools/bench_train.py --peer open_clip                  # also time open_clip's CLIP (torch)

Prints one JSON object:
  examples_per_s, steps_per_s        the compiled train step on random batches (after warm-up; the
                                     input pipeline is not timed: see tools/bench_data.py)
  model_flops_per_step               analytic: 3 x the matmul FLOPs of one forward pass of the loss
                                     (every tower, fusion, heads, logits), counted from its jaxpr
                                     (dot_general / conv shapes; scan bodies x trip count)
  xla_flops_per_step                 XLA's cost analysis of the compiled step (all ops; counts a
                                     while-loop body once, so it is low with scan_layers)
  matmul_peak_flops                  a large jitted matmul in the model's compute dtype, timed here
  mfu_vs_matmul_peak                 model_flops_per_step * steps_per_s / matmul_peak_flops
  spec_peak_flops, mfu_vs_spec_peak  on H100/H200 only: vs the bf16 dense spec (989 TFLOP/s)
  loss_memory                        per-device temp bytes (compile-only memory analysis) of loss +
                                     gradients at global batch 4k/16k/64k: dense on one device vs
                                     ring / gather sharded over 8 simulated CPU devices (a subprocess)
  peer                               open_clip's timing, or {"status": "skipped", "reason": ...}
  profile                            with --profile DIR: a jax.profiler trace of --profile_steps more
                                     steps in DIR and its summary (busy fraction and busiest ops per
                                     step of each traced process, e.g. the GPU's kernels)

The model is `--config` (default configs/demo.py) with both towers of preset `--size` (ViT-S/16 at
224 px and an S text tower by default), scan over layers (compile time independent of depth).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPEC_PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core FLOP/s (SXM)
LOSS_MEMORY_BATCHES = (4096, 16384, 65536)


def _log(msg: str) -> None:
  print(f"[bench_train {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ config


def build_config(args):
  """Returns the resolved trainer config: --config with --size towers and the bench's batch/shape."""
  from launch import common  # pylint: disable=g-import-not-at-top
  from mmr_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mmr_jax import sweep_runner  # pylint: disable=g-import-not-at-top
  from mmr_jax.models import two_tower  # pylint: disable=g-import-not-at-top
  path, arg = common.split_config_ref(args.config)
  if not os.path.exists(path) and os.path.exists(os.path.join(ROOT, path)):  # run from outside the repo
    path = os.path.join(ROOT, path)
  module = sweep_runner.load_config_module(path)
  cfg = module.get_config(arg)
  if args.size:
    model = two_tower.get_config(cfg.model.variant, args.size, patch_size=args.patch, vocab_size=args.vocab,
                                 max_len=max(args.text_len, 16), embed_dim=args.embed_dim or 384)
    model.name = cfg.model.name
    cfg.model = model
  if args.embed_dim:
    cfg.model.embed_dim = args.embed_dim
  if cfg.model.text.vocab_size <= 0:
    cfg.model.text.vocab_size = args.vocab
  for tower in ("vit", "text", "fusion"):
    cfg.model[tower].scan_layers = args.scan_layers
    cfg.model[tower].remat = args.remat
    cfg.model[tower].attention_impl = args.attention
    cfg.model[tower].remat_policy = args.remat_policy
  cfg.model.dtype = args.dtype
  cfg.model.contrastive = cfg.loss.kind
  cfg.data.batch_size = args.batch
  cfg.data.image_size = args.image_size
  cfg.data.query_len = cfg.data.title_len = min(args.text_len, cfg.model.text.max_len)
  cfg.data.product_len = min(args.text_len, cfg.model.text.max_len)
  cfg.train.steps = args.warmup + args.steps
  cfg.mesh.shape = config_lib.ConfigDict(dict(dcn=1, data=-1, fsdp=1, tensor=1))
  return cfg


def random_batch(config, batch_size: int, seed: int) -> dict:
  """Returns a training batch of random tokens (random lengths) and images with the pipeline's keys."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmr_jax.training import objectives  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  example = objectives.get(config.stage).example_batch(config, batch_size)
  out = {}
  for k, v in example.items():
    v = np.asarray(v)
    if k.endswith("_tokens"):
      ids = rng.integers(4, config.model.text.vocab_size, size=v.shape, dtype=np.int32)
      lengths = rng.integers(max(1, v.shape[1] // 4), v.shape[1] + 1, size=v.shape[0])
      ids[np.arange(v.shape[1])[None, :] >= lengths[:, None]] = 0
      out[k] = ids
    elif k == "image":
      out[k] = rng.integers(0, 256, size=v.shape, dtype=np.uint8)
    else:
      out[k] = v
  return out


# ------------------------------------------------------------------------------------------- FLOPs


def _dot_flops(eqn) -> int:
  (lc, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  out = eqn.outvars[0].aval.shape
  return 2 * math.prod(out) * math.prod(lhs[d] for d in lc)


def _conv_flops(eqn) -> int:
  rhs = eqn.invars[1].aval.shape  # kernel: spatial dims + [in / groups, out] in some layout
  out = eqn.outvars[0].aval.shape
  dn = eqn.params["dimension_numbers"]
  out_features = rhs[dn.rhs_spec[0]]
  return 2 * math.prod(out) * math.prod(rhs) // max(out_features, 1)


def matmul_flops(jaxpr) -> int:
  """Returns the FLOPs of every dot_general / convolution in a (closed) jaxpr, nested ones included.

  scan bodies count `length` times, shard_map bodies once per device of their mesh, cond the
  costliest branch, while loops their body once (their trip count is not static).
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
      continue
    if name == "conv_general_dilated":
      total += _conv_flops(eqn)
      continue
    if name == "cond":
      total += max(matmul_flops(b) for b in eqn.params["branches"])
      continue
    mult = 1
    if name == "scan":
      mult = int(eqn.params["length"])
    elif name == "shard_map":
      mesh = eqn.params["mesh"]
      mult = math.prod(mesh.shape[a] for a in eqn.params.get("manual_axes", mesh.axis_names))
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr", "body_jaxpr"):
      sub = eqn.params.get(key)
      if sub is not None and hasattr(getattr(sub, "jaxpr", sub), "eqns"):
        total += mult * matmul_flops(sub)
  return total


def forward_matmul_flops(trainer, batch) -> int:
  """Returns the matmul FLOPs of one forward pass of the trainer's loss on `batch`."""
  import jax  # pylint: disable=g-import-not-at-top
  params = trainer.abstract_state.params
  with trainer.context():
    jaxpr = jax.make_jaxpr(lambda p, b: trainer._loss(p, b, jax.random.PRNGKey(0), True))(  # pylint: disable=protected-access
        params, batch)
  return matmul_flops(jaxpr)


def matmul_peak(dtype: str, n: int, trials: int = 5, seconds: float = 0.5) -> float:
  """Returns the best FLOP/s over `trials` timings (~`seconds` each) of an n x n x n jitted matmul.

  The best, not the mean: on a shared machine the peak is what the hardware does when it is ours.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  t = time.perf_counter()
  f(a, b).block_until_ready()
  reps = max(2, int(seconds / max(time.perf_counter() - t, 1e-6)))
  best = 0.0
  for _ in range(trials):
    t = time.perf_counter()
    for _ in range(reps):
      out = f(a, b)
    out.block_until_ready()
    best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
  return best


# ------------------------------------------------------------------------------------ train step


def time_train_step(config, args) -> dict[str, Any]:
  """Returns throughput, FLOP counts and compiled memory of the config's train step."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  config.lock()
  trainer = train.Trainer(config, "/nonexistent-bench-workdir")
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(trainer.abstract_state.params))
  batches = [random_batch(config, args.batch, seed=i) for i in range(2)]
  fwd = forward_matmul_flops(trainer, batches[0])
  _log(f"{n_params / 1e6:.1f}M params, {fwd / 1e9:.1f} GFLOP forward matmuls; compiling the step")
  t = time.perf_counter()
  state = trainer.init_state()
  mem = trainer.memory_analysis()  # compiles the step once
  compile_s = time.perf_counter() - t
  global_batches = [shd.host_batch_to_global(b, trainer.mesh) for b in batches]
  step = trainer.compiled_step()
  for i in range(args.warmup):
    state, metrics = step(state, global_batches[i % 2])
  jax.block_until_ready(metrics)
  _log(f"compiled in {compile_s:.0f}s; timing {args.steps} steps")
  times = []
  for i in range(args.steps):
    t = time.perf_counter()
    state, metrics = step(state, global_batches[i % 2])
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t)
  profile = None
  if args.profile:
    from mmr_jax.training import profiling  # pylint: disable=g-import-not-at-top
    _log(f"tracing {args.profile_steps} more steps into {args.profile}")
    prof = profiling.StepProfiler(args.profile, first=0, num=args.profile_steps)
    for i in range(args.profile_steps):
      prof.before(i)
      state, metrics = step(state, global_batches[i % 2])
      prof.after(i + 1, (state, metrics))
    profile = prof.summary
    _log("profile:\n" + profiling.format_summary(profile))
  loss = float(metrics["loss"])
  # The median step: robust to a neighbour's burst on a shared machine (the mean is reported too).
  step_s = float(sorted(times)[len(times) // 2])
  return dict(steps_per_s=1.0 / step_s, examples_per_s=args.batch / step_s, step_s_mean=sum(times) / len(times),
              model_flops_per_step=3.0 * fwd, xla_flops_per_step=mem.get("xla_flops_per_step"),
              num_params=n_params, compile_s=compile_s, final_loss=loss,
              compiled_memory_bytes={k: v for k, v in mem.items() if k.endswith("_bytes")},
              **({"profile": profile} if profile else {}))


# ------------------------------------------------------------------------------------ loss memory


def loss_memory_child(dim: int, devices: int) -> dict:
  """Returns {kind: {batch: {dense_1dev, ring_Ndev, gather_Ndev}}} temp bytes (run with N CPU devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax.training import sharded_loss  # pylint: disable=g-import-not-at-top
  if jax.device_count() < devices:
    raise SystemExit(f"loss memory: need {devices} devices, have {jax.device_count()}")

  def temp_bytes(kind, how, n, k):
    return sharded_loss.loss_grad_temp_bytes(kind, how, n, dim, jax.devices()[:k])

  out = {}
  for kind in ("softmax", "sigmoid"):
    out[kind] = {}
    for n in LOSS_MEMORY_BATCHES:
      row = {"dense_1dev": temp_bytes(kind, "dense", n, 1)}
      for how in ("ring", "gather"):
        row[f"{how}_{devices}dev"] = temp_bytes(kind, how, n, devices)
      out[kind][str(n)] = row
  return out


def loss_memory(dim: int, devices: int = 8) -> dict:
  """Runs loss_memory_child in a subprocess with `devices` simulated CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip())
  r = subprocess.run([sys.executable, os.path.abspath(__file__), "--_loss_memory_child", str(dim), str(devices)],
                     env=env, capture_output=True, text=True, timeout=1200, check=False)
  if r.returncode:
    return {"error": r.stderr[-2000:]}
  return json.loads(r.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- peer


def peer_open_clip(config, args) -> dict:
  """Returns open_clip's train-step timing for a CLIP of the same tower sizes, or why it was skipped."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import open_clip  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    # ImportError when absent; a RuntimeError when torchvision's build does not match torch's.
    return {"status": "skipped",
            "reason": f"open_clip not importable: {type(e).__name__}: {str(e)[:300]} "
                      "(needs torch, a matching torchvision, and open_clip_torch)"}
  v, t = config.model.vit, config.model.text
  cfg = dict(embed_dim=config.model.embed_dim,
             vision_cfg=dict(image_size=args.image_size, layers=v.depth, width=v.width,
                             head_width=v.width // v.num_heads, patch_size=args.patch,
                             mlp_ratio=v.get("mlp_ratio", 4.0)),
             text_cfg=dict(context_length=args.text_len, vocab_size=t.vocab_size, width=t.width,
                           heads=t.num_heads, layers=t.depth))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = open_clip.model.CLIP(**cfg).to(device)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
  texts = torch.randint(4, t.vocab_size, (args.batch, args.text_len), device=device)

  def step():
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
      img, txt, scale = model(images, texts)[:3]
      logits = scale * img @ txt.T
      labels = torch.arange(args.batch, device=device)
      loss = (torch.nn.functional.cross_entropy(logits, labels)
              + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  def sync():
    if device == "cuda":
      torch.cuda.synchronize()

  for _ in range(args.warmup):
    step()
  sync()
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    loss = step()
    sync()
    times.append(time.perf_counter() - t0)
  step_s = sorted(times)[len(times) // 2]
  if not math.isfinite(float(loss.detach())):
    raise FloatingPointError("open_clip's loss is not finite")
  return {"status": "ok", "library": f"open_clip {open_clip.__version__}, torch {torch.__version__}",
          "device": device, "model": "CLIP (one text tower, no fusion) of the same widths/depths",
          "steps_per_s": 1.0 / step_s, "examples_per_s": args.batch / step_s,
          "num_params": sum(p.numel() for p in model.parameters())}


# -------------------------------------------------------------------------------------------- main


def run_peer(argv) -> dict:
  """Returns peer_open_clip's result from a fresh process with the same arguments."""
  argv = list(sys.argv[1:] if argv is None else argv)
  r = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--_peer_child"],
                     capture_output=True, text=True, timeout=3600, check=False)
  lines = r.stdout.strip().splitlines()
  if r.returncode or not lines:
    return {"status": "failed", "reason": r.stderr[-1500:]}
  return json.loads(lines[-1])


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python tools/bench_train.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/demo.py:variant=fusion",
                 help="config ref; its variant, loss and optimizer are used (default: %(default)s)")
  p.add_argument("--size", default="S", help="tower size preset for both towers (mu, Ti, S, B, ...); '' keeps "
                 "the config's model")
  p.add_argument("--patch", type=int, default=16)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--text_len", type=int, default=64, help="query/product/title token length")
  p.add_argument("--vocab", type=int, default=32_000, help="vocabulary size (no tokenizer needed)")
  p.add_argument("--embed_dim", type=int, default=0, help="joint embedding size (default: 384 with --size)")
  p.add_argument("--batch", type=int, default=16, help="global batch")
  p.add_argument("--steps", type=int, default=5, help="timed steps")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
  p.add_argument("--scan_layers", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
  p.add_argument("--attention", default="flax", choices=["flax", "xla", "cudnn"],
                 help="attention_impl of every tower (cudnn: fused flash attention, NVIDIA GPUs)")
  p.add_argument("--remat_policy", default="nothing_saveable",
                 help="jax.checkpoint_policies name used with --remat (e.g. dots_with_no_batch_dims_saveable)")
  p.add_argument("--remat", type=lambda s: s.lower() in ("1", "true", "yes"), default=False)
  p.add_argument("--matmul_n", type=int, default=0, help="peak matmul size (default: 4096 CPU, 8192 GPU)")
  p.add_argument("--loss_memory", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                 help="measure the sharded loss's per-device memory (8 simulated CPU devices)")
  p.add_argument("--peer", choices=["none", "open_clip"], default="none")
  p.add_argument("--out", help="also write the JSON here")
  p.add_argument("--profile", default="", help="trace --profile_steps more steps into this folder (TensorBoard "
                 "profile plugin / XProf) and add a per-op summary to the JSON")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--_loss_memory_child", nargs=2, type=int, help=argparse.SUPPRESS)
  p.add_argument("--_peer_child", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args._loss_memory_child:  # pylint: disable=protected-access
    print(json.dumps(loss_memory_child(*args._loss_memory_child)))  # pylint: disable=protected-access
    return 0
  if args._peer_child:  # pylint: disable=protected-access
    # No JAX backend in this process: jax.devices() would claim the accelerator's memory.
    try:
      import torch  # pylint: disable=g-import-not-at-top
      accelerator = torch.cuda.is_available()
    except ImportError:
      accelerator = False
    args.dtype = args.dtype or ("bfloat16" if accelerator else "float32")
    try:
      out = peer_open_clip(build_config(args), args)
    except Exception as e:  # pylint: disable=broad-except
      out = {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:500]}"}
    print(json.dumps(out))
    return 0
  peer = None
  if args.peer == "open_clip":
    # First, in its own process: once JAX starts here it holds most of the accelerator's memory.
    _log("peer: open_clip (in a subprocess, before JAX claims the accelerator)")
    peer = run_peer(argv)
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  accelerator = dev.platform in ("gpu", "tpu")
  args.dtype = args.dtype or ("bfloat16" if accelerator else "float32")
  config = build_config(args)
  result: dict[str, Any] = dict(device=dev.device_kind, platform=dev.platform, num_devices=jax.device_count(),
                                variant=config.model.variant, size=args.size, batch=args.batch,
                                image_size=args.image_size, patch=args.patch, text_len=args.text_len,
                                dtype=args.dtype, scan_layers=args.scan_layers, remat=args.remat)
  result.update(time_train_step(config, args))
  n = args.matmul_n or (8192 if accelerator else 4096)
  result["matmul_peak_flops"] = matmul_peak(args.dtype, n)
  result["matmul_peak_shape"] = f"{n}x{n}x{n} {args.dtype}"
  achieved = result["model_flops_per_step"] * result["steps_per_s"]
  result["model_flops_per_s"] = achieved
  result["mfu_vs_matmul_peak"] = achieved / result["matmul_peak_flops"]
  spec = next((v for k, v in SPEC_PEAK_BF16.items() if k in dev.device_kind), None)
  if spec and args.dtype == "bfloat16":
    result["spec_peak_flops"] = spec
    result["mfu_vs_spec_peak"] = achieved / spec
  if args.loss_memory:
    _log("loss memory at global batch " + "/".join(map(str, LOSS_MEMORY_BATCHES)) + " (compile only)")
    from mmr_jax.models import two_tower  # pylint: disable=g-import-not-at-top
    result["loss_memory"] = loss_memory(two_tower.embedding_dim(config.model))
  if peer is not None:
    result["peer"] = peer
  text = json.dumps(result, indent=1, default=float)
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
