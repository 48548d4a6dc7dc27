"""What the trainer optimises and how: the compiled step (`trainer.py`), the stage objectives
(`objectives.OBJECTIVES`), the contrastive losses (dense, row-chunked and sharded over the mesh), the
optimizer, pretrained-weight files (`big_vision_npz.py`) and step profiling. The loop and the command are
`mmr_jax/train.py`.
"""
