"""What a `checkpoint-<step>/` folder holds and how resume reads it (tiny models, CPU)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbtools import checkpoints as C
from dbtools import train as T
from dbtools import train_setup as S
from dbtools.errors import UserError
from dbtools.train_config import TrainConfig
from dbtools.train_setup import TrainError
from tests.test_train import assert_same, config, weights


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_sd):
    """A 4-step run training UNet and text encoder with an EMA; checkpoints at steps 2 and 4."""
    from tests.conftest import make_image

    root = tmp_path_factory.mktemp("ema_run")
    inst = root / "inst"
    for i, size in enumerate([(64, 48), (48, 64), (64, 64)]):
        img = make_image(inst / f"a red car_{i}.png", size=size)
        Path(f"{img}.txt").write_text(f"a photo of sks toy, number {i}", encoding="utf-8")
    kw = {"train_text_encoder": True, "use_ema": True, "checkpointing_steps": 2, "max_train_steps": 4}
    result = T.train(config(tiny_sd, inst, root / "out", **kw))
    return root, inst, kw, result


class _RunsCode:
    """Unpickling this creates the marker file: what a hostile checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_holds_diffusers_folders_and_no_pickles_that_run_code(ema_run):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    root, _, _, result = ema_run
    ckpt = root / "out" / "checkpoint-4"
    names = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    assert not [n for n in names if n.endswith(".pkl")], names
    assert {"args.json", "optimizer.bin", "scheduler.bin", "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "unet_ema/diffusion_pytorch_model.safetensors",
            "unet_ema/ema_state.json"} <= set(names)
    unet = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    CLIPTextModel.from_pretrained(ckpt / "text_encoder")
    # unet/ holds the trained weights; the EMA average is what the weights folder got.
    trained = {k: v for k, v in unet.state_dict().items()}
    saved = weights(result.weights_dir)
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)
    assert_same(load_file(str(ckpt / "unet_ema" / "diffusion_pytorch_model.safetensors")), saved)


def test_resume_with_ema_matches_uninterrupted_run(ema_run, tmp_path, tiny_sd):
    root, inst, kw, full = ema_run
    out = tmp_path / "resumed"
    shutil.copytree(root / "out" / "checkpoint-2", out / "checkpoint-2")
    resumed = T.train(config(tiny_sd, inst, out, resume_from_checkpoint="latest", **kw))
    assert resumed.resumed_from == out / "checkpoint-2" and resumed.global_step == 4
    assert_same(weights(full.weights_dir), weights(resumed.weights_dir))  # EMA weights
    assert_same(weights(full.weights_dir, "text_encoder"), weights(resumed.weights_dir, "text_encoder"))
    assert_same(load_file(str(root / "out" / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors")),
                load_file(str(out / "checkpoint-4" / "unet" / "diffusion_pytorch_model.safetensors")))


def _hostile_copies(ckpt: Path, tmp_path: Path):
    """Copies of `ckpt`, each with one non-safetensors file (or an extra file accelerate would
    read) replaced by a pickle that creates a marker file when unpickled."""
    targets = [p.relative_to(ckpt) for p in ckpt.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    targets += [Path("custom_checkpoint_0.pkl"), Path("random_states_0.pkl")]
    for i, rel in enumerate(targets):
        copy = tmp_path / f"run{i}" / ckpt.name
        shutil.copytree(ckpt, copy)
        marker = tmp_path / f"marker{i}"
        if rel.suffix == ".bin" and i % 2:  # also the torch.save form of the same attack
            torch.save({"state": _RunsCode(marker)}, copy / rel)
        else:
            (copy / rel).write_bytes(pickle.dumps(_RunsCode(marker)))
        yield rel, copy, marker


def test_every_file_of_a_checkpoint_replaced_by_a_hostile_pickle_is_refused_by_name(ema_run, tmp_path, tiny_sd):
    root, inst, kw, _ = ema_run
    seen = []
    for rel, copy, marker in _hostile_copies(root / "out" / "checkpoint-2", tmp_path):
        cfg = config(tiny_sd, inst, copy.parent, resume_from_checkpoint=str(copy), **kw)
        with pytest.raises(UserError) as err:
            T.train(cfg)
        assert not marker.exists(), rel
        assert str(copy / rel) in str(err.value), (rel, str(err.value))
        seen.append(str(rel))
    assert {"optimizer.bin", "scheduler.bin", "args.json", "custom_checkpoint_0.pkl"} <= set(seen)


def test_a_hostile_file_is_refused_at_load_time_too(ema_run, tmp_path):
    from dbtools.checkpoints import CheckpointError, check_checkpoint_files

    root = ema_run[0]
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(root / "out" / "checkpoint-2", copy)
    marker = tmp_path / "marker"
    (copy / "optimizer.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match="optimizer.bin: refused: loading it could run code"):
        check_checkpoint_files(copy)
    assert not marker.exists()
    (copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 100)  # cut short
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: not a valid .safetensors"):
        check_checkpoint_files(copy)


def test_resume_from_a_weights_folder_names_the_checkpoints(ema_run, tmp_path, tiny_sd):
    root, inst, kw, _ = ema_run
    out = root / "out"
    with pytest.raises(TrainError) as err:
        S.preflight(config(tiny_sd, inst, out, resume_from_checkpoint=str(out / "4"), **kw))
    msg = str(err.value)
    assert "is a weights folder" in msg and str(out / "checkpoint-2") in msg and str(out / "checkpoint-4") in msg


def test_loaded_ema_moves_to_the_training_device(tmp_path):
    """accelerate loads state on the CPU; training may run elsewhere (`meta` stands in for cuda)."""
    from diffusers.training_utils import EMAModel

    from dbtools.checkpoints import CheckpointError, load_ema, save_ema

    net = torch.nn.Linear(3, 2)
    ema = EMAModel(net.parameters(), decay=0.9)
    ema.step(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    save_ema(ema, names, tmp_path / "unet_ema")
    fresh = EMAModel(net.parameters(), decay=0.5)
    load_ema(fresh, names, tmp_path / "unet_ema", torch.device("meta"))
    assert all(p.device.type == "meta" for p in fresh.shadow_params)
    assert fresh.optimization_step == 1 and fresh.decay == 0.9
    with pytest.raises(CheckpointError, match="another UNet"):
        load_ema(fresh, ["other"], tmp_path / "unet_ema", "cpu")


def test_pipeline_loads_from_a_checkpoint_folder(ema_run):
    from dbtools.models import load_pipeline

    ckpt = ema_run[0] / "out" / "checkpoint-4"
    pipe = load_pipeline(str(ckpt))
    assert_same(pipe.unet.state_dict(), load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors")))
    te = load_file(str(ckpt / "text_encoder" / "model.safetensors"))
    got = pipe.text_encoder.state_dict()
    assert set(te) <= set(got) and all(torch.equal(got[k], v) for k, v in te.items())
    image = pipe("sks toy", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_lora_checkpoint_holds_the_adapters_and_resumes_exactly(ema_run, tmp_path, tiny_sd):
    from dbtools.models import load_pipeline

    inst = ema_run[1]
    kw = {"use_lora": True, "lora_rank": 2, "train_text_encoder": True, "checkpointing_steps": 1,
          "max_train_steps": 2}
    full = T.train(config(tiny_sd, inst, tmp_path / "full", **kw))
    ckpt = tmp_path / "full" / "checkpoint-1"
    adapters = load_file(str(ckpt / C.LORA_WEIGHTS))
    assert any(k.startswith("unet.") for k in adapters) and any(k.startswith("text_encoder.") for k in adapters)
    assert not list(ckpt.glob("*.pkl"))
    # accelerate's model files hold the trained adapters only, not the frozen base weights
    states = [load_file(str(f)) for f in sorted(ckpt.glob("model*.safetensors"))]
    assert len(states) == 2 and all(s and all("lora_" in k for k in s) for s in states)
    pipe = load_pipeline(str(ckpt))
    assert any("lora" in k for k in pipe.unet.state_dict())

    shutil.copytree(ckpt, tmp_path / "resumed" / ckpt.name)
    resumed = T.train(config(tiny_sd, inst, tmp_path / "resumed", resume_from_checkpoint="latest", **kw))
    assert resumed.resumed_from is not None
    assert_same(load_file(str(full.weights_dir / C.LORA_WEIGHTS)), load_file(str(resumed.weights_dir / C.LORA_WEIGHTS)))


def test_ema_is_kept_on_the_main_process_only(tiny_sd):
    from types import SimpleNamespace

    from dbtools.models import load_sd_components

    models = load_sd_components(str(tiny_sd))
    cfg = TrainConfig(use_ema=True)
    other = SimpleNamespace(is_main_process=False, device=torch.device("cpu"))
    main = SimpleNamespace(is_main_process=True, device=torch.device("cpu"))
    assert S.make_ema(cfg, models, other) is None
    assert S.make_ema(cfg, models, main) is not None


def test_export_accepts_a_checkpoint_folder(ema_run, tmp_path, tiny_sd):
    from dbtools.export import export_single_file
    from tests.test_export import read_back

    ckpt = ema_run[0] / "out" / "checkpoint-4"
    out = export_single_file(ckpt, tmp_path / "model.safetensors")
    pipe = read_back(out, tiny_sd)
    unet = load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors"))
    got = pipe.unet.state_dict()
    assert unet.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in unet.items())
    te = load_file(str(ckpt / "text_encoder" / "model.safetensors"))
    got = pipe.text_encoder.state_dict()
    assert set(te) <= set(got) and all(torch.equal(got[k], v) for k, v in te.items())
