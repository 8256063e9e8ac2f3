"""Entry point: `python -m qnet.evaluate --export=OUT [--config.data_dir=DIR] [--json=PATH]`.

Evaluates every path of an export against fake quant (`qnet.deploy.evaluate`)."""

from qnet.deploy.evaluate import cli

if __name__ == "__main__":
  cli()
