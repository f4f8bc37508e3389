"""DreamBooth training for Stable Diffusion with per-image prompts.

Accepts the flags of Shivam Shrirao's `train_dreambooth.py` and of diffusers' current
one. Run it directly, with `accelerate launch train_dreambooth.py ...`, or as
`python -m dbtools train ...`; all three share `dbtools.train.loop`'s parser.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dbtools.core.errors import reports_user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the training flags (`sys.argv[1:]` when `argv` is None)."""
    from dbtools.train.config import parse_args as _parse

    return _parse(argv)


@reports_user_errors
def main(args: argparse.Namespace) -> int:
    """Train with `args`; returns the exit code (2 for a problem the user can fix)."""
    from dbtools.core.env import quiet_third_party

    quiet_third_party(getattr(args, "verbose", False))
    from dbtools.train.loop import TrainConfig, run_training

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_training(TrainConfig.from_args(args))


if __name__ == "__main__":
    sys.exit(main(parse_args()))
