"""What a `checkpoint-<step>/` folder holds and how resume reads it (tiny models, CPU)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dbtools.core.errors import UserError
from dbtools.train import checkpoints as C
from dbtools.train import loop as T
from dbtools.train import setup as S
from dbtools.train.config import TrainConfig
from dbtools.train.setup import TrainError
from tests.conftest import RunsCode
from tests.conftest import train_config as config
from tests.test_train import assert_same, weights


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_sd):
    """A 4-step run training UNet and text encoder with an EMA; checkpoints at steps 2 and 4."""
    from tests.conftest import make_captioned

    root = tmp_path_factory.mktemp("ema_run")
    inst = make_captioned(root / "inst", sizes=[(64, 48), (48, 64), (64, 64)], name="a red car_{i}.png")
    kw = {"train_text_encoder": True, "use_ema": True, "checkpointing_steps": 2, "max_train_steps": 4}
    result = T.train(config(tiny_sd, inst, root / "out", **kw))
    return root, inst, kw, result


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
            torch.save({"state": RunsCode(marker)}, copy / rel)
        else:
            (copy / rel).write_bytes(pickle.dumps(RunsCode(marker)))
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
    from dbtools.train.checkpoints import CheckpointError, check_checkpoint_files

    root = ema_run[0]
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(root / "out" / "checkpoint-2", copy)
    marker = tmp_path / "marker"
    (copy / "optimizer.bin").write_bytes(pickle.dumps(RunsCode(marker)))
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

    from dbtools.train.checkpoints import CheckpointError, load_ema, save_ema

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
    from dbtools.families.models import load_pipeline

    ckpt = ema_run[0] / "out" / "checkpoint-4"
    pipe = load_pipeline(str(ckpt))
    assert_same(pipe.unet.state_dict(), load_file(str(ckpt / "unet" / "diffusion_pytorch_model.safetensors")))
    te = load_file(str(ckpt / "text_encoder" / "model.safetensors"))
    got = pipe.text_encoder.state_dict()
    assert set(te) <= set(got) and all(torch.equal(got[k], v) for k, v in te.items())
    image = pipe("sks toy", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_lora_checkpoint_holds_the_adapters_and_resumes_exactly(ema_run, tmp_path, tiny_sd):
    from dbtools.families.models import load_pipeline

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

    from dbtools.families.models import load_sd_components

    models = load_sd_components(str(tiny_sd))
    cfg = TrainConfig(use_ema=True)
    other = SimpleNamespace(is_main_process=False, device=torch.device("cpu"))
    main = SimpleNamespace(is_main_process=True, device=torch.device("cpu"))
    assert S.make_ema(cfg, models, other) is None
    assert S.make_ema(cfg, models, main) is not None


def test_export_accepts_a_checkpoint_folder(ema_run, tmp_path, tiny_sd):
    from dbtools.after.export import export_single_file
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


# --------------------------------------------------------------------------- the pickle checker

# Callables a hostile pickle imports to run code; none is among what accelerate's state needs.
PAYLOADS = [("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"), ("builtins", "__import__"),
            ("builtins", "open"), ("builtins", "setattr"), ("os", "system"), ("posix", "system"),
            ("subprocess", "Popen"), ("pickle", "loads"), ("shutil", "rmtree"), ("importlib", "import_module"),
            ("runpy", "run_path"), ("functools", "partial"), ("operator", "attrgetter"), ("torch", "load"),
            ("numpy", "load"), ("torch.nn.modules.module", "Module")]


def _calling(module: str, name: str, protocol: int) -> bytes:
    """Pickle bytes that call `module.name("true")` when unpickled; protocol 2 names it with
    GLOBAL, protocol 4 with STACK_GLOBAL (what `pickle.dumps` writes today)."""
    call = b"X\x04\x00\x00\x00true\x85R."  # the string "true", a 1-tuple, REDUCE, STOP
    if protocol == 2:
        return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + call
    m, n = module.encode(), name.encode()
    return b"\x80\x04\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93" + call


def _torch_file_with(path: Path, pickled: bytes) -> None:
    """A file in torch.save's zip layout whose `data.pkl` is `pickled`."""
    import zipfile

    torch.save({"state": torch.zeros(2)}, path)
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info.filename)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w") as dst:
        for info, data in entries:
            dst.writestr(info, pickled if info.filename.endswith("/data.pkl") else data)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Record (and stop) any attempt to unpickle while the checker runs."""
    import torch.serialization

    attempts = []

    def refuse(*a, **k):
        attempts.append(a)
        raise AssertionError("the checker unpickled a file")

    class Refusing(pickle.Unpickler):
        def load(self):
            refuse(self)

    for owner, name in [(pickle, "load"), (pickle, "loads"), (torch, "load"), (torch.serialization, "load")]:
        monkeypatch.setattr(owner, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refusing)
    return attempts


@pytest.mark.parametrize("form", ["torch.save zip", "bare pickle"])
@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize(("module", "name"), PAYLOADS)
def test_the_checker_refuses_every_classic_payload_without_unpickling(tmp_path, module, name, protocol, form,
                                                                       no_unpickling):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    pickled = _calling(module, name, protocol)
    if form == "bare pickle":
        (ckpt / "optimizer.bin").write_bytes(pickled)
    else:
        _torch_file_with(ckpt / "optimizer.bin", pickled)
    torch.save({"state": {}, "param_groups": []}, ckpt / "scheduler.bin")  # as accelerate writes it: accepted
    with pytest.raises(C.CheckpointError) as err:
        C.check_checkpoint_files(ckpt)  # at load time
    problems = C.resume_problems(tmp_path, str(ckpt))  # in the pre-flight
    assert no_unpickling == []
    text = str(err.value)
    assert f"{ckpt / 'optimizer.bin'}: refused: loading it could run code" in text and "scheduler.bin" not in text
    assert len(problems) == 1 and problems[0].startswith(f"{ckpt / 'optimizer.bin'}: refused")
    if form == "torch.save zip" and protocol == 2:
        assert f"imports {module}.{name}" in text


def test_the_checker_accepts_the_state_accelerate_writes(tmp_path, no_unpickling):
    """The other side of the list: optimizer, schedule and scaler state as torch writes them pass."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.save(opt.state_dict(), tmp_path / "optimizer.bin")
    torch.save({k: v for k, v in sched.state_dict().items() if k != "lr_lambdas"}, tmp_path / "scheduler.bin")
    torch.save(torch.amp.GradScaler("cpu").state_dict(), tmp_path / "scaler.pt")
    assert C.unsafe_checkpoint_files(tmp_path, damaged=True) == [] and no_unpickling == []
