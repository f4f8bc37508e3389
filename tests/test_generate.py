"""Inference (`dbtools.after.generate`): seeds, PNG settings, scheduler choice, the Gradio app."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dbtools.after import generate as G


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd):
    from dbtools.families.models import load_pipeline

    return load_pipeline(str(tiny_sd), device="cpu")


def test_generate_images_saves_settings_in_png_metadata(tiny_pipe, tmp_path):
    out = tmp_path / "gen"
    paths = G.generate_images(tiny_pipe, "a photo of zwx", negative_prompt="blurry", num_images=2,
                               guidance_scale=5.0, steps=2, seed=11, scheduler="euler", out_dir=out)
    assert [p.name for p in paths] == ["00000-11.png", "00001-12.png"]
    settings = G.read_png_settings(paths[1])
    assert settings == {"prompt": "a photo of zwx", "negative_prompt": "blurry", "seed": 12, "steps": 2,
                        "guidance_scale": 5.0, "scheduler": "euler", "width": 64, "height": 64,
                        "model": str(tiny_pipe.name_or_path)}
    with Image.open(paths[1]) as img:
        params = img.info["parameters"]
        second = np.asarray(img.convert("RGB"))
    assert params.startswith("a photo of zwx\nNegative prompt: blurry\nSteps: 2, Sampler: Euler,")
    assert "Seed: 12, Size: 64x64" in params
    # image i is reproduced by its own seed alone
    again = G.generate_images(tiny_pipe, "a photo of zwx", negative_prompt="blurry", num_images=1,
                               guidance_scale=5.0, steps=2, seed=12, scheduler="euler", out_dir=out)
    assert again[0].name == "00002-12.png"  # never replaces an earlier image
    with Image.open(again[0]) as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), second)
    images = G.generate_images(tiny_pipe, "x", steps=1, seed=1)
    assert isinstance(images[0], Image.Image) and len(list(out.iterdir())) == 3
    # every argument of `generate` is taken, batch_size included
    batched = G.generate_images(tiny_pipe, "a photo of zwx", negative_prompt="blurry", num_images=2,
                                guidance_scale=5.0, steps=2, seed=11, scheduler="euler", batch_size=1)
    assert np.array_equal(np.asarray(batched[1].convert("RGB")), second)


def test_generate_images_rejects_bad_settings_before_loading(tmp_path):
    with pytest.raises(ValueError, match="multiple of 8"):
        G.generate_images(tmp_path / "no-model", "x", height=100)
    with pytest.raises(ValueError, match="at least 1 image"):
        G.generate_images(tmp_path / "no-model", "x", num_images=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gradio_app_answers_one_request(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client

    app = G.build_gradio_app(tiny_pipe, out_dir=tmp_path / "gradio")
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               share=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        gallery, saved = client.predict("a photo of zwx", "", 1, 7.5, 2, 64, 64, 3, "ddim",
                                        api_name="/generate")
        with pytest.raises(Exception, match="width=63: use a multiple of 8"):
            client.predict("a photo of zwx", "", 1, 7.5, 2, 63, 64, 3, "ddim", api_name="/generate")
    finally:
        app.close()
    assert len(gallery) == 1 and gallery[0]["caption"] == "seed 3"
    downloaded = Path(gallery[0]["image"])
    assert downloaded.name == "00000-3.png"  # the saved file, with its settings
    with Image.open(downloaded) as img:
        assert img.size == (64, 64)
        assert "Sampler: DDIM" in img.info["parameters"] and img.info["seed"] == "3"
    saved_path = Path(saved.strip())
    assert saved_path.parent == tmp_path / "gradio"
    assert G.read_png_settings(saved_path)["scheduler"] == "ddim"
    assert G.read_png_settings(saved_path)["seed"] == 3


def test_a_scheduler_choice_does_not_stick_to_the_callers_pipeline(tiny_pipe):
    original = tiny_pipe.scheduler
    before = G.generate(tiny_pipe, "a photo of zwx", steps=2, seed=5)[0]
    chosen = G.generate(tiny_pipe, "a photo of zwx", steps=2, seed=5, scheduler="euler")[0]
    assert chosen.settings["scheduler"] == "euler"
    assert tiny_pipe.scheduler is original
    after = G.generate(tiny_pipe, "a photo of zwx", steps=2, seed=5)[0]
    from dbtools.families.models import scheduler_key

    assert after.settings["scheduler"] == before.settings["scheduler"] == scheduler_key(type(original).__name__)
    assert np.array_equal(np.asarray(after.image), np.asarray(before.image))
    with pytest.raises(ValueError):  # the pipeline itself refuses: no prompt
        G.generate(tiny_pipe, None, steps=1, scheduler="ddim")
    assert tiny_pipe.scheduler is original


def test_png_setting_keys_are_accepted_by_the_generate_command(tiny_sd, tmp_path, capsys):
    """The separate PNG keys hold values `generate`'s own flags take: feeding them back
    reproduces the image."""
    out = tmp_path / "gen"
    assert G.main(["--model", str(tiny_sd), "--prompt", "a photo of zwx", "--num_images", "2", "--steps", "2",
                   "--seed", "7", "--scheduler", "Euler a", "--width", "64", "--height", "64",
                   "--out_dir", str(out)]) == 0
    # The command prints one path per image; log lines another test routed to stdout are not paths.
    paths = [Path(line) for line in capsys.readouterr().out.split() if line.endswith(".png")]
    assert [p.name for p in paths] == ["00000-7.png", "00001-8.png"]
    with Image.open(paths[1]) as img:
        info, pixels = dict(img.info), np.asarray(img.convert("RGB"))
    assert info["scheduler"] == "euler_a" and "Sampler: Euler a" in info["parameters"]
    flags = [arg for key in G.PNG_SETTING_KEYS if info[key] for arg in (f"--{key}", info[key])]
    assert G.main(["--model", str(tiny_sd), *flags, "--out_dir", str(out)]) == 0
    again = next(Path(word) for word in capsys.readouterr().out.split() if word.endswith(".png"))
    with Image.open(again) as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), pixels)
    assert G.main(["--model", str(tiny_sd), "--prompt", "x", "--width", "100"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_scheduler_menu_has_one_entry_per_scheduler():
    from dbtools.families.models import SCHEDULERS, scheduler_key

    values = [v for _, v in G.scheduler_choices()]
    assert len(values) == len(set(values)) == len(set(SCHEDULERS.values())) + 1
    assert scheduler_key("dpmsolver++") == scheduler_key("DPM++ 2M") == "dpm++"
    assert scheduler_key("DPMSolverMultistepScheduler") == "dpm++"
    assert G.sampler_name("euler_a") == "Euler a" and G.sampler_name("ddim") == "DDIM"


def test_launch_announces_a_public_link_and_takes_auth(monkeypatch, caplog):
    calls = []

    class FakeApp:
        def launch(self, **kw):
            calls.append(kw)

    monkeypatch.setenv("GRADIO_AUTH", "me:secret")
    with caplog.at_level("WARNING", logger="dbtools.after.generate"):
        G.launch_gradio(FakeApp(), share=True)
    assert calls[-1]["share"] is True and calls[-1]["auth"] == ("me", "secret")
    assert "PUBLIC" in caplog.text and "after logging in" in caplog.text
    G.launch_gradio(FakeApp(), share=False, auth="a:b")
    assert calls[-1]["auth"] == ("a", "b") and calls[-1]["height"] >= 600
    # Gradio's own lines point at launch() code a notebook user never sees: ours say how
    monkeypatch.setattr("dbtools.core.env.in_colab", lambda: False)
    with caplog.at_level("INFO", logger="dbtools.after.generate"):
        G.launch_gradio(FakeApp())
    assert calls[-1]["quiet"] is True and calls[-1]["share"] is False
    assert "set the environment variable GRADIO_SHARE=true and run this cell again" in caplog.text
    monkeypatch.setenv("GRADIO_SHARE", "true")
    G.launch_gradio(FakeApp())
    assert calls[-1]["share"] is True
    with pytest.raises(ValueError, match="user:password"):
        G.launch_gradio(FakeApp(), share=False, auth="nocolon")


def pixels(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_a_png_is_made_again_from_its_stored_settings(tiny_sd, tiny_pipe, tmp_path, capsys):
    """`reproduce` and `generate --from_png` read the settings back from the file alone."""
    first = G.generate(tiny_pipe, "a photo of zwx", negative_prompt="blurry", num_images=2, guidance_scale=4.0,
                       steps=3, seed=21, scheduler="ddim", width=64, height=56, batch_size=1)[1]
    png = G.save_image(first, tmp_path / "samples" / "1.png")
    assert png == tmp_path / "samples" / "1.png"
    assert G.settings_from_png(png) == {"prompt": "a photo of zwx", "negative_prompt": "blurry", "seed": 22,
                                        "steps": 3, "guidance_scale": 4.0, "width": 64, "height": 56,
                                        "scheduler": "ddim"}
    assert np.array_equal(np.asarray(G.reproduce(tiny_pipe, png).image), pixels(png))
    out = tmp_path / "again"
    assert G.main(["--model", str(tiny_sd), "--from_png", str(png), "--out_dir", str(out)]) == 0
    again = next(Path(word) for word in capsys.readouterr().out.split() if word.endswith(".png"))
    assert again.name == "00000-22.png" and np.array_equal(pixels(again), pixels(png))
    assert G.settings_from_png(again) == G.settings_from_png(png)
    # a flag given as well wins over the PNG
    assert G.main(["--model", str(tiny_sd), "--from_png", str(png), "--seed", "5", "--out_dir", str(out)]) == 0
    changed = Path(capsys.readouterr().out.split()[0])
    assert G.settings_from_png(changed) == dict(G.settings_from_png(png), seed=5)


def test_from_png_refuses_files_without_settings(tiny_sd, tmp_path, capsys):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert G.main(["--model", str(tiny_sd), "--from_png", str(plain)]) == 2
    assert f"{plain}: no stored prompt" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not an image")
    assert G.main(["--model", str(tiny_sd), "--from_png", str(tmp_path / "text.png")]) == 2
    assert "cannot read this image" in capsys.readouterr().err
    assert G.main(["--model", str(tiny_sd)]) == 2
    assert "give --prompt" in capsys.readouterr().err


def test_a_token_pasted_into_a_prompt_is_not_written_into_the_png(tmp_path):
    token = "hf_" + "a1B2c3D4e5F6g7H8i9J0k" * 2
    settings = {"prompt": f"a photo of zwx {token}", "negative_prompt": "", "seed": 1, "steps": 2,
                "guidance_scale": 5.0, "scheduler": "euler", "width": 8, "height": 8, "model": "m"}
    path = G.save_image(G.Generated(Image.new("RGB", (8, 8)), settings), tmp_path / "a.png")
    assert token not in path.read_bytes().decode("latin-1")
    assert G.read_png_settings(path)["prompt"] == "a photo of zwx <redacted>"
