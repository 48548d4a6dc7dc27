"""Data: catalogue folder -> validated TFDS tables (import), tokenizer, synthetic catalogues, pipelines.

Submodules are imported explicitly (`from mmr_jax.data import catalog`) so that importing the
package pulls in neither TensorFlow nor TFDS.
"""
