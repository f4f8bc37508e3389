"""`<output_dir>/metrics.jsonl`: one JSON line per scored step, appended by training (validation
loss) and by `python -m dbtools evaluate` (scores), read by the watch, the panel, previews and
the evaluation summary.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dbtools.core.atomic import atomic_write_text

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def append_metrics(output_dir: str | os.PathLike, record: dict) -> Path:
    """Add one JSON line (`step` and the scores present) to `<output_dir>/metrics.jsonl`.

    The file is rewritten atomically with the new line at the end, so a reader never
    sees half a line, even after a crash.
    """
    if "step" not in record:
        raise ValueError("a metrics record needs a 'step'")
    path = Path(output_dir) / METRICS_FILE
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    line = json.dumps({k: v for k, v in record.items() if v is not None}, ensure_ascii=False)
    return atomic_write_text(path, old + line + "\n")


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The per-step records of `<output_dir>/metrics.jsonl`, sorted by step.

    Lines for the same step are merged, later values winning (training may log the
    validation loss and `evaluate` the scores of one step). Unreadable lines are skipped
    with a warning.
    """
    path = Path(output_dir) / METRICS_FILE
    merged: dict[int, dict] = {}
    if not path.is_file():
        return []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            logger.warning("%s line %d: not a metrics record; skipped", path, number)
            continue
        merged.setdefault(step, {}).update(record, step=step)
    return [merged[s] for s in sorted(merged)]
