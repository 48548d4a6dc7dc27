"""mmr_jax: multimodal two-tower retrieval for e-commerce search (JAX / Flax). See mmr_jax/DESIGN.md."""

import os

# TensorFlow (the TFDS data pipeline and export) reads its C++ log threshold once, when it loads: on a
# machine without a GPU its CUDA probe would otherwise print a "failed call to cuInit" error line into
# every command's output. Errors still surface as Python exceptions; TF_CPP_MIN_LOG_LEVEL=0 shows them all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
