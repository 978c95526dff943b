"""LightningCLI entry point: the MNIST-1D classifier and DepthGrowth configured entirely from YAML.

    python examples/cli.py fit --config examples/configs/grow_vit.yaml
    python examples/cli.py fit --config examples/configs/grow_vit.yaml --trainer.max_epochs=1

Any ``DepthGrowth`` argument can be overridden on the command line, e.g.
``--trainer.callbacks.init_args.placement=uniform`` (see ``--help``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

if __package__ in (None, ""):  # run as a script: make ``examples.common`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.common import Classifier, MNIST1DDataModule


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` as on the command line; ``None`` reads ``sys.argv``)."""
    return LightningCLI(Classifier, MNIST1DDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
