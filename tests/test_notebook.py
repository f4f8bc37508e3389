"""The notebook `KaliYuga_DreamBooth.ipynb`: its form cells are well formed, and the whole
notebook runs headless on CPU with tiny models, producing every output of the journey."""

from __future__ import annotations

import ast
import json
import re
import socket
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "KaliYuga_DreamBooth.ipynb"
PARAM_LINE = re.compile(r"^(?P<name>[A-Za-z_]\w*)\s*=\s*(?P<value>.*?)\s*#@param\b(?P<spec>.*)$")


def read_notebook():
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cells(nb) -> list:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def python_source(source: str) -> str:
    """The cell without IPython `!`/`%` lines (they are not Python)."""
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("!", "%")))


def form_fields(nb) -> dict[str, tuple[int, int, str]]:
    """`name -> (cell index, line index, value text)` for every `#@param` line."""
    fields = {}
    for c, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for i, line in enumerate(cell.source.splitlines()):
            m = PARAM_LINE.match(line)
            if m:
                assert m["name"] not in fields, f"form field {m['name']} is defined twice"
                fields[m["name"]] = (c, i, m["value"])
    return fields


def set_form_values(nb, values: dict) -> None:
    """Change form fields the way Colab's form does: rewrite the value on the `#@param` line."""
    fields = form_fields(nb)
    unknown = sorted(set(values) - set(fields))
    assert not unknown, f"not form fields of the notebook: {unknown}"
    for name, value in values.items():
        c, i, _ = fields[name]
        lines = nb.cells[c].source.splitlines()
        m = PARAM_LINE.match(lines[i])
        lines[i] = f"{name} = {value!r}  #@param{m['spec']}"
        nb.cells[c].source = "\n".join(lines)


def cell_titled(nb, prefix: str) -> int:
    hits = [i for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and cell.source.startswith(f"#@title {prefix}")]
    assert len(hits) == 1, f"expected one cell titled {prefix!r}"
    return hits[0]


def stream_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.output_type == "stream")


# --------------------------------------------------------------------------- static checks


def test_notebook_is_valid_and_every_code_cell_parses():
    nb = read_notebook()
    nbformat.validate(nb)
    for cell in code_cells(nb):
        ast.parse(python_source(cell.source))  # raises SyntaxError naming the line


PARSING_CALLS = {"strip", "split", "int", "float", "replace", "partition", "globals", "locals"}


def test_every_cell_is_form_fields_plus_one_call():
    """After the `#@param` lines and imports, at most two statements (the setup cell: four),
    no `globals()` and no parsing of form values inline: the logic lives in dbtools."""
    for index, cell in enumerate(code_cells(read_notebook())):
        title = cell.source.splitlines()[0]
        body = [n for n in ast.parse(python_source(cell.source)).body
                if not isinstance(n, (ast.Import, ast.ImportFrom))]
        params = {name for name, (_, _, _) in form_fields_of(cell).items()}
        statements = [n for n in body if not (isinstance(n, ast.Assign) and len(n.targets) == 1
                                              and isinstance(n.targets[0], ast.Name) and n.targets[0].id in params)]
        assert len(statements) <= (4 if index == 0 else 2), f"{title}: {len(statements)} statements"
        calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                 for n in statements for node in ast.walk(n) if isinstance(node, ast.Call)}
        assert not calls & PARSING_CALLS or index == 0, f"{title}: inline {sorted(calls & PARSING_CALLS)}"


def form_fields_of(cell) -> dict:
    return {m["name"]: (0, 0, m["value"]) for line in cell.source.splitlines() if (m := PARAM_LINE.match(line))}


def test_every_code_cell_is_a_titled_form_without_definitions():
    for cell in code_cells(read_notebook()):
        title = cell.source.splitlines()[0]
        assert title.startswith("#@title "), f"code cell without a #@title: {title!r}"
        assert cell.metadata.get("cellView") == "form", title
        tree = ast.parse(python_source(cell.source))
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defs, f"{title}: define functions and classes in dbtools, not in the notebook"


def test_every_form_field_is_a_literal_and_is_used():
    nb = read_notebook()
    fields = form_fields(nb)
    assert len(fields) > 40
    loaded = set()
    for cell in code_cells(nb):
        for node in ast.walk(ast.parse(python_source(cell.source))):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                loaded.add(node.id)
    for _, _, value in fields.values():
        ast.literal_eval(value)  # Colab forms need a plain literal
    unused = sorted(set(fields) - loaded)
    assert not unused, f"form fields never used: {unused}"


def test_no_token_field_and_real_defaults():
    """The defaults are the real ones a Colab user starts from: the maintained SD 1.5 repo
    and the original notebook's training flags; no form field takes a token."""
    from dbtools import notebook

    fields = {name: ast.literal_eval(value) for name, (_, _, value) in form_fields(read_notebook()).items()}
    assert not [name for name in fields if "token" in name.lower()]
    assert fields["MODEL_NAME"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert fields["save_to_gdrive"] is True
    expected = dict(pretrained_vae_name_or_path="stabilityai/sd-vae-ft-mse", revision="fp16",
                    with_prior_preservation=True, prior_loss_weight=1.0, seed=1337, resolution=512,
                    train_batch_size=1, train_text_encoder=True, mixed_precision="fp16", use_8bit_adam=True,
                    gradient_accumulation_steps=1, learning_rate=1e-6, lr_scheduler="constant", lr_warmup_steps=0,
                    num_class_images=200, sample_batch_size=4, save_interval=500)
    # What the training cell passes for an SD 1.x model: its "auto" fields become exactly the
    # original notebook's flags.
    from dbtools.families import SD1, Detected

    chosen = notebook.training_flags(fields["MODEL_NAME"], family=Detected(SD1),
                                     memory_profile=fields["memory_profile"],
                                     pretrained_vae_name_or_path=fields["vae_name"],
                                     **{k: fields[k] for k in expected if k in fields})
    assert {k: chosen.flags[k] for k in expected} == expected
    assert chosen.flags["gradient_checkpointing"] is True and not chosen.flags.get("use_lora")
    assert fields["confirm"] == "" and fields["extra_flags"] == ""
    assert fields["save_sample_prompt"]


def test_sdxl_with_the_form_defaults_trains_a_lora_at_the_lora_learning_rate():
    """An SDXL model with the training cells' own defaults: the LoRA profile at LoRA's rate
    (at the full fine-tune's 1e-6 the adapters, which start at zero, barely move), and fewer
    class images made in smaller batches; a rate typed in the form still wins."""
    from dbtools import notebook
    from dbtools.families import SDXL, Detected

    fields = {name: ast.literal_eval(value) for name, (_, _, value) in form_fields(read_notebook()).items()}
    cell = dict(memory_profile=fields["memory_profile"], pretrained_vae_name_or_path=fields["vae_name"],
                **{k: fields[k] for k in ("resolution", "train_text_encoder", "with_prior_preservation",
                                          "num_class_images", "save_interval", "learning_rate", "max_train_steps")})
    argv = notebook.training_command("m", "out", "c.json", family=Detected(SDXL), **cell)  # what the cell runs
    assert "--use_lora" in argv and "--learning_rate=0.0001" in argv
    flags = notebook.training_flags("m", family=Detected(SDXL), **cell).flags
    assert flags["use_lora"] is True and flags["learning_rate"] == 1e-4
    assert flags["resolution"] == 1024 and flags["mixed_precision"] == "fp16"
    assert flags["num_class_images"] <= 50 and flags["sample_batch_size"] <= 2
    typed = notebook.training_flags("m", family=Detected(SDXL), **{**cell, "learning_rate": "3e-5"}).flags
    assert typed["learning_rate"] == "3e-5"
    assert notebook.training_flags("m", family=Detected(SDXL), gpu_gib=80.0, **cell).flags["learning_rate"] == 1e-6


def test_the_training_cell_with_its_sdxl_defaults_trains_a_lora_that_moves(tiny_sdxl, tmp_path, image_factory):
    """The command the training cell runs for an SDXL model with the form's own defaults (only
    the VAE, sizes and counts changed for a CPU) trains LoRA adapters that move: at LoRA's
    rate each Adam step moves `lora_B` by about 1e-4, at the old 1e-6 by about 1e-6."""
    from safetensors.torch import load_file

    from dbtools import notebook
    from dbtools import train as T
    from dbtools.families import SDXL, Detected

    fields = {name: ast.literal_eval(value) for name, (_, _, value) in form_fields(read_notebook()).items()}
    inst = tmp_path / "inst"
    for i in range(2):
        image_factory(inst / f"toy_{i}.png", size=(64, 64), color=(200, 60 * i, 0))
        (inst / f"toy_{i}.png.txt").write_text(f"a photo of sks toy {i}", encoding="utf-8")
        image_factory(tmp_path / "class" / f"{i}-class.jpg", size=(64, 64), color=(0, 60 * i, 200))  # a user's own
    concepts = tmp_path / "concepts_list.json"
    concepts.write_text(json.dumps([{"instance_prompt": "sks toy", "class_prompt": "a toy",
                                     "instance_data_dir": str(inst), "class_data_dir": str(tmp_path / "class")}]))
    cell = dict(pretrained_vae_name_or_path="", resolution=64, num_class_images=2, max_train_steps=2, save_interval=2,
                extra_flags="--save_infer_steps=1 --n_save_sample=1",
                **{k: fields[k] for k in ("memory_profile", "learning_rate", "train_text_encoder",
                                          "with_prior_preservation")})
    argv = notebook.training_command(str(tiny_sdxl), tmp_path / "out", concepts, family=Detected(SDXL), **cell)
    assert T.main(argv[argv.index("train_dreambooth.py") + 1:]) == 0
    step = tmp_path / "out" / "2"
    assert json.loads((step / "args.json").read_text())["learning_rate"] == 1e-4
    lora_b = [v for k, v in load_file(str(step / "pytorch_lora_weights.safetensors")).items() if "lora_B" in k
              or "lora.up" in k]
    assert lora_b and min(float(v.abs().max()) for v in lora_b) > 5e-5


# --------------------------------------------------------------------------- headless run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_kernel(root: Path, monkeypatch) -> str:
    """A kernelspec running this interpreter (the venv's), found through JUPYTER_PATH."""
    spec = root / "kernels" / "dbtools-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dbtools test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(root))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(root / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(root / "ipython"))
    return "dbtools-test"


@pytest.fixture
def tiny_blip(tmp_path_factory) -> Path:
    from dbtools.tiny import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("tiny") / "blip")


def test_notebook_runs_headless_end_to_end(tmp_path, tiny_sd, tiny_blip, monkeypatch):
    """The whole journey on CPU with tiny models, every cell as a user runs it, only the
    form fields changed; then each step's output is checked on disk."""
    from gradio_client import Client
    from nbclient import NotebookClient
    from PIL import Image

    from dbtools.demo import make_dataset
    from dbtools.notebook import read_png_settings

    raw, captioned, klass, out = tmp_path / "raw", tmp_path / "captioned", tmp_path / "class", tmp_path / "out"
    make_dataset(raw, seed=0)
    port = free_port()
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test_not_a_real_token", "HF_HOME": str(tmp_path / "hf"),
                        "DBTOOLS_SKIP_INSTALL": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                        "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    kernel = venv_kernel(tmp_path / "jupyter", monkeypatch)

    nb = read_notebook()
    set_form_values(nb, dict(
        OUTPUT_DIR=str(out), MODEL_NAME=str(tiny_sd),
        images_folder=str(raw), captioned_folder=str(captioned), caption_model=str(tiny_blip),
        num_beams=2, min_length=3, max_length=8, caption_batch_size=4,
        method="Method 2: captions with instance and class prompts", instance_prompt="sks style",
        class_prompt="a painting", class_data_dir=str(klass),
        vae_name="", max_train_steps=4, learning_rate=1e-4, resolution=64, num_class_images=2,
        save_interval=2, resume=True,
        extra_flags="--sample_batch_size=2 --n_save_sample 2 --save_infer_steps=2 --checkpointing_steps=2",
        save_sample_prompt="sks style, a castle",
        thumbnail_size=64,
        prompt="sks style, a red car", num_images=2, inference_steps=2, width=64, height=64, inference_seed=5,
        scheduler="euler",
        delete_unexported=True, confirm="DELETE",
    ))
    # What a user does in the caption editor: fix one caption and press Save.
    review = cell_titled(nb, "5.")
    nb.cells.insert(review + 1, nbformat.v4.new_code_cell(
        'editor.set_caption(editor.images[0], "a hand fixed caption")\nedited = editor.save()\nprint(edited)'))
    gradio_cell = cell_titled(nb, "12.")

    client = NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(REPO)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError with the traceback
            if index == gradio_cell:
                ui = Client(f"http://127.0.0.1:{port}/", verbose=False)
                gallery, saved = ui.predict("sks style, a castle", "", 1, 7.5, 2, 64, 64, 3, "model default",
                                            api_name="/generate")
    text = {i: stream_text(cell) for i, cell in enumerate(nb.cells)}

    # 1-3: the Colab-only steps said they were skipped; the login used $HF_TOKEN, and the token never shows
    assert "Not installing anything" in text[cell_titled(nb, "1.")]
    assert "No CUDA GPU found" in text[cell_titled(nb, "1.")] or "GPU 0" in text[cell_titled(nb, "1.")]
    assert "from $HF_TOKEN" in text[cell_titled(nb, "2.")]
    assert "Google Drive is not mounted" in text[cell_titled(nb, "3.")]
    assert not any("hf_test_not_a_real_token" in t for t in text.values())
    assert not any("hf_test_not_a_real_token" in p.read_text(errors="ignore")
                   for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".txt", ".log", ".yaml"))

    # 4-6: captioned copies (originals untouched), the hand fix, caption files, concepts_list.json
    assert sorted(p.name for p in raw.iterdir()) == sorted(p.name for p in make_dataset(raw, seed=0))
    images = sorted(p for p in captioned.iterdir() if p.suffix.lower() in (".jpg", ".png", ".webp"))
    assert len(images) == 6 and all(re.fullmatch(r".+_\d+", p.stem) for p in images)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
               for o in nb.cells[review].outputs)  # the caption editor was shown
    assert [p.name for p in images if p.name.startswith("a hand fixed caption_")]
    captions = {p.name: (p.parent / (p.name + ".txt")).read_text(encoding="utf-8").strip() for p in images}
    assert all(c.startswith("sks style, ") and c.endswith(", a painting") for c in captions.values())
    assert "sks style, a hand fixed caption, a painting" in captions.values()
    concepts = json.loads((out / "concepts_list.json").read_text())
    assert [(c["instance_data_dir"], c["instance_prompt"], c["class_prompt"], c["class_data_dir"]) for c in concepts] \
        == [(str(captioned), "sks style", "a painting", str(klass))]

    # 7: accelerate launched the trainer with the original notebook's flags; fp16 and 8-bit fell back on CPU
    train_text = text[cell_titled(nb, "7.")]
    command = train_text.splitlines()[0]
    assert "-m accelerate.commands.launch " in command and " train_dreambooth.py " in command
    assert "had defaults used instead" not in train_text  # accelerate's noise is kept out
    for flag in ("--pretrained_model_name_or_path=", "--revision=fp16", "--with_prior_preservation",
                 "--prior_loss_weight=1.0", "--seed=1337", "--resolution=64", "--train_batch_size=1",
                 "--train_text_encoder", "--mixed_precision=fp16", "--use_8bit_adam", "--read_prompts_from_txts",
                 "--gradient_accumulation_steps=1", "--learning_rate=0.0001", "--lr_scheduler=constant",
                 "--lr_warmup_steps=0", "--num_class_images=2", "--sample_batch_size=2", "--max_train_steps=4",
                 "--save_interval=2", "--save_sample_prompt=", f"--concepts_list={out / 'concepts_list.json'}",
                 "--resume_from_checkpoint=latest", "--checkpointing_steps=2"):
        assert flag in command, flag
    assert "--pretrained_vae_name_or_path" not in command  # an empty field leaves the flag out
    if "No CUDA GPU found" in text[cell_titled(nb, "1.")]:
        assert "fp16 mixed precision needs a CUDA GPU" in train_text
    assert len(list(klass.glob("*.jpg"))) == 2
    assert (out / "4" / "model_index.json").is_file() and list(out.glob("checkpoint-*"))

    # 8-9: the latest weights were picked; the grid has one row per saved step
    assert f"Using the weights in {out / '4'}" in text[cell_titled(nb, "8.")]
    with Image.open(out / "preview.png") as grid:  # steps 2 and 4, before the cleanup removed step 2
        assert grid.format == "PNG" and grid.height > 2 * 64
    assert sum("image/png" in o.get("data", {}) for o in nb.cells[cell_titled(nb, "9.")].outputs) == 1

    # 10: the single file, in fp16, readable by diffusers
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    export = out / "out-4.safetensors"
    with safe_open(str(export), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    assert {d for d in dtypes if d.startswith(("F", "BF"))} == {"F16"}
    back = StableDiffusionPipeline.from_single_file(str(export), config=str(out / "4")).unet.state_dict()
    step_4 = StableDiffusionPipeline.from_pretrained(out / "4").unet.state_dict()
    assert back.keys() == step_4.keys()  # the weights of step 4, rounded to half precision
    assert all(torch.equal(back[k].float(), step_4[k].half().float()) for k in back)

    # 11: images shown and saved with their settings
    generated = sorted((out / "generated").glob("*.png"))
    assert [read_png_settings(p)["seed"] for p in generated] == [5, 6]
    assert {read_png_settings(p)["scheduler"] for p in generated} == {"euler"}
    assert read_png_settings(generated[0])["prompt"] == "sks style, a red car"
    assert sum("image/png" in o.get("data", {}) for o in nb.cells[cell_titled(nb, "11.")].outputs) == 2

    # 12: the Gradio UI answered on localhost and saved its image
    assert len(gallery) == 1 and gallery[0]["caption"] == "seed 3"
    assert Path(saved.strip()).parent == out / "gradio" and read_png_settings(Path(saved.strip()))["seed"] == 3

    # 13: the plan was shown; the old step went, the chosen weights and everything else stayed
    assert "Will delete 1 folder(s)" in text[cell_titled(nb, "13.")]
    assert not (out / "2").exists() and (out / "4" / "model_index.json").is_file()
    assert export.is_file() and (out / "preview.png").is_file() and list(out.glob("checkpoint-*"))


def test_notebook_runs_headless_with_its_own_defaults(tmp_path, tiny_sd, tiny_blip, monkeypatch):
    """A new user's Run All: the notebook's own defaults (Method 1, no prompts, prior
    preservation, Drive on, the default memory profile, no extra flags), offline and with
    no token; only model names, paths, sizes and step/image counts are changed for CPU."""
    from gradio_client import Client
    from nbclient import NotebookClient

    from dbtools.demo import make_dataset
    from dbtools.notebook import read_png_settings

    raw, captioned, klass, out = tmp_path / "raw", tmp_path / "captioned", tmp_path / "class", tmp_path / "out"
    make_dataset(raw, seed=0)
    port = free_port()
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for name, value in {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "DBTOOLS_SKIP_INSTALL": "1",
                        "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_SERVER_NAME": "127.0.0.1",
                        "GRADIO_SERVER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    kernel = venv_kernel(tmp_path / "jupyter", monkeypatch)

    nb = read_notebook()
    defaults = {name: ast.literal_eval(value) for name, (_, _, value) in form_fields(nb).items()}
    changed = dict(
        # model names and paths
        MODEL_NAME=str(tiny_sd), caption_model=str(tiny_blip), vae_name="", OUTPUT_DIR=str(out),
        images_folder=str(raw), captioned_folder=str(captioned), class_data_dir=str(klass),
        # sizes and counts
        num_beams=2, min_length=3, max_length=8, caption_batch_size=4, resolution=64, max_train_steps=4,
        num_class_images=2, save_interval=2, thumbnail_size=64, num_images=2, inference_steps=2, width=64,
        height=64,
    )
    assert defaults["method"].startswith("Method 1") and defaults["class_prompt"] == ""
    assert defaults["instance_prompt"] == "" and defaults["extra_flags"] == "" and defaults["confirm"] == ""
    set_form_values(nb, changed)

    client = NotebookClient(nb, kernel_name=kernel, timeout=900, resources={"metadata": {"path": str(REPO)}})
    gradio_cell = cell_titled(nb, "12.")
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError with the traceback
            if index == gradio_cell:
                ui = Client(f"http://127.0.0.1:{port}/", verbose=False)
                gallery, _ = ui.predict("a castle", "", 1, 7.5, 2, 64, 64, 3, "model default", api_name="/generate")
    text = {i: stream_text(cell) for i, cell in enumerate(nb.cells)}

    login = text[cell_titled(nb, "2.")]
    assert "hf auth login" in login and "need no login" in login
    # Method 1: no prompts; class images generated from the empty class prompt, with a warning
    assert len(list(klass.glob("*.jpg"))) == 2
    train_text = text[cell_titled(nb, "7.")]
    assert "class prompt is empty" in train_text
    # one resume checkpoint kept; weights in Shivam's layout
    assert (out / "4" / "model_index.json").is_file() and [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
    assert f"Using the weights in {out / '4'}" in text[cell_titled(nb, "8.")]
    assert (out / "preview.png").is_file() and (out / "out-4.safetensors").is_file()
    generated = sorted((out / "generated").glob("*.png"))
    assert len(generated) == 2 and read_png_settings(generated[0])["prompt"] == defaults["prompt"]
    assert len(gallery) == 1
    # the cleanup cell only shows its plan without the confirm word
    cleanup = text[cell_titled(nb, "13.")]
    assert "Nothing to delete" in cleanup and "2 (not exported yet)" in cleanup
    assert "deleted" not in cleanup.lower() and (out / "2").is_dir()
