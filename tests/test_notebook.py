"""The notebook `KaliYuga_DreamBooth.ipynb`: its form cells are well formed, and the whole
notebook runs headless on CPU with tiny models, producing every output of the journey."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
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


def parse_cell(source: str) -> ast.Module:
    """The cell as IPython reads it: `await` is allowed at the top level."""
    return compile(source, "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


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


def copy_of(cell, **values):
    """A copy of a form cell with some of its fields changed (run again after Run All)."""
    cell = nbformat.from_dict(json.loads(json.dumps(cell)))
    lines = cell.source.splitlines()
    for i, line in enumerate(lines):
        m = PARAM_LINE.match(line)
        if m and m["name"] in values:
            lines[i] = f"{m['name']} = {values.pop(m['name'])!r}  #@param{m['spec']}"
    assert not values, f"not fields of this cell: {values}"
    cell.source, cell.outputs = "\n".join(lines), []
    return cell


def run_after(client, nb, cell) -> None:
    """Run `cell` in the kernel after the notebook's own cells (it is not kept in `nb`)."""
    nb.cells.append(cell)
    try:
        client.execute_cell(cell, len(nb.cells) - 1)
    finally:
        nb.cells.pop()


def cell_titled(nb, prefix: str) -> int:
    hits = [i for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and cell.source.startswith(f"#@title {prefix}")]
    assert len(hits) == 1, f"expected one cell titled {prefix!r}"
    return hits[0]


def stream_text(cell, widgets: dict | None = None) -> str:
    """The cell's text output, with the text of the Output widgets it shows (the training log)."""
    text = "".join(out.get("text", "") for out in cell.get("outputs", []) if out.output_type == "stream")
    views = [o["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] for o in cell.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    return text + "".join(widget_text(widgets or {}, v) for v in views)


def widget_text(widgets: dict, model_id: str) -> str:
    """The stream text inside the widget `model_id` and its children (nbclient keeps it in the
    notebook's widget state)."""
    state = widgets.get(model_id, {}).get("state", {})
    text = "".join(o.get("text", "") for o in state.get("outputs", []) if o.get("output_type") == "stream")
    children = [c.removeprefix("IPY_MODEL_") for c in state.get("children", []) if isinstance(c, str)]
    return text + "".join(widget_text(widgets, c) for c in children)


def widget_states(nb) -> dict:
    return nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})


# --------------------------------------------------------------------------- static checks


def test_notebook_is_valid_and_every_code_cell_parses():
    nb = read_notebook()
    nbformat.validate(nb)
    for cell in code_cells(nb):
        parse_cell(python_source(cell.source))  # raises SyntaxError naming the line


PARSING_CALLS = {"strip", "split", "int", "float", "replace", "partition", "globals", "locals"}


def test_every_cell_is_form_fields_plus_one_call():
    """After the `#@param` lines and imports, at most two statements (the setup cell: four),
    no `globals()` and no parsing of form values inline: the logic lives in dbtools."""
    for index, cell in enumerate(code_cells(read_notebook())):
        title = cell.source.splitlines()[0]
        body = [n for n in parse_cell(python_source(cell.source)).body
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
        tree = parse_cell(python_source(cell.source))
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defs, f"{title}: define functions and classes in dbtools, not in the notebook"


def test_every_form_field_is_a_literal_and_is_used():
    nb = read_notebook()
    fields = form_fields(nb)
    assert len(fields) > 40
    loaded = set()
    for cell in code_cells(nb):
        for node in ast.walk(parse_cell(python_source(cell.source))):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                loaded.add(node.id)
    for _, _, value in fields.values():
        ast.literal_eval(value)  # Colab forms need a plain literal
    unused = sorted(set(fields) - loaded)
    assert not unused, f"form fields never used: {unused}"


def test_no_token_field_and_real_defaults():
    """The defaults are the real ones a Colab user starts from: the maintained SD 1.5 repo
    and the original notebook's training flags; no form field takes a token."""
    from dbtools.ui import notebook

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
    from dbtools.families.detect import SD1, Detected

    chosen = notebook.training_flags(fields["MODEL_NAME"], family=Detected(SD1),
                                     memory_profile=fields["memory_profile"],
                                     pretrained_vae_name_or_path=fields["vae_name"],
                                     **{k: fields[k] for k in expected if k in fields})
    assert {k: chosen.flags[k] for k in expected} == expected
    assert chosen.flags["gradient_checkpointing"] is True and not chosen.flags.get("use_lora")
    assert fields["confirm"] == "" and fields["extra_flags"] == ""
    assert fields["save_sample_prompt"]


def test_scores_are_on_by_default_with_their_cost_in_the_help():
    """The training cell scores every save unless the field is unticked, and says what it costs."""
    from dbtools.families.detect import SD1, Detected
    from dbtools.ui import notebook

    nb = read_notebook()
    fields = {name: ast.literal_eval(value) for name, (_, _, value) in form_fields(nb).items()}
    assert fields["score_saves"] is True
    help_lines = [line for line in nb.cells[cell_titled(nb, "7a.")].source.splitlines()
                  if line.startswith("#@markdown") and "per save" in line]
    assert help_lines and "T4" in help_lines[0] and "minutes" in help_lines[0]
    options = dict(score_saves=fields["score_saves"], save_sample_prompt=fields["save_sample_prompt"])
    chosen = notebook.training_flags(fields["MODEL_NAME"], family=Detected(SD1), **options)
    assert "--score_saves" in notebook.flag_args(**chosen.flags)


def test_sdxl_with_the_form_defaults_trains_a_lora_at_the_lora_learning_rate():
    """An SDXL model with the training cells' own defaults: the LoRA profile at LoRA's rate
    (at the full fine-tune's 1e-6 the adapters, which start at zero, barely move), and fewer
    class images made in smaller batches; a rate typed in the form still wins."""
    from dbtools.families.detect import SDXL, Detected
    from dbtools.ui import notebook

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

    from dbtools.families.detect import SDXL, Detected
    from dbtools.train import loop as T
    from dbtools.ui import notebook

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
    script = next(i for i, arg in enumerate(argv) if str(arg).endswith("train_dreambooth.py"))
    assert T.main([str(arg) for arg in argv[script + 1:]]) == 0
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


def test_notebook_runs_headless_end_to_end(tmp_path, tiny_sd, tiny_blip, tiny_scorers, stop_tensorboard, monkeypatch):
    """The whole journey on CPU with tiny models, every cell as a user runs it, only the
    form fields changed; then each step's output is checked on disk."""
    from gradio_client import Client
    from nbclient import NotebookClient
    from PIL import Image

    from dbtools.demo import make_dataset
    from dbtools.ui.notebook import read_png_settings

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
        extra_flags="--sample_batch_size=2 --n_save_sample 2 --save_infer_steps=2 --checkpointing_steps=2 "
                    f"--eval_num_samples=1 {scorer_flags(tiny_scorers)}",
        save_sample_prompt="sks style, a castle", weights_step="4",
        thumbnail_size=64,
        prompt="sks style, a red car", num_images=2, inference_steps=2, width=64, height=64, inference_seed=5,
        scheduler="euler",
        delete_unexported=True, confirm="DELETE",
    ))
    # What a user does in the caption editor: fix one caption and press Save.
    review = cell_titled(nb, "5.")
    nb.cells.insert(review + 1, nbformat.v4.new_code_cell(
        'editor.set_caption(editor.images[0], "a hand fixed caption")\nedited = editor.save()\nprint(edited)'))
    gradio_cell, tensorboard_cell = cell_titled(nb, "12."), cell_titled(nb, "7b.")

    client = NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": str(REPO)}})
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError with the traceback
            if index == tensorboard_cell:
                tensorboards = tensorboard_servers()  # while the kernel (and the servers it started) runs
            if index == gradio_cell:
                ui = Client(f"http://127.0.0.1:{port}/", verbose=False)
                gallery, saved = ui.predict("sks style, a castle", "", 1, 7.5, 2, 64, 64, 3, "model default",
                                            api_name="/generate")
    client.set_widgets_metadata()  # the Output widgets' text: the training log
    text = {i: stream_text(cell, widget_states(nb)) for i, cell in enumerate(nb.cells)}

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
    assert_live_panel_and_scores(nb.cells[cell_titled(nb, "7.")], train_text, out)

    # 8-9: the step typed in the pick cell was used; the grid has one row per saved step
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
    assert_tensorboard_shown(nb.cells[tensorboard_cell], tensorboards, out)


def scorer_flags(scorers: dict[str, Path]) -> str:
    return f"--likeness_model={scorers['dinov2']} --clip_model={scorers['clip']}"


def assert_live_panel_and_scores(cell, train_text: str, out: Path) -> None:
    """The training cell showed the live panel (a widget; the log folded in it) and every save
    was scored."""
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in cell.outputs)
    assert "Trained 4 steps" in train_text  # the whole training log, from the panel's Output widget
    scored = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"] for r in scored if "likeness" in r and "prompt_fidelity" in r} == {2, 4}


def tensorboard_servers() -> list:
    from tensorboard import manager

    return manager.get_all()


def assert_tensorboard_shown(cell, servers: list, out: Path) -> None:
    """The TensorBoard cell showed the frame of a TensorBoard server reading the folder training
    logged to."""
    frames = [o["data"]["text/html"] for o in cell.outputs if "text/html" in o.get("data", {})]
    assert frames and "<iframe" in frames[0], cell.outputs
    ports = {info.port for info in servers if info.logdir == str(out / "0")}
    assert ports and any(f"const port = {port};" in frames[0] for port in ports), servers
    assert list((out / "0").rglob("events.out.tfevents.*"))  # training's TensorBoard logs are in it


@pytest.fixture
def stop_tensorboard(tmp_path):
    """Stop the TensorBoard servers the notebook's TensorBoard cell started for this test's runs."""
    yield
    from tensorboard import manager

    for info in manager.get_all():
        if info.logdir.startswith(str(tmp_path)):
            os.kill(info.pid, signal.SIGTERM)


def test_notebook_runs_headless_with_its_own_defaults(tmp_path, tiny_sd, tiny_blip, tiny_scorers, stop_tensorboard,
                                                      monkeypatch):
    """A new user's Run All: the notebook's own defaults (Method 1, no prompts, prior
    preservation, Drive on, the default memory profile, no extra flags), offline and with
    no token; only model names, paths, sizes and step/image counts are changed for CPU.
    The notebook runs outside the project folder; then Run All again stops at training
    with one short message; a caption fixed in the editor reaches the retrained model, and
    the generate cell follows the new run."""
    from gradio_client import Client
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from dbtools.demo import make_dataset
    from dbtools.ui.notebook import read_png_settings

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
        # model names and paths (the score models are flags: there is no field for them)
        MODEL_NAME=str(tiny_sd), caption_model=str(tiny_blip), vae_name="", OUTPUT_DIR=str(out),
        extra_flags=scorer_flags(tiny_scorers),
        images_folder=str(raw), captioned_folder=str(captioned), class_data_dir=str(klass),
        # sizes and counts
        num_beams=2, min_length=3, max_length=8, caption_batch_size=4, resolution=64, max_train_steps=4,
        num_class_images=2, save_interval=2, thumbnail_size=64, num_images=2, inference_steps=2, width=64,
        height=64,
    )
    assert defaults["method"].startswith("Method 1") and defaults["class_prompt"] == ""
    assert defaults["instance_prompt"] == "" and defaults["extra_flags"] == "" and defaults["confirm"] == ""
    set_form_values(nb, changed)

    elsewhere = tmp_path / "elsewhere"  # opened outside the project folder
    elsewhere.mkdir()
    client = NotebookClient(nb, kernel_name=kernel, timeout=900, resources={"metadata": {"path": str(elsewhere)}})
    gradio_cell, tensorboard_cell = cell_titled(nb, "12."), cell_titled(nb, "7b.")
    again = copy_of(nb.cells[cell_titled(nb, "7.")])
    fix = nbformat.v4.new_code_cell('editor.set_caption(editor.images[0], "a hand fixed caption")\n'
                                    'edited = editor.save()\nprint(editor.notes)')
    retrain = copy_of(nb.cells[cell_titled(nb, "7.")], overwrite_output_dir=True, max_train_steps=2)
    generate_again = copy_of(nb.cells[cell_titled(nb, "11.")])
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError with the traceback
            if index == tensorboard_cell:
                tensorboards = tensorboard_servers()  # while the kernel (and the servers it started) runs
            if index == gradio_cell:
                ui = Client(f"http://127.0.0.1:{port}/", verbose=False)
                gallery, _ = ui.predict("a castle", "", 1, 7.5, 2, 0, 64, 3, "model default", api_name="/generate")
        # the first run, checked before the cells run after it change the output folder
        client.set_widgets_metadata()  # the Output widgets' text: the training log
        text = {i: stream_text(cell, widget_states(nb)) for i, cell in enumerate(nb.cells)}

        login = text[cell_titled(nb, "2.")]
        assert "hf auth login" in login and "need no login" in login
        # Method 1: no prompts; class images generated from the empty class prompt, with a warning
        assert len(list(klass.glob("*.jpg"))) == 2
        train_text = text[cell_titled(nb, "7.")]
        assert "class prompt is empty" in train_text
        # one resume checkpoint kept; weights in Shivam's layout
        assert (out / "4" / "model_index.json").is_file()
        assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-4"]
        assert "--score_saves" in train_text.splitlines()[0]
        assert_live_panel_and_scores(nb.cells[cell_titled(nb, "7.")], train_text, out)
        # scores are on by default: the pick cell took the suggested best step, and the export is of it
        best = json.loads((out / "metrics-summary.json").read_text())["best_step"]
        assert best in (2, 4) and f"Step {best} is the suggested best step" in text[cell_titled(nb, "8.")]
        assert f"Using the weights in {out / str(best)}" in text[cell_titled(nb, "8.")]
        assert (out / "preview.png").is_file() and (out / f"out-{best}.safetensors").is_file()
        generated = sorted((out / "generated").glob("*.png"))
        assert len(generated) == 2 and read_png_settings(generated[0])["prompt"] == defaults["prompt"]
        assert len(gallery) == 1
        # the cleanup cell only shows its plan without the confirm word
        cleanup = text[cell_titled(nb, "13.")]
        assert "Nothing to delete" in cleanup and f"{6 - best} (not exported yet)" in cleanup
        assert "deleted" not in cleanup.lower() and (out / "2").is_dir()
        assert_tensorboard_shown(nb.cells[tensorboard_cell], tensorboards, out)

        with pytest.raises(CellExecutionError):  # a second Run All: the folder holds a run
            run_after(client, nb, again)
        for cell in (fix, retrain, generate_again):  # fix a caption, retrain, generate
            run_after(client, nb, cell)

    # quiet output: harmless third-party lines hidden, our lines on lines of their own
    for noise in ("Skipping publisher trust check", "Saving current state to", "Writing model shards",
                  "precision: no ", "set `share=True`"):
        assert not any(noise in t for t in text.values()), noise
    assert train_text.count("ignoring --revision") <= 1
    assert re.search(r"(^|\n)class images: generating 2 for the empty prompt", train_text)
    assert "GRADIO_SHARE=true" in text[gradio_cell]
    settings = text[cell_titled(nb, "3.")]  # each thing said once
    assert settings.count("Colab") == 1 and text[cell_titled(nb, "9.")].count("preview.png") == 1
    # Run All again: one short message in the notebook's words, no traceback, nothing else red
    [error] = [o for o in again.outputs if o.output_type == "error"]
    assert len(error.traceback) == 1 and "ticking `resume` in step 7" in error.traceback[0]
    assert "--resume_from_checkpoint" not in error.traceback[0]
    assert "already holds" not in stream_text(again) and "Traceback" not in stream_text(again)
    # the fix reached the caption file training reads; the old run (its export, preview and
    # generated images too) went aside; the generate cell took the new run's weights
    [fixed] = [p for p in captioned.iterdir() if p.name.startswith("a hand fixed caption_") and p.suffix != ".txt"]
    assert (captioned / f"{fixed.name}.txt").read_text(encoding="utf-8") == "a hand fixed caption\n"
    assert "now holds 'a hand fixed caption'" in stream_text(fix)
    [aside] = tmp_path.glob("out-previous-*")
    assert {"4", "0", "generated", "preview.png", f"out-{best}.safetensors"} <= {p.name for p in aside.iterdir()}
    assert not (out / "4").exists() and (out / "2" / "model_index.json").is_file()
    assert f"holds a new training run since step 8: using its weights in {out / '2'}" in stream_text(generate_again)
    assert len(list((out / "generated").glob("*.png"))) == 2
