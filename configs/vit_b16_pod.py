r"""ViT-B/16 two-tower at pod scale: stage 1 and stage 2 on a TPU v4/v5 pod slice.

Hardware: TPU v4-32 (4 hosts x 4 chips) or v5e-32 / v5p-32; bf16 compute, f32 params; FSDP over the
chips of a slice, data parallel across slices (`dcn`). Global batch 4096 (CLIP/SigLIP-style large
batch: the contrastive loss is computed over the whole global batch, sharded, see mmr_jax/training/sharded_loss.py).

  # stage 1: domain alignment of the image tower (image <-> title)
  python -m launch.tpu_pod run --tpu mmr --zone us-central2-b \
      --config configs/vit_b16_pod.py:stage=1 --workdir gs://BUCKET/mmr/b16/stage1
  # stage 2: query <-> product through the fusion network, image tower from stage 1 at 0.1x lr
  python -m launch.tpu_pod run --tpu mmr --zone us-central2-b \
      --config configs/vit_b16_pod.py:stage=2,variant=fusion --workdir gs://BUCKET/mmr/b16/fusion \
      --config.init.workdir=gs://BUCKET/mmr/b16/stage1

`data` must name an imported catalogue (python -m mmr_jax.data.import_catalog ...) readable by every
host (a gs:// path or a shared disk). Pretrained ViT weights: --config.init.vit_npz=/path/ViT-B_16.npz
(big_vision layout, local path).

SigLIP B/16 init (`init=siglip`, config.set_siglip): image tower, both text towers and the sigmoid
temperature / bias from big_vision's SigLIP B/16 224 px checkpoint; texts tokenised with its c4_en SentencePiece
model (lowercased, sticky eos, padded with id 1, 64 tokens for queries, titles and products). Download both
first (nothing here downloads; the files must be on a local path on every host), then:

  gsutil cp gs://big_vision/siglip/webli_en_b16_224_63724782.npz .       # SigLIP B/16 224 ("SigLIP B/16 224")
  gsutil cp gs://t5-data/vocabs/cc_en.32000/sentencepiece.model c4_en.model   # big_vision's "c4_en"
  python -m launch.tpu_pod run --tpu mmr --zone us-central2-b --workdir gs://BUCKET/mmr/siglip/stage1 \
      --config configs/vit_b16_pod.py:stage=1,init=siglip,ckpt=/mnt/ckpt/webli_en_b16_224_63724782.npz,tokenizer=/mnt/ckpt/c4_en.model

Stage 2 with `init=siglip` and `--config.init.workdir=<stage 1>` starts the query tower from SigLIP and takes
`init.load` (image tower, product text tower) from stage 1.

Expected result: not measured yet on TPU (this repository's CI has no TPU). `runlocal=True` shrinks the
config so the same file runs on one CPU in a minute, which the tests do.
"""

from mmr_jax import config as config_lib


def get_config(arg=None):
  a = config_lib.parse_arg(arg, stage=2, variant="fusion", loss="sigmoid", runlocal=False,
                           init="", ckpt="", tokenizer="",
                           data="gs://BUCKET/mmr/data", steps=0, batch=0, budget="default", slices=1)
  c = config_lib.base_config()
  c.stage = a.stage
  c.data.dir = a.data
  c.data.batch_size = 4096
  c.data.num_workers = 8
  c.model.variant = a.variant
  config_lib.set_b16_model(c, remat=True, scan_layers=True)
  c.loss.kind = a.loss
  c.optim.lr = 1e-3 if a.stage == 1 else 5e-4
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 1e-4
  c.train.steps = 50_000 if a.stage == 1 else 20_000
  c.train.log_every = 50
  c.train.eval_every = 1000
  c.train.ckpt_every = 1000
  c.train.keep = 3
  if a.stage == 2:
    config_lib.set_b16_stage2(c)
  # FSDP inside a slice, data parallel across slices.
  c.mesh.shape.dcn = a.slices
  c.mesh.shape.data = 1
  c.mesh.shape.fsdp = -1
  config_lib.apply_budget(c, a)
  if a.init == "siglip":  # After apply_budget: runlocal keeps SigLIP's structure at the smoke-test size.
    size = config_lib.SIGLIP_RUNLOCAL if a.runlocal else dict(
        variant="B/16", image_size=224, text_len=64, remat=True, scan_layers=True)
    config_lib.set_siglip(c, a.ckpt, a.tokenizer, **size)
  elif a.init:
    raise ValueError(f"init={a.init!r}; expected '' (from scratch) or 'siglip'")
  return c


def get_sweep(arg=None):
  """Loss kind x fusion depth at stage 2 (4 runs)."""
  del arg
  return [{"name": f"{loss}_depth{d}", "loss.kind": loss, "model.fusion.depth": d}
          for loss in ("sigmoid", "softmax") for d in (1, 2)]
