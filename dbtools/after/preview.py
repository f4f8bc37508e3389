"""Sample grids: the images training saved at each step, side by side.

Training writes `<output_dir>/<step>/samples/<i>.png` into every weights folder. The
grid has one row per saved step (labelled with the step number) and one column per
sample, so a glance shows where the model started to learn and where it overfits. When
the steps were scored (`<output_dir>/metrics.jsonl`, see `dbtools.after.evaluate`), each row's
label also gives its scores, and the suggested best step (`metrics-summary.json`) is
framed in red. `python -m dbtools preview --output_dir D` writes it to `D/preview.png`.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from dbtools.after.evaluate import suggested_step
from dbtools.core.atomic import atomic_save_image
from dbtools.core.errors import UserError
from dbtools.dataset import images
from dbtools.dataset.images import ImageError, default_font, sample_files
from dbtools.train.checkpoints import list_weights
from dbtools.train.metrics import read_metrics

logger = logging.getLogger(__name__)

PAD = 4
"""Pixels between cells and around the grid."""
BACKGROUND = (24, 24, 24)
TEXT_COLOR = (235, 235, 235)
BEST_COLOR = (210, 30, 30)
"""The frame around the suggested best step's row (the colour of its line in `metrics.png`)."""


MIN_THUMB, MAX_THUMB = 16, 2048
"""Cell sizes `--thumb` accepts, in pixels."""
MAX_GRID_PIXELS = 120_000_000
"""The largest grid drawn (about 360 MB of RGB); larger requests are refused before drawing."""


class NoSamplesError(UserError):
    """No sample images were found; the message says where they were expected."""


def select_rows(
    available: list[tuple[int, Path]], steps: Iterable[int] | None
) -> list[tuple[int, Path]]:
    """Pick the requested steps (all when `steps` is None); unknown steps are an error."""
    if steps is None:
        return list(available)
    by_step = dict(available)
    wanted = [int(s) for s in steps]
    missing = [s for s in wanted if s not in by_step]
    if missing:
        have = ", ".join(str(s) for s in by_step) or "none"
        raise NoSamplesError(f"no complete weights folder for step(s) {missing}; saved steps: {have}.")
    return [(s, by_step[s]) for s in wanted]


def grid_size(rows: int, cols: int, thumb: int, label_width: int) -> tuple[int, int]:
    """Pixel size of a grid: a label column, then `cols` square cells of `thumb`."""
    width = PAD + label_width + PAD + cols * (thumb + PAD)
    height = PAD + rows * (thumb + PAD)
    return width, height


def sample_grid(
    output_dir: str | os.PathLike,
    steps: Iterable[int] | None = None,
    max_samples: int | None = None,
    thumb: int = 256,
) -> Image.Image:
    """A grid of sample images: one row per saved step, one column per sample.

    Each row is labelled "step N" and the sample prompt (from `args.json`) heads the grid;
    each sample is scaled to fit a `thumb`-pixel square. A scored step's label also lists
    its scores, and the suggested best step's row is framed in `BEST_COLOR` (see
    `step_scores`); without scores the grid is the plain one. Steps without samples are
    skipped (with a log message). Raises `NoSamplesError` naming `output_dir` when there
    is nothing to show.
    """
    if not MIN_THUMB <= thumb <= MAX_THUMB:
        raise UserError(f"--thumb {thumb}: use a cell size from {MIN_THUMB} to {MAX_THUMB} pixels.")
    rows = []
    for step, folder in select_rows(list_weights(output_dir), steps):
        files = sample_files(folder)[:max_samples]
        if files:
            rows.append((step, files))
        else:
            logger.info("step %d has no sample images in %s", step, folder / "samples")
    if not rows:
        raise NoSamplesError(
            f"{output_dir}: no sample images found (expected <step>/samples/*.png in complete "
            "weights folders). Train with --save_sample_prompt (and --n_save_sample) so each "
            "save writes samples, or check the output folder path."
        )
    _check_grid_size(rows, thumb)
    records, best = step_scores(output_dir)
    labels = {step: row_lines(step, records.get(step), best) for step, _ in rows}
    return _draw_grid(rows, thumb, sample_prompt(rows[-1][1][0].parent.parent), labels, best)


def _check_grid_size(rows: list[tuple[int, list[Path]]], thumb: int) -> None:
    # Bounded before allocating: a huge grid would fail with MemoryError, or take the machine.
    cols = max(len(files) for _, files in rows)
    width, height = grid_size(len(rows), cols, thumb, thumb)
    if width * height > MAX_GRID_PIXELS:
        raise UserError(f"a {len(rows)}x{cols} grid of {thumb}-pixel cells would be {width}x{height} "
                        f"pixels (over {MAX_GRID_PIXELS:,}). Use a smaller --thumb, or fewer "
                        "--steps or --max_samples.")


def row_label(step: int) -> str:
    """The label of a grid row."""
    return f"step {step}"


SCORE_LABELS = (("likeness", "likeness"), ("prompt_fidelity", "fidelity"), ("class_drift", "drift"),
                ("validation_loss", "val. loss"))
"""Metrics shown under a row's step, in this order, with their short names."""
BEST_LABEL = "* suggested"


def step_scores(output_dir: str | os.PathLike) -> tuple[dict[int, dict], int | None]:
    """The scores of each step (`metrics.jsonl`) and the suggested best step
    (`metrics-summary.json`), as `evaluate` wrote them; `({}, None)` when there are none.
    An unreadable summary only loses the mark (with a warning), never the grid."""
    return {int(r["step"]): r for r in read_metrics(output_dir)}, suggested_step(output_dir)


def row_lines(step: int, record: dict | None = None, best: int | None = None) -> list[str]:
    """The lines of a row's label: "step N", then each score the step has ("likeness 0.812",
    "fidelity 0.305", "drift 0.402", "val. loss 0.1234"), then `BEST_LABEL` on the suggested step."""
    lines = [row_label(step)]
    for key, name in SCORE_LABELS:
        value = (record or {}).get(key)
        if isinstance(value, (int, float)):
            lines.append(f"{name} {value:.4g}" if key == "validation_loss" else f"{name} {value:.3f}")
    if best is not None and step == best:
        lines.append(BEST_LABEL)
    return lines


def sample_prompt(weights_dir: str | os.PathLike) -> str | None:
    """The prompt training drew a weights folder's samples with (`args.json`), if recorded."""
    import json

    try:
        args = json.loads((Path(weights_dir) / "args.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    prompt = args.get("save_sample_prompt") if isinstance(args, dict) else None
    return prompt if isinstance(prompt, str) and prompt.strip() else None


def label_font(thumb: int) -> ImageFont.ImageFont:
    """Large enough to read when the grid is shown at its own size (at least 16 px)."""
    return default_font(max(16, thumb // 8))


def header_height(title: str | None, thumb: int) -> int:
    """Height of the band above the rows that holds the prompt (0 without one)."""
    return label_font(thumb).size + 2 * PAD if title else 0


def row_height(lines: list[str], thumb: int) -> int:
    """A row is one cell high, taller only when its label's lines need it."""
    if len(lines) <= 1:
        return thumb
    return max(thumb, len(lines) * (label_font(thumb).size + PAD))


def _draw_grid(rows: list[tuple[int, list[Path]]], thumb: int, title: str | None = None,
               labels: dict[int, list[str]] | None = None, best: int | None = None) -> Image.Image:
    labels = labels or {step: [row_label(step)] for step, _ in rows}
    font = label_font(thumb)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(probe.textbbox((0, 0), line, font=font)[2] for step, _ in rows for line in labels[step])
    cols = max(len(files) for _, files in rows)
    heights = [row_height(labels[step], thumb) for step, _ in rows]
    width, _ = grid_size(len(rows), cols, thumb, label_width)
    header = header_height(title, thumb)
    grid = Image.new("RGB", (width, header + PAD + sum(h + PAD for h in heights)), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((PAD, PAD), _fit(draw, f"prompt: {title}", font, width - 2 * PAD), fill=TEXT_COLOR, font=font)
    top = header + PAD
    for (step, files), height in zip(rows, heights):
        _draw_label(draw, labels[step], font, top, height)
        _paste_cells(grid, files, thumb, 2 * PAD + label_width, top + (height - thumb) // 2)
        if step == best:
            # In the padding around the row, so no sample pixel is covered.
            draw.rectangle((1, top - PAD + 1, width - 2, top + height + PAD - 2), outline=BEST_COLOR, width=2)
        top += height + PAD
    return grid


def _draw_label(draw: ImageDraw.ImageDraw, lines: list[str], font, top: int, height: int) -> None:
    """The label's lines, centred vertically on the row."""
    line_height = font.size + PAD
    first = top + height // 2 - (len(lines) - 1) * line_height // 2
    for i, line in enumerate(lines):
        color = BEST_COLOR if line == BEST_LABEL else TEXT_COLOR
        draw.text((PAD, first + i * line_height), line, fill=color, font=font, anchor="lm")


def _paste_cells(grid: Image.Image, files: list[Path], thumb: int, left: int, top: int) -> None:
    for c, path in enumerate(files):
        try:
            cell = ImageOps.contain(images.load_rgb(path), (thumb, thumb))
        except ImageError as exc:
            logger.warning("skipping unreadable sample: %s", exc)
            continue
        x = left + c * (thumb + PAD)
        grid.paste(cell, (x + (thumb - cell.width) // 2, top + (thumb - cell.height) // 2))


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened with an ellipsis to fit in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def run_preview(
    output_dir: str | os.PathLike,
    out_png: str | os.PathLike | None = None,
    steps: Iterable[int] | None = None,
    max_samples: int | None = None,
    thumb: int = 256,
) -> Path:
    """Build the sample grid and save it atomically; return the PNG's path.

    The default destination is `<output_dir>/preview.png`; an `out_png` inside a weights
    folder's `samples/` is refused, so the grid never replaces a sample image.
    """
    out = Path(out_png) if out_png else Path(output_dir) / "preview.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"{out}: the preview is a PNG; give a file name ending in .png (--out).")
    _refuse_sample_folder(out, output_dir)
    grid = sample_grid(output_dir, steps=steps, max_samples=max_samples, thumb=thumb)

    atomic_save_image(grid, out)
    logger.info("preview grid (%dx%d) saved to %s", grid.width, grid.height, out)
    return out


def _refuse_sample_folder(out: Path, output_dir: str | os.PathLike) -> None:
    sample_dirs = {(folder / "samples").resolve() for _, folder in list_weights(output_dir)}
    if out.resolve().parent in sample_dirs:
        raise UserError(f"--out {out}: that is inside a samples folder, where the grid would replace "
                        "or join the sample images. Write it elsewhere (default <output_dir>/preview.png).")


def main(argv: list[str] | None = None) -> int:
    """`python -m dbtools preview --output_dir D`: write a grid of samples across steps."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m dbtools preview", description=main.__doc__)
    parser.add_argument("--output_dir", required=True, help="the training output folder")
    parser.add_argument("--out", default=None, help="PNG to write (default: <output_dir>/preview.png)")
    parser.add_argument("--steps", type=int, nargs="+", default=None, help="only these steps")
    parser.add_argument("--max_samples", type=int, default=None, help="at most this many columns")
    parser.add_argument("--thumb", type=int, default=256, help="cell size in pixels (default 256)")
    args = parser.parse_args(argv)
    out = run_preview(args.output_dir, args.out, args.steps, args.max_samples, args.thumb)
    print(f"preview: {out}")
    return 0
