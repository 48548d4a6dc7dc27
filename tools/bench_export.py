"""Benchmarks the serving SavedModel against the same retrieval done in Python with JAX.

Both sides answer a batch of raw query strings with the top-K product indexes, ids and scores:
  savedmodel  OUT/serving `serving_default` (tokenisation, query tower, ScaNN TF op, sort, id lookup in
              one graph), called from Python with a numpy string array; outputs fetched to numpy
  jax         numpy SentencePiece (`Tokenizer.encode`) -> the jitted JAX query tower (bare `jax.jit` on
              device-resident parameters) -> `ScannIndex.search` on the exported index -> id lookup
Also reported: `jax_trained_model_ms`, the same with `Embedder.embed_queries` (the sharded
host->global path evaluation uses) instead of the bare jit, and `savedmodel_graph_ms`, the SavedModel run
by TF's graph runtime (`tf.compat.v1.Session.run` of the signature), which is what TensorFlow Serving's
C++ server does per request without Python's eager call overhead. Graph mode is process-global, so that
runs in a child process, alternating with the same JAX pipeline timed there (`jax_graph_run_ms`):
`ratio_graph` compares two medians from the same rounds, like `ratio`.

Each set is timed alternately, one call each per round in a shuffled order, so load from other processes
(and whatever the previous call left running) hits all alike; the medians over `--repeats` rounds are
reported. Prints one JSON object (and writes it to --json_out):

  {"batch_sizes": {"1": {"savedmodel_ms", "jax_ms", "ratio", "jax_trained_model_ms", "ratio_vs_trained_model",
                         "savedmodel_graph_ms", "jax_graph_run_ms", "ratio_graph", "same_top_k"}, "64": {...}},
   "num_products", "k", "device", "cpu_count", ...}

ratio = savedmodel_ms / jax_ms (below 1: the SavedModel is faster).

Before the timing, `first_calls` records the first call of each batch size in `--first_call_sizes` on the
freshly loaded model, in that order: {"batch", "bucket" (the padded size the towers' XLA program runs),
"savedmodel_ms", "jax_ms"}. A size whose bucket is new pays an XLA compile; a size sharing a bucket
already seen does not (the jitted JAX tower compiles every new size).

  python tools/bench_export.py --workdir WORKDIR --out EXPORT_DIR [--data DATA_DIR]
  (exports first when EXPORT_DIR/serving does not exist)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _log(msg: str) -> None:
  print(f"[bench_export] {msg}", file=sys.stderr, flush=True)


def _queries(data_dir: str, n: int) -> list[str]:
  """Returns n query strings from the test split (cycled), else synthetic ones."""
  from mmr_jax.data import sources, tfds_builder  # pylint: disable=g-import-not-at-top
  texts = []
  for split in ("test", "validation", "train"):
    src = tfds_builder.load_source(data_dir, "queries", split)
    texts += [sources.row_text(src[i], "text") for i in range(min(len(src), 512))]
    if texts:
      break
  if not texts:
    texts = [f"query {i}" for i in range(64)]
  return [texts[i % len(texts)] for i in range(n)]


def _jax_pipeline(workdir: str, out: str, data_dir: str, k: int):
  """Returns (fn(queries) -> (indices, scores, ids) with the bare jitted tower, the Embedder, the index).

  The JAX side of the comparison: numpy SentencePiece, the jitted query tower on device-resident
  parameters, `ScannIndex.search` on the exported index, then the same id lookup the SavedModel does.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax.evals import index as index_lib  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import sources  # pylint: disable=g-import-not-at-top
  from mmr_jax.evals import embedding  # pylint: disable=g-import-not-at-top
  tm = embedding.load_trained(workdir, data_dir)
  tok = sources.load_tokenizer(data_dir, tm.config.data)
  q_len = int(tm.config.data.query_len)
  index = index_lib.ScannIndex.load(os.path.join(out, "embeddings", "index"))
  with open(os.path.join(out, "embeddings", "ids.txt"), encoding="utf-8") as f:
    ids = np.asarray(f.read().split("\n")[:-1], dtype=object)
  model = tm.model
  bare = jax.jit(lambda params, t: model.apply({"params": params}, t, train=False, method="embed_query")["emb"])

  def run(queries, embed=lambda t: np.asarray(bare(tm.params, t))):
    emb = embed(tok.encode(queries, q_len))
    idx, scores = index.search(emb, k)
    return idx, scores, np.where(idx >= 0, ids[np.maximum(idx, 0)], "")

  return run, tm, index


def _graph_worker(workdir: str, out: str, data_dir: str, k: int, batch_sizes: list[int], queries: list[str],
                  repeats: int, warmup: int) -> dict:
  """Returns {batch size: (Session.run median ms, JAX median ms)}, the two timed alternately (graph mode)."""
  import scann  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_text  # pylint: disable=g-import-not-at-top,unused-import
  tf.compat.v1.disable_eager_execution()
  run_jax, _, _ = _jax_pipeline(workdir, out, data_dir, k)
  res = {}
  with tf.compat.v1.Session() as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], os.path.join(out, "serving"))
    sig = meta.signature_def["serving_default"]
    fetches = [sig.outputs[name].name for name in ("ids", "scores", "indices")]
    for b in batch_sizes:
      batch = [queries[i % len(queries)] for i in range(b)]
      feed = {sig.inputs["queries"].name: np.asarray(batch, object)}
      fns = (lambda: sess.run(fetches, feed), lambda: run_jax(batch))
      for _ in range(warmup):
        for fn in fns:
          fn()
      times = ([], [])
      rng = np.random.default_rng(0)
      for _ in range(repeats):
        for i in rng.permutation(2):  # a fresh order each round, as in main()
          t0 = time.perf_counter()
          fns[i]()
          times[i].append(time.perf_counter() - t0)
      res[str(b)] = [1000 * float(np.median(t)) for t in times]
  return res


def _graph_mode_ms(workdir: str, out: str, data_dir: str, k: int, batch_sizes: list[int], queries: list[str],
                   repeats: int, warmup: int) -> dict:
  """Returns _graph_worker's result, run in a child process (graph mode is process-global)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    spec = os.path.join(tmp, "spec.json")
    with open(spec, "w") as f:
      json.dump({"workdir": workdir, "out": out, "data_dir": data_dir, "k": k, "batch_sizes": batch_sizes,
                 "queries": queries, "repeats": repeats, "warmup": warmup}, f)
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--graph_worker", spec],
                       capture_output=True, text=True, check=False)
  if r.returncode != 0:
    raise RuntimeError(f"graph-mode worker failed:\n{r.stderr[-3000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--workdir", required=True, help="trained workdir")
  p.add_argument("--out", required=True, help="export directory (mmr_jax.export output); exported if missing")
  p.add_argument("--data", default=None, help="DATA_DIR (default: the workdir's)")
  p.add_argument("--batch_sizes", default="1,64", help="comma-separated query batch sizes (default 1,64)")
  p.add_argument("--repeats", type=int, default=200, help="timed rounds per batch size (default 200)")
  p.add_argument("--warmup", type=int, default=20, help="untimed rounds first (compilation, caches)")
  p.add_argument("--k", type=int, default=100, help="k when exporting (an existing export keeps its own)")
  p.add_argument("--json_out", default=None, help="also write the JSON here")
  p.add_argument("--no_graph_mode", action="store_true", help="skip the graph-mode (Session.run) timing")
  p.add_argument("--first_call_sizes", default="1,3,4,5,7,8,2",
                 help="batch sizes whose first call (compile included) is timed, in order; '' skips")
  p.add_argument("--graph_worker", default=None, help=argparse.SUPPRESS)
  if argv is None and "--graph_worker" in sys.argv:  # child process of _graph_mode_ms
    with open(sys.argv[sys.argv.index("--graph_worker") + 1]) as f:
      print(json.dumps(_graph_worker(**json.load(f))))
    sys.exit(0)
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax.export import saving, towers, workdir  # pylint: disable=g-import-not-at-top

  if not os.path.isfile(os.path.join(args.out, "serving", "saved_model.pb")):
    _log(f"no export at {args.out}: exporting")
    workdir.export_workdir(args.workdir, args.out, args.data, k=args.k, parity=False)
  summary = json.loads(open(os.path.join(args.out, workdir.SUMMARY_FILE)).read())
  data_dir = args.data or summary["data_dir"]
  k = int(summary["k"])

  _log("loading the serving SavedModel and the JAX model")
  serving = saving.load_saved_model(os.path.join(args.out, "serving")).signatures["serving_default"]
  jax_bare, tm, index = _jax_pipeline(args.workdir, args.out, data_dir, k)
  trained_fn = tm.embed_queries

  def run_savedmodel(queries):
    out = serving(queries=np.asarray(queries, dtype=object))
    return out["indices"].numpy(), out["scores"].numpy(), out["ids"].numpy()

  def jax_trained(queries):
    return jax_bare(queries, lambda t: trained_fn({"query_tokens": t}))

  first_calls = []
  for b in [int(x) for x in args.first_call_sizes.split(",") if x.strip()]:
    queries = _queries(data_dir, b)
    t0 = time.perf_counter()
    run_savedmodel(queries)
    t1 = time.perf_counter()
    jax_bare(queries)
    t2 = time.perf_counter()
    bucket = towers.batch_bucket(b, summary.get("batch_buckets", [b]))  # older exports: no buckets
    first_calls.append({"batch": b, "bucket": bucket, "savedmodel_ms": 1000 * (t1 - t0), "jax_ms": 1000 * (t2 - t1)})
    _log(f"first call: {json.dumps(first_calls[-1])}")
  results = {}
  batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
  graph_ms = {}
  if not args.no_graph_mode:
    _log("timing the SavedModel in TF graph mode, alternating with JAX (child process)")
    graph_ms = _graph_mode_ms(os.path.abspath(args.workdir), os.path.abspath(args.out), data_dir, k, batch_sizes,
                              _queries(data_dir, max(batch_sizes)), args.repeats, args.warmup)
  for b in batch_sizes:
    queries = _queries(data_dir, b)
    fns = {"savedmodel": run_savedmodel, "jax": jax_bare, "jax_trained_model": jax_trained}
    for _ in range(args.warmup):
      for fn in fns.values():
        fn(queries)
    times = {name: [] for name in fns}
    rng = np.random.default_rng(0)
    for _ in range(args.repeats):
      # A fresh order each round: a call pays for what the one before it left behind (thread-pool threads
      # still spinning, caches), and a fixed order would bill one side for the other's.
      for name in rng.permutation(list(fns)):
        t0 = time.perf_counter()
        fns[name](queries)
        times[name].append(time.perf_counter() - t0)
    med = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    sm, jx = run_savedmodel(queries), jax_bare(queries)
    results[str(b)] = {
        "savedmodel_ms": med["savedmodel"], "jax_ms": med["jax"], "ratio": med["savedmodel"] / med["jax"],
        "jax_trained_model_ms": med["jax_trained_model"],
        "ratio_vs_trained_model": med["savedmodel"] / med["jax_trained_model"],
        # Query embeddings differ by ~1e-7 between the two runtimes, so near-ties may swap.
        "same_top_k": float(np.mean([set(a) == set(c) for a, c in zip(sm[0], jx[0])])),
    }
    if str(b) in graph_ms:
      g, j = graph_ms[str(b)]
      results[str(b)].update(savedmodel_graph_ms=g, jax_graph_run_ms=j, ratio_graph=g / j)
    _log(f"batch {b}: {json.dumps(results[str(b)])}")

  report = {
      "batch_sizes": results, "first_calls": first_calls, "num_products": int(index.size), "k": k,
      "repeats": args.repeats,
      "statistic": "median ms per call (batch of raw query strings -> top-k ids and scores)",
      "device": jax.devices()[0].device_kind, "platform": platform.platform(), "cpu_count": os.cpu_count(),
      "load_average": list(os.getloadavg()), "versions": workdir.versions(),
      "workdir": os.path.abspath(args.workdir), "export": os.path.abspath(args.out)}
  text = json.dumps(report, indent=2)
  print(text)
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(text + "\n")
  return report


if __name__ == "__main__":
  main()
