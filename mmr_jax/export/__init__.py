r"""Export of a trained workdir for serving: SavedModels, the embedded catalogue and its ScaNN index.

  python -m mmr_jax.export --workdir DIR --out OUT [--data DATA_DIR] [--k 100]

writes
  OUT/query_tower/          SavedModel: raw UTF-8 query strings -> L2-normalised query embeddings
  OUT/product_tower/        SavedModel: title, description, attributes, image bytes -> product embeddings
  OUT/serving/              SavedModel: raw query strings -> top-K product ids and scores (query tower and
                            the ScaNN searcher inside one graph)
  OUT/embeddings/           the catalogue embedded by the JAX model, its product ids and its ScaNN index
  OUT/export_summary.json   what was written, from which checkpoint, measured parity, timings, versions

A serving system receives what a shopper types and what a catalogue stores, not token ids or pixel
arrays, so everything that happens to an input before the model runs happens inside the graphs:
SentencePiece, the assembly of a product's text and a Pillow-exact image decoder (preprocess.py).
Training and evaluation run the same steps in Python; reproducing them bit for bit in TF ops is what
makes an exported model embed like the JAX model, and every export measures that it does against the
JAX model (parity.py) and fails when it does not.

The towers are the JAX model converted by jax2tf (convert.py) into tf.Modules whose parameters stay
variables and whose XLA programs are compiled for a fixed set of batch sizes (towers.py). The serving
model puts ScaNN's TF searcher, rebuilt from the very files the Python `ScannIndex` searches, behind the
query tower, so one call answers a query with product ids (scann_graph.py). saving.py writes the
SavedModels with TF Serving's warm-up requests and loads them back. The catalogue is embedded by the
JAX model the way evaluation embeds it, resumably and on every host (embeddings.py). workdir.py runs
the whole export; cli.py is its command line. Each module's docstring holds its part of the contract:
input conventions, signatures, file formats.

Unlike the rest of mmr_jax, the modules here that build or load graphs import TensorFlow (and ScaNN's
and tensorflow-text's ops) at the top: the package is imported to export a model or to load an export.
To load a SavedModel elsewhere, `import scann, tensorflow_text` (their custom ops) before
`tf.saved_model.load(path)`.
"""
