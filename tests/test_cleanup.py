"""Safe cleanup of a training output folder (`dbtools.after.cleanup`)."""

from __future__ import annotations

import os

import pytest

from dbtools.after import cleanup as C


def test_cleanup_keeps_chosen_and_unexported_weights(training_output):
    out_dir = training_output
    plan = C.cleanup_plan(out_dir, keep=[out_dir / "1500"], exported=[out_dir / "1000", out_dir / "1500"])
    assert plan.delete == [out_dir.resolve() / "1000"]
    assert plan.kept == {out_dir.resolve() / "500": "not exported yet",
                         out_dir.resolve() / "1500": "chosen to keep"}
    assert plan.checkpoints == [out_dir.resolve() / "checkpoint-1500"] and plan.targets == plan.delete
    text = C.describe(plan)
    assert "- 1000" in text and "500 (not exported yet)" in text and "checkpoint-1500" in text
    # nothing is deleted without the confirm word
    assert C.run_cleanup(plan, "") == [] and C.run_cleanup(plan, "yes") == []
    assert (out_dir / "1000" / "model_index.json").exists()
    assert C.run_cleanup(plan, " DELETE ") == [out_dir.resolve() / "1000"]
    assert sorted(p.name for p in out_dir.iterdir()) == [
        ".tmp-2500-x", "0", "1500", "2000", "500", "checkpoint-1500", "model.safetensors"]


def test_cleanup_handles_trailing_slashes_and_never_touches_the_output_dir(training_output):
    out_dir = training_output
    s = str(out_dir)
    plan = C.cleanup_plan(s + "/", keep=[s + "/1500/"], exported=[s + "/", s + "/500/", s + "/1000//"],
                           delete_unexported=True, delete_checkpoints=True)
    root = out_dir.resolve()
    assert plan.output_dir == root and root not in plan.targets
    assert plan.delete == [root / "500", root / "1000"]
    assert C.run_cleanup(plan, "DELETE") == [root / "500", root / "1000", root / "checkpoint-1500"]
    assert out_dir.is_dir() and (out_dir / "1500" / "model_index.json").exists()
    assert (out_dir / "model.safetensors").read_bytes() == b"exported"
    assert (out_dir / "2000").exists() and (out_dir / ".tmp-2500-x").exists()


def test_cleanup_keeping_the_output_dir_keeps_everything(training_output):
    out_dir = training_output
    plan = C.cleanup_plan(out_dir, keep=[f"{out_dir}/"], delete_unexported=True, delete_checkpoints=True)
    assert plan.delete == [] and plan.targets == [] and len(plan.kept) == 4  # 3 weights, 1 checkpoint


def test_cleanup_never_deletes_outside_or_through_links(training_output, tmp_path, weights_factory):
    out_dir = training_output
    outside = weights_factory(tmp_path, "999")
    os.symlink(outside, out_dir / "3000")
    exported = [outside, out_dir / "3000", out_dir / "500" / "model.safetensors", out_dir / "500"]
    plan = C.cleanup_plan(out_dir, keep=[], exported=exported, delete_unexported=False)
    root = out_dir.resolve()
    assert plan.delete == []
    assert plan.kept[root / "3000"] == "a link (never followed)"
    assert plan.kept[root / "500"] == "contains an exported file"
    # a plan edited by hand still cannot reach outside the output folder
    plan.delete = [outside, root, root / "3000", root / "0" / "logs"]
    assert C.run_cleanup(plan, "DELETE") == []
    assert outside.exists() and (out_dir / "3000").is_symlink() and (out_dir / "0" / "logs").exists()
    with pytest.raises(FileNotFoundError, match="OUTPUT_DIR"):
        C.cleanup_plan(tmp_path / "missing", keep=[], exported=[])


def test_cleanup_keeps_folders_holding_a_single_file_export(training_output):
    out_dir = training_output
    (out_dir / "500" / "model.ckpt").write_bytes(b"exported into the weights folder")
    (out_dir / "1000" / "pytorch_lora_weights.safetensors").write_bytes(b"lora weights, not an export")
    plan = C.cleanup_plan(out_dir, keep=[], exported=[out_dir / "500", out_dir / "1000"])
    root = out_dir.resolve()
    assert plan.delete == [root / "1000"]
    assert plan.kept[root / "500"] == "contains the single file model.ckpt"


def test_cleanup_command_shows_the_plan_and_deletes_only_with_the_word(training_output, capsys):
    out_dir = training_output
    flags = ["--output_dir", f"{out_dir}/", "--keep_steps", "1500", "--exported", "1000", str(out_dir / "1500")]
    assert C.main(flags) == 0
    text = capsys.readouterr().out
    assert "- 1000" in text and "deleted" not in text and "DELETE" not in text
    assert (out_dir / "1000").is_dir()
    assert C.main([*flags, "--confirm", "DELETE"]) == 0
    assert f"deleted {out_dir.resolve() / '1000'}" in capsys.readouterr().out
    assert not (out_dir / "1000").exists() and (out_dir / "1500").is_dir() and (out_dir / "500").is_dir()
    assert C.main(["--output_dir", str(out_dir / "nope")]) == 2


def test_cleanup_lists_only_the_checkpoints_training_would_resume_from(training_output, tmp_path):
    # The same rule as `--resume_from_checkpoint latest`: `checkpoint-<step>` folders,
    # sorted by step; a look-alike name or a link to a folder elsewhere is not ours to delete.
    out_dir = training_output
    (out_dir / "checkpoint-200").mkdir()
    (out_dir / "checkpoint-notes").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out_dir / "checkpoint-3000")
    plan = C.cleanup_plan(out_dir, delete_checkpoints=True)
    root = out_dir.resolve()
    assert plan.checkpoints == [root / "checkpoint-200", root / "checkpoint-1500"]
    assert C.run_cleanup(plan, "DELETE")[-2:] == plan.checkpoints
    assert (out_dir / "checkpoint-notes").is_dir() and (tmp_path / "elsewhere").is_dir()
