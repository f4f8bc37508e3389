"""The sample grid across saved steps (`dbtools.after.preview`, `python -m dbtools preview`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dbtools.after import preview
from dbtools.after.preview import PAD, NoSamplesError, run_preview, sample_grid
from dbtools.train.checkpoints import list_weights

COLORS = {
    500: [(255, 0, 0), (0, 255, 0), (0, 0, 255)],
    1000: [(255, 255, 0), (0, 255, 255)],
}


def make_weights(root: Path, name: str, colors=(), complete=True) -> Path:
    folder = root / name
    (folder / "unet").mkdir(parents=True)
    if complete:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for i, color in enumerate(colors):
        (folder / "samples").mkdir(exist_ok=True)
        Image.new("RGB", (40, 40), color).save(folder / "samples" / f"{i}.png")
    return folder


@pytest.fixture
def out_dir(tmp_path) -> Path:
    root = tmp_path / "out"
    for step, colors in COLORS.items():
        make_weights(root, str(step), colors)
    make_weights(root, ".tmp-1500-abc", [(9, 9, 9)])  # a save still being written
    make_weights(root, "2000", [(9, 9, 9)], complete=False)  # half-written, no model_index.json
    make_weights(root, "checkpoint-500", [(9, 9, 9)])  # accelerate state, not weights
    (root / "0" / "logs").mkdir(parents=True)  # TensorBoard logs live under 0/
    return root


def cell_center(grid: Image.Image, row: int, col: int, cols: int, thumb: int) -> tuple:
    left = grid.width - (cols - col) * (thumb + PAD)
    top = PAD + row * (thumb + PAD)
    return grid.getpixel((left + thumb // 2, top + thumb // 2))


def test_list_weights_lists_complete_numeric_folders_only(out_dir):
    assert list_weights(out_dir) == [(500, out_dir / "500"), (1000, out_dir / "1000")]
    assert list_weights(str(out_dir) + "/") == list_weights(out_dir)
    assert list_weights(out_dir / "missing") == []


def test_lora_weights_folders_count(tmp_path):
    folder = tmp_path / "out" / "300"
    (folder / "samples").mkdir(parents=True)
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"lora")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "samples" / "0.png")
    assert list_weights(tmp_path / "out") == [(300, folder)]
    grid = sample_grid(tmp_path / "out", thumb=16)
    assert cell_center(grid, 0, 0, 1, 16) == (1, 2, 3)


def test_grid_has_a_row_per_step_and_a_column_per_sample(out_dir):
    thumb = 32
    grid = sample_grid(out_dir, thumb=thumb)
    assert grid.height == PAD + 2 * (thumb + PAD)  # steps 500 and 1000 only
    label_width = grid.width - 2 * PAD - 3 * (thumb + PAD)
    assert label_width > 0
    for row, step in enumerate((500, 1000)):
        for col, color in enumerate(COLORS[step]):
            assert cell_center(grid, row, col, 3, thumb) == color
    assert cell_center(grid, 1, 2, 3, thumb) == preview.BACKGROUND  # step 1000 has 2 samples
    # nothing from the .tmp-, incomplete or checkpoint folders (colour 9,9,9) made it in
    assert (9, 9, 9) not in {c for _, c in grid.getcolors(grid.width * grid.height)}


def test_rows_are_labelled_with_their_step(out_dir):
    thumb = 48
    grid = np.asarray(sample_grid(out_dir, thumb=thumb))
    label_width = grid.shape[1] - 2 * PAD - 3 * (thumb + PAD)
    labels = [grid[PAD + r * (thumb + PAD): PAD + r * (thumb + PAD) + thumb, PAD: PAD + label_width]
              for r in range(2)]
    for label in labels:
        assert (label != np.array(preview.BACKGROUND, np.uint8)).any(axis=-1).sum() > 10
    assert not np.array_equal(labels[0], labels[1])  # "500" and "1000" are drawn differently


def test_rows_say_step_and_the_prompt_heads_the_grid(out_dir):
    thumb = 48
    plain = sample_grid(out_dir, thumb=thumb)
    (out_dir / "1000" / "args.json").write_text(json.dumps({"save_sample_prompt": "sks style, a castle"}))
    titled = sample_grid(out_dir, thumb=thumb)
    header = preview.header_height("sks style, a castle", thumb)
    assert header >= 16 and titled.height == plain.height + header
    band = np.asarray(titled)[:header]
    assert (band != np.array(preview.BACKGROUND, np.uint8)).any(axis=-1).sum() > 50  # the prompt is drawn
    assert np.array_equal(np.asarray(titled)[header:], np.asarray(plain))  # rows below, unchanged
    font = preview.label_font(thumb)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = plain.width - 2 * PAD - 3 * (thumb + PAD)
    assert preview.row_label(1000) == "step 1000"
    assert label_width == probe.textbbox((0, 0), "step 1000", font=font)[2]


def test_steps_and_max_samples_select_rows_and_columns(out_dir):
    thumb = 32
    grid = sample_grid(out_dir, steps=[1000], max_samples=1, thumb=thumb)
    assert grid.height == PAD + thumb + PAD
    assert cell_center(grid, 0, 0, 1, thumb) == COLORS[1000][0]
    with pytest.raises(NoSamplesError, match="1500"):
        sample_grid(out_dir, steps=[1500])  # only a .tmp- folder has it


def test_clear_error_when_there_are_no_samples(tmp_path):
    make_weights(tmp_path / "out", "500")  # weights, but no samples/
    with pytest.raises(NoSamplesError, match="save_sample_prompt") as info:
        sample_grid(tmp_path / "out")
    assert str(tmp_path / "out") in str(info.value)


def test_run_preview_saves_atomically_to_the_default_path(out_dir):
    path = run_preview(out_dir)
    assert path == out_dir / "preview.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.height == PAD + 2 * (256 + PAD)
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".tmp-") and p.is_file()]


def test_cli_writes_the_grid_and_reports_errors(out_dir, tmp_path, capsys):
    from dbtools.cli import main

    out = tmp_path / "grid.png"
    assert main(["preview", "--output_dir", str(out_dir), "--out", str(out),
                 "--steps", "500", "1000", "--thumb", "20"]) == 0
    with Image.open(out) as img:
        assert img.height == PAD + 2 * (20 + PAD)
    assert str(out) in capsys.readouterr().out
    assert main(["preview", "--output_dir", str(tmp_path / "nothing")]) == 2
    assert "no sample images" in capsys.readouterr().err


def test_thumb_is_bounded_before_any_memory_is_taken(out_dir, capsys):
    from dbtools.cli import main

    assert main(["preview", "--output_dir", str(out_dir), "--thumb", "100000"]) == 2
    err = capsys.readouterr().err
    assert "--thumb 100000" in err and "2048" in err and "Traceback" not in err
    assert not (out_dir / "preview.png").exists()


def test_out_never_overwrites_a_sample_image(out_dir, capsys):
    from dbtools.cli import main

    sample = out_dir / "500" / "samples" / "0.png"
    before = sample.read_bytes()
    assert main(["preview", "--output_dir", str(out_dir), "--out", str(sample)]) == 2
    assert "samples folder" in capsys.readouterr().err
    assert sample.read_bytes() == before
    with pytest.raises(preview.UserError):  # a new name there would become a sample too
        run_preview(out_dir, out_dir / "1000" / "samples" / "grid.png")


def write_scores(root: Path, best) -> None:
    lines = [{"step": 500, "likeness": 0.5, "prompt_fidelity": 0.31},
             {"step": 1000, "likeness": 0.8123, "prompt_fidelity": 0.3049, "validation_loss": 0.12341},
             {"step": 500, "validation_loss": 0.2}]  # a later line for the same step adds to it
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (root / "metrics-summary.json").write_text(json.dumps({"best_step": best, "rule": "r", "per_step": []}))


def red_rows(grid: Image.Image) -> np.ndarray:
    """The y coordinates holding the suggested step's frame colour."""
    pixels = np.asarray(grid)
    return np.nonzero((pixels == np.array(preview.BEST_COLOR, np.uint8)).all(axis=-1).any(axis=1))[0]


def test_rows_show_their_scores_and_the_suggested_step_is_framed(out_dir):
    write_scores(out_dir, best=1000)
    assert preview.step_scores(out_dir)[1] == 1000
    records = preview.step_scores(out_dir)[0]
    assert preview.row_lines(500, records[500], 1000) == ["step 500", "likeness 0.500", "fidelity 0.310",
                                                          "val. loss 0.2"]
    assert preview.row_lines(1000, records[1000], 1000) == ["step 1000", "likeness 0.812", "fidelity 0.305",
                                                            "val. loss 0.1234", preview.BEST_LABEL]
    assert preview.row_lines(1500, None, 1000) == ["step 1500"]
    thumb = 48
    grid = sample_grid(out_dir, thumb=thumb)
    heights = [preview.row_height(preview.row_lines(s, records[s], 1000), thumb) for s in (500, 1000)]
    assert heights[0] > thumb and grid.height == PAD + sum(h + PAD for h in heights)  # rows grow to fit
    # samples stay centred in their (taller) rows, in the same columns
    for row, step in enumerate((500, 1000)):
        top = PAD + sum(h + PAD for h in heights[:row]) + (heights[row] - thumb) // 2
        for col, color in enumerate(COLORS[step]):
            left = grid.width - (3 - col) * (thumb + PAD)
            assert grid.getpixel((left + thumb // 2, top + thumb // 2)) == color
    red = red_rows(grid)
    second_row = PAD + heights[0]  # the padding between row 500 and row 1000 starts here
    assert red.size and red.min() >= second_row and red.max() < grid.height  # only step 1000 is marked
    # the labels are wider than the plain grid's "step 1000"
    plain_width = sample_grid(out_dir, thumb=thumb, steps=[500]).width
    (out_dir / "metrics.jsonl").unlink()
    (out_dir / "metrics-summary.json").unlink()
    assert sample_grid(out_dir, thumb=thumb, steps=[500]).width < plain_width


def test_no_suggested_step_means_no_frame_and_a_broken_summary_keeps_the_grid(out_dir, caplog):
    write_scores(out_dir, best=None)
    assert red_rows(sample_grid(out_dir, thumb=32)).size == 0
    (out_dir / "metrics-summary.json").write_text("{not json")
    grid = sample_grid(out_dir, thumb=32)
    assert red_rows(grid).size == 0 and "no suggested step" in caplog.text
