r"""ViT-B/16 two-tower on GPUs: one node of 8x H100 (or several, with SLURM).

Hardware: 8x H100 80 GB per node; bf16 compute, f32 params; data parallel over GPUs with FSDP
(ZeRO-3) so the optimizer state is sharded; global batch 2048 per node.

  # one node
  python -m mmr_jax.train --config configs/vit_b16_gpu.py:stage=1 --workdir /shared/mmr/b16/stage1
  # two nodes through SLURM (sets the coordinator from SLURM variables)
  python -m launch.slurm --nodes 2 --gpus_per_node 8 --config configs/vit_b16_gpu.py:stage=2,nodes=2 \
      --workdir /shared/mmr/b16/fusion --config.init.workdir=/shared/mmr/b16/stage1 --submit

SigLIP B/16 init (`init=siglip`, config.set_siglip): as in configs/vit_b16_pod.py (which says what it loads
and where to download the checkpoint and its SentencePiece model from), with a local path on every node:

  python -m mmr_jax.train --workdir /shared/mmr/siglip/stage1 \
      --config configs/vit_b16_gpu.py:stage=1,init=siglip,ckpt=/shared/ckpt/webli_en_b16_224_63724782.npz,tokenizer=/shared/ckpt/c4_en.model

Stage 2 with `init=siglip` and `--config.init.workdir=<stage 1>` starts the query tower from SigLIP and takes
`init.load` (image tower, product text tower) from stage 1.

Expected result: throughput on one H100 is measured by tools/bench_train.py (see README, "Benchmarks");
a full multi-node run has not been made from this repository.
"""

from mmr_jax import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, stage=2, variant="fusion", loss="sigmoid", runlocal=False,
                           init="", ckpt="", tokenizer="",
                           data="/shared/mmr/data", steps=0, batch=0, budget="default", nodes=1)
  c = config_lib.base_config()
  c.stage = a.stage
  c.data.dir = a.data
  c.data.batch_size = 2048 * a.nodes
  c.data.num_workers = 16
  c.model.variant = a.variant
  # 256 examples per GPU do not fit 80 GB without remat (tools/bench_train.py: 67 GB of temporaries
  # for one H100 at batch 256). Saving matmul outputs and XLA's fused attention was the fastest
  # measured setting on one H100: 1,144 vs 1,033 examples/s for full remat + flax attention.
  config_lib.set_b16_model(c, remat=True, scan_layers=True, remat_policy="dots_with_no_batch_dims_saveable",
                           attention_impl="xla")
  c.loss.kind = a.loss
  c.optim.lr = 1e-3 if a.stage == 1 else 5e-4
  c.optim.warmup_steps = 2000
  c.train.steps = 50_000 if a.stage == 1 else 20_000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.ckpt_every = 1000
  if a.stage == 2:
    config_lib.set_b16_stage2(c)
  c.mesh.shape.dcn = a.nodes
  c.mesh.shape.data = 1
  c.mesh.shape.fsdp = -1
  config_lib.apply_budget(c, a)
  if a.init == "siglip":  # After apply_budget: runlocal keeps SigLIP's structure at the smoke-test size.
    size = config_lib.SIGLIP_RUNLOCAL if a.runlocal else dict(
        variant="B/16", image_size=224, text_len=64, remat=True, scan_layers=True,
        remat_policy="dots_with_no_batch_dims_saveable", attention_impl="xla")
    config_lib.set_siglip(c, a.ckpt, a.tokenizer, **size)
  elif a.init:
    raise ValueError(f"init={a.init!r}; expected '' (from scratch) or 'siglip'")
  return c
