"""The notebook as a person meets it after the first run, through the `nb` functions its
cells call: one short message per mistake in the notebook's words (and no traceback),
training from any working folder, caption edits that reach training, and a session that
follows a retrained output folder."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path

import pytest

from dbtools.core.errors import UserError
from dbtools.ui import notebook as nb


def rendered(exc: BaseException) -> str:
    """What IPython shows for `exc` in a notebook cell: `_render_traceback_`, if it has one."""
    return "\n".join(exc._render_traceback_())


# --------------------------------------------------------------------------- one message per mistake


def test_a_user_error_shows_in_the_notebook_as_its_message_alone():
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shown = []
    shell._showtraceback = lambda etype, evalue, stb: shown.append(stb)
    try:
        shell.run_cell("from dbtools.core.errors import UserError\nraise UserError('tick `resume` in step 7')")
        shell.run_cell("raise RuntimeError('a bug')")
    finally:
        InteractiveShell.clear_instance()
    assert len(shown[0]) == 1 and shown[0][0].endswith("error:\x1b[0m tick `resume` in step 7")
    assert any("Traceback" in line for line in shown[1])  # our bugs keep their traceback


def test_run_command_takes_the_error_line_and_holds_back_the_launchers_traceback(monkeypatch):
    code = textwrap.dedent("""
        import sys
        sys.stdout.write("steps: 10%\\rsteps: 20%\\r"); sys.stdout.flush()
        print("error: Cannot start training. Fix these first:\\n- a.png: no caption file.\\n- b: bad.",
              file=sys.stderr)
        sys.stderr.flush()
        print("Traceback (most recent call last):\\n  File x\\nsubprocess.CalledProcessError: boom")
        sys.exit(1)
    """)
    out, errors = io.StringIO(), []
    with pytest.raises(nb.CommandError):
        nb.run_command([sys.executable, "-c", code], check=True, stream=out, user_errors=errors)
    assert errors == ["Cannot start training. Fix these first:\n- a.png: no caption file.\n- b: bad."]
    assert out.getvalue() == "steps: 10%\rsteps: 20%\r"
    monkeypatch.setenv("DBTOOLS_VERBOSE", "1")  # verbose: everything shown, the message still taken
    out, errors = io.StringIO(), []
    with pytest.raises(nb.CommandError):
        nb.run_command([sys.executable, "-c", code], check=True, stream=out, user_errors=errors)
    assert errors[0].startswith("Cannot start training") and "CalledProcessError: boom" in out.getvalue()
    monkeypatch.delenv("DBTOOLS_VERBOSE")
    # lines that only start like one are shown
    out, errors = io.StringIO(), []
    nb.run_command([sys.executable, "-c", "print('errors: 0'); print('err'); print('error:x')"], stream=out,
                   user_errors=errors)
    assert out.getvalue() == "errors: 0\nerr\nerror:x\n" and errors == []


def test_notebook_words_name_the_field_and_the_step():
    message = ("Cannot start training. Fix these first:\n- --output_dir /o already holds another run's weights "
               "or checkpoints; a new run there would mix with them. Either continue that run with "
               "--resume_from_checkpoint latest, or choose a new --output_dir, or add --overwrite_output_dir to "
               "move the old run's folders aside into o-previous-<time> next to it (nothing is deleted).\n"
               "- /d/a.png: no caption file (looked for a.png.txt). Write one (python -m dbtools extract) or "
               "remove the image.")
    words = nb.notebook_words(message)
    assert "--" not in words and "python -m" not in words
    assert "continue that run by ticking `resume` in step 7 (Train)" in words
    assert "choose a new OUTPUT_DIR in step 3 (Settings)" in words
    assert "tick `overwrite_output_dir` in step 7 to move" in words
    assert "Run step 6 (Omnitool) again to write it" in words


@pytest.fixture
def captioned(tmp_path, image_factory) -> Path:
    folder = tmp_path / "captioned"
    for i, caption in enumerate(["a red car", "a blue house"]):
        image_factory(folder / f"{caption}_{i}.png")
    return folder


def test_training_from_another_folder_stops_with_one_message_in_the_notebooks_words(
        tmp_path, tiny_sd, captioned, weights_factory, monkeypatch, capsys):
    """A second Run All: the output folder holds a run. Training is found from any working
    folder; the refusal is one message in the notebook's words, shown once, no traceback."""
    out = tmp_path / "out"
    weights_factory(out, "2")
    nb.omnitool_step("", captioned, False, out / "concepts_list.json", method="Method 1: captions only")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    nb.enable_logging()  # as the setup cell does: messages in the cell
    capsys.readouterr()
    with pytest.raises(UserError) as info:
        nb.launch_training(str(tiny_sd), out, out / "concepts_list.json", max_train_steps=1, resolution=64,
                           pretrained_vae_name_or_path="", mixed_precision="no", use_8bit_adam=False,
                           with_prior_preservation=False, gpu_gib=None)
    shown = capsys.readouterr().out
    message = str(info.value)
    assert f" {nb.PROJECT_DIR / 'train_dreambooth.py'} " in shown.splitlines()[0]  # the project's script
    assert "already holds another run" in message and "ticking `resume` in step 7" in message
    assert "--resume_from_checkpoint" not in message and "Traceback" not in message
    assert "already holds another run" not in shown and "Traceback" not in shown and "error:" not in shown
    assert rendered(info.value).count("already holds another run") == 1


def test_a_bug_in_training_keeps_its_output(tmp_path, monkeypatch, capsys):
    script = tmp_path / "train_dreambooth.py"
    script.write_text("raise RuntimeError('a bug')\n")
    from dbtools.ui import commands

    monkeypatch.setattr(commands, "train_script", lambda: [str(script)])
    monkeypatch.setattr(commands, "check_train_flags", lambda args: None)
    with pytest.raises(nb.CommandError, match="RuntimeError: a bug"):
        nb.launch_training("m", tmp_path / "o", tmp_path / "c.json", resolution=64, gpu_gib=None)
    assert "RuntimeError: a bug" in capsys.readouterr().out


def test_cells_before_their_inputs_name_the_missing_step(tmp_path, training_output):
    from dbtools.after.generate import parse_auth
    with pytest.raises(UserError, match=r"instance_data_dir in step 6.*step 4 \(Auto-caption\)") as info:
        nb.omnitool_step("", None, False, tmp_path / "c.json", method="Method 1: captions only")
    assert "None" not in str(info.value)
    session = nb.Session(model="m", output_dir=training_output)
    with pytest.raises(UserError, match="Saved steps: 500, 1000, 1500") as info:
        nb.pick_weights(session, "7")
    assert len(info.value._render_traceback_()) == 1
    with pytest.raises(UserError, match="step 8"):
        nb.generate_step(session, "a castle")
    # the generate, Gradio and review cells' settings mistakes are user errors too
    with pytest.raises(UserError, match="width=13: use a multiple of 8"):
        nb.check_generation_args(1, 30, 7.5, None, 13)
    with pytest.raises(UserError, match="user:password"):
        parse_auth("nocolon")
    with pytest.raises(UserError, match="unknown caption format"):
        nb.review_step(session, str(tmp_path), "sidecars", 24)


# --------------------------------------------------------------------------- caption edits reach training


def test_caption_edits_after_the_omnitool_reach_training(tmp_path, captioned):
    """Omnitool (Method 2), then a fix in the editor (filename format) and Save: training
    reads the new caption in the template; no caption file is left behind."""
    from dbtools.dataset.concepts import read_concepts
    from dbtools.train.data import scan_concepts

    concepts_list = tmp_path / "concepts_list.json"
    common = dict(method="Method 2: captions with instance and class prompts", instance_prompt="sks style",
                  class_prompt="a painting", class_data_dir=str(tmp_path / "class"))
    nb.omnitool_step("", captioned, False, concepts_list, **common)
    session = nb.Session(model="m", output_dir=tmp_path, captioned_dir=captioned)
    editor = nb.review_step(session, "", "filename", 24)
    red = next(p for p in editor.images if p.name.startswith("a red car"))
    (captioned / "gone_7.png.txt").write_text("an image deleted by hand")
    editor.set_caption(red, "a red sports car")
    [renamed] = editor.save()
    assert renamed.name == "a red sports car_0.png"
    assert not (captioned / (red.name + ".txt")).exists()
    assert (captioned / (renamed.name + ".txt")).read_text(encoding="utf-8") == \
        "sks style, a red sports car, a painting\n"
    assert any("a red sports car_0.png.txt" in note and "was a red car_0.png.txt" in note for note in editor.notes)

    plan, problems = scan_concepts(read_concepts(concepts_list), read_prompts_from_txts=True)
    assert problems == []
    assert sorted(e.prompt for e in plan.instance) == [
        "sks style, a blue house, a painting", "sks style, a red sports car, a painting"]
    # the Omnitool run again finds everything in step: nothing replaced, nothing kept aside
    summary = nb.omnitool_step("", captioned, False, concepts_list, **common)
    assert summary.counts["unchanged"] == 2 and not summary.kept and summary.ok


def test_a_hand_edited_caption_file_moves_with_its_image_unchanged(tmp_path, captioned, capsys):
    nb.enable_logging()
    (captioned / "a red car_0.png.txt").write_text("my own words", encoding="utf-8")
    orphan = captioned / "deleted_9.png.txt"
    orphan.write_text("x")
    editor = nb.CaptionEditor(captioned, "filename")
    reported = capsys.readouterr().out
    assert "1 caption file(s)" in reported and "deleted_9.png.txt" in reported
    editor.set_caption(captioned / "a red car_0.png", "a red sports car")
    editor.save()
    assert (captioned / "a red sports car_0.png.txt").read_text(encoding="utf-8") == "my own words"
    assert any("check it" in note for note in editor.notes)
    assert orphan.is_file()  # reported, never deleted


def test_replace_caption_only_replaces_the_whole_caption_once():
    from dbtools.ui.editor import replace_caption

    assert replace_caption("sks, a car, a painting", "a car", "a bus") == "sks, a bus, a painting"
    assert replace_caption("a car", "a car", "a bus") == "a bus"
    assert replace_caption("sks, a car park, a painting", "a car", "a bus") is None
    assert replace_caption("a car, a car", "a car", "a bus") is None
    assert replace_caption("x", "", "a bus") is None


# --------------------------------------------------------------------------- the session follows the run


def retrain(out: Path, weights_factory, steps: tuple[str, ...]) -> None:
    """What `overwrite_output_dir` does: the old run's folders go aside, a new run writes its own."""
    from dbtools.train.folders import move_previous_run

    assert move_previous_run(out) is not None
    for step in steps:
        weights_factory(out, step)


def test_after_a_retrain_the_next_cell_uses_the_new_run_or_asks_to_pick_again(tmp_path, weights_factory, capsys):
    nb.enable_logging()
    out = tmp_path / "out"
    for step in ("2", "4"):
        weights_factory(out, step)
    session = nb.Session(model="m", output_dir=out)
    nb.pick_weights(session, "")
    assert session.weights() == out / "4"
    retrain(out, weights_factory, ("2", "4"))  # the same step names, new files
    assert session.weights() == out / "4"
    assert "holds a new training run since step 8: using its weights in" in capsys.readouterr().out
    retrain(out, weights_factory, ("3",))
    assert session.weights() == out / "3"
    nb.pick_weights(session, "3")  # a typed step: the user is asked, never silently switched
    retrain(out, weights_factory, ("3", "6"))
    with pytest.raises(UserError, match=r"new training run\. Run step 8 \(Pick the weights\) again"):
        session.weights()


def test_the_gradio_ui_refuses_the_old_model_after_a_retrain(tmp_path, weights_factory, monkeypatch):
    import gradio as gr

    out = tmp_path / "out"
    weights_factory(out, "4")
    session = nb.Session(model="m", output_dir=out)
    nb.pick_weights(session, "")
    built = {}
    monkeypatch.setattr(nb, "build_gradio_app", lambda weights, **kw: built.update(kw, weights=weights) or
                        type("App", (), {"close": lambda self: None})())
    monkeypatch.setattr(nb, "launch_gradio", lambda app, auth="": (app, "url", None))
    monkeypatch.setattr(nb, "generate_images", lambda *a, **kw: [])
    nb.generate_step(session, "a castle", num_images=2, steps=12, width=0, seed=5)
    nb.gradio_step(session)
    assert built["defaults"]["prompt"] == "a castle" and built["defaults"]["steps"] == 12
    built["check"]()  # the same run: fine
    from dbtools.after.generate import _gradio_action

    run = _gradio_action(None, tmp_path / "gradio", built["check"])
    retrain(out, weights_factory, ("4",))
    with pytest.raises(UserError, match=r"run step 12 \(Gradio UI\) again"):
        built["check"]()
    with pytest.raises(gr.Error, match="new training run"):
        run("a castle", "", 1, 7.5, 2, 0, 0, 1, "model default")
    assert not (tmp_path / "gradio").exists()


def test_gradio_takes_a_zero_size_as_the_models_own(tmp_path, tiny_sd):
    from dbtools.after.generate import _gradio_action, load_inference_pipeline, read_png_settings

    run = _gradio_action(load_inference_pipeline(str(tiny_sd)), tmp_path / "g")
    gallery, saved = run("a castle", "", 1, 7.5, 1, 0, 0, 3, "model default")
    settings = read_png_settings(Path(saved.strip()))
    assert settings["width"] == settings["height"] > 0 and json.dumps(settings)
