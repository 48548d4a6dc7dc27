"""Job launchers: one module per place a training job can run.

  python -m launch.local        one process on this machine
  python -m launch.multiprocess N local processes joined by jax.distributed (CPU, gloo)
  python -m launch.tpu_pod      TPU VM pod slices via gcloud (create / setup / run / ssh / delete)
  python -m launch.gke          JobSet manifest (or XPK command) for a TPU slice on GKE
  python -m launch.slurm        sbatch script for GPU clusters
  python -m launch.sweep        a config's get_sweep() run locally (resumable) or emitted per backend

Every launcher takes `--dry-run` (print exactly what would run, touch nothing) and passes
`--config.key=value` overrides through to `python -m mmr_jax.train`. Shared pieces live in
`launch.common`; nothing here imports jax, so launching stays fast and works off-accelerator.
"""
