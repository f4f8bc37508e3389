"""dbtools: caption, organise and train DreamBooth datasets for Stable Diffusion and its successors.

One package per stage of the journey (see the README's "What is where"): `core` (atomic
writes, errors, environment probes), `dataset` (images, caption rules, the Omnitool,
concepts), `caption` (auto-captioners), `families` (one module per model family),
`train` (config, set-up, data, loop, outputs), `after` (evaluate, preview, export,
generate, cleanup) and `ui` (notebook helpers, training panel, caption editor).

Importing the package has no side effects; every module is imported on use.
`from dbtools import notebook` (the notebook's first cell) is `dbtools.ui.notebook`.
"""

import importlib

__version__ = "0.1.0"

_SHORT_NAMES = {"notebook": "dbtools.ui.notebook"}


def __getattr__(name: str):
    if name in _SHORT_NAMES:
        return importlib.import_module(_SHORT_NAMES[name])
    raise AttributeError(f"module 'dbtools' has no attribute {name!r}")
