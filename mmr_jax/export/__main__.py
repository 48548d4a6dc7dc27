"""`python -m mmr_jax.export`: see cli.py."""

from mmr_jax.export import cli

if __name__ == "__main__":
  cli.main()
