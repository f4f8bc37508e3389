"""One error path: a mistake a user can fix is one `error: ...` message and exit code 2 from
every command and from `train_dreambooth.py`, shown the same way in the notebook; a bug in
dbtools keeps its traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dbtools import cli
from dbtools.core.errors import FolderNotFound, UserError
from dbtools.dataset.captions import caption_format
from dbtools.dataset.images import list_images

ROOT = Path(__file__).resolve().parents[1]


def typical_mistakes(tmp: Path) -> dict[str, list[str]]:
    """For every command, a typical mistake: a folder or model that is not there, a file given as a folder."""
    missing, a_file = str(tmp / "missing"), tmp / "a-file.txt"
    a_file.write_text("x")
    return {
        "caption": ["--img_dir", missing],
        "extract": ["--instance_data_dir", missing],
        "classgen": ["--pretrained_model_name_or_path", missing, "--class_data_dir", str(tmp / "class"),
                     "--class_prompt", "a dog"],
        "train": ["--pretrained_model_name_or_path", missing, "--instance_data_dir", missing],
        "export": ["--model_path", missing, "--checkpoint_path", str(tmp / "model.safetensors")],
        "preview": ["--output_dir", missing],
        "evaluate": ["--output_dir", missing],
        "generate": ["--model", missing, "--prompt", "a dog"],
        "cleanup": ["--output_dir", missing],
        "tiny": ["--out", str(a_file)],
        "demo": ["--out", str(a_file)],
    }


def assert_one_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == err.splitlines()[:1], err


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_reports_a_user_mistake_as_one_error_line_and_exit_2(command, tmp_path, capsys):
    argv = typical_mistakes(tmp_path)[command]
    assert_one_error(cli.main([command, *argv]), capsys.readouterr().err)


def test_train_dreambooth_reports_a_user_mistake_as_one_error_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    import train_dreambooth

    argv = typical_mistakes(tmp_path)["train"]
    assert_one_error(train_dreambooth.main(train_dreambooth.parse_args(argv)), capsys.readouterr().err)


def test_a_bug_keeps_its_traceback_in_every_entry(tmp_path, monkeypatch):
    """A `ValueError` or `FileNotFoundError` from our own code is a bug, not a user's mistake."""
    from dbtools.after import cleanup
    from dbtools.families import models
    from dbtools.train import loop

    monkeypatch.syspath_prepend(str(ROOT))
    import train_dreambooth

    def bug(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(models, "check_model_path", bug)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["generate", "--model", str(tmp_path), "--prompt", "a dog"])
    monkeypatch.setattr(cleanup, "cleanup_plan", lambda *a, **k: open(tmp_path / "gone" / "state.json"))
    with pytest.raises(FileNotFoundError):
        cleanup.main(["--output_dir", str(tmp_path)])
    monkeypatch.setattr(loop, "train", bug)
    with pytest.raises(ValueError, match="a bug"):
        train_dreambooth.main(train_dreambooth.parse_args(typical_mistakes(tmp_path)["train"]))


def test_the_notebook_shows_the_command_lines_message_without_a_traceback(tmp_path, capsys):
    """The same mistake in the cleanup command and in the notebook's cleanup cell: IPython shows
    `_render_traceback_` in place of the traceback (tests/test_notebook_session.py)."""
    from dbtools.ui import notebook as nb

    missing = tmp_path / "missing"
    assert cli.main(["cleanup", "--output_dir", str(missing)]) == 2
    printed = capsys.readouterr().err
    with pytest.raises(UserError) as info:
        nb.cleanup_step(nb.Session(model="m", output_dir=missing))
    (shown,) = info.value._render_traceback_()
    assert re.sub(r"\x1b\[[0-9;]*m", "", shown) + "\n" == printed == f"error: {missing}: not a folder. Check " \
                                                                       "OUTPUT_DIR (is Google Drive mounted?).\n"


def test_user_problems_raised_as_plain_errors_are_user_errors(tmp_path):
    with pytest.raises(FolderNotFound) as info:
        list_images(tmp_path / "missing")
    assert isinstance(info.value, FileNotFoundError)  # callers that catch FileNotFoundError still do
    with pytest.raises(UserError, match="unknown caption format 'sidekar'"):
        caption_format("sidekar")


def test_error_printing_has_one_home():
    """No entry point prints `error: ...` or picks exit code 2 for a user error by itself."""
    sources = [ROOT / "train_dreambooth.py", *ROOT.glob("dbtools/**/*.py")]
    printers = [p.relative_to(ROOT).as_posix() for p in sources
                if re.search(r"print\(f?[\"']error: |except \(?[\w, ]*UserError[\w, ]*\)? as \w+:\s+return 2",
                             p.read_text(encoding="utf-8"))]
    assert printers == [], printers
