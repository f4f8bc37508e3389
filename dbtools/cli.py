"""`python -m dbtools <command> [flags]`: one entry point for every stage.

Each command lives in its own module, which exposes `main(argv) -> int`; modules are
imported only when their command runs, so `--help` stays fast. A command's `main` lets a
`UserError` rise: `reports_user_errors` (the one place for every command and
`train_dreambooth.py`) prints it on stderr, and the exit code is 2.
"""

from __future__ import annotations

import importlib
import logging
import sys

from dbtools.core.env import quiet_third_party
from dbtools.core.errors import reports_user_errors

COMMANDS: dict[str, tuple[str, str]] = {
    "caption": ("dbtools.caption.autocaption", "auto-caption images (BLIP, Florence-2, WD14 tagger, instruction VLM)"),
    "extract": ("dbtools.dataset.extract", "Omnitool: file names -> caption files, concepts_list.json"),
    "classgen": ("dbtools.train.classgen", "generate class images for prior preservation"),
    "train": ("dbtools.train.loop", "train DreamBooth (same flags as train_dreambooth.py)"),
    "export": ("dbtools.after.export", "diffusers folder -> single .safetensors/.ckpt"),
    "preview": ("dbtools.after.preview", "grid of sample images across saved steps"),
    "evaluate": ("dbtools.after.evaluate", "score saved steps (likeness, prompt fidelity), suggest the best"),
    "generate": ("dbtools.after.generate", "generate images with trained weights (PNGs keep their settings)"),
    "cleanup": ("dbtools.after.cleanup", "show which old weights can go; delete with --confirm DELETE"),
    "tiny": ("dbtools.tiny", "write tiny offline models (tests, demo)"),
    "demo": ("dbtools.demo", "run the whole journey offline on tiny models"),
}


def usage() -> str:
    lines = ["usage: python -m dbtools <command> [flags]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `python -m dbtools <command> --help` for a command's flags; --verbose shows every",
              "third-party warning (known-harmless ones are hidden by default)."]
    return "\n".join(lines)


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2

    verbose = "--verbose" in rest
    if verbose and name != "train":  # training has its own --verbose flag
        rest.remove("--verbose")
    quiet_third_party(verbose)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = importlib.import_module(COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except SystemExit as exc:  # argparse has printed the usage problem (or --help) already
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
