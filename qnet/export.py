"""Entry point: `python -m qnet.export --workdir=WORKDIR --out=OUT [--step=N] [--overwrite]`.

Writes a trained run's integer network (`qnet.deploy.export` documents the files)."""

from qnet.deploy.export import cli

if __name__ == "__main__":
  cli()
