"""Look at the notebook's visible parts in a real browser (headless Chromium), by hand:

    python bench/browser_check.py --out /tmp/browser-check

Needs Debian's `chromium` and `chromium-driver` (`apt-get install chromium chromium-driver`)
and the test extras (selenium comes with them). It writes PNG screenshots to `--out`:

- `editor.png`: JupyterLab running a small notebook that opens the caption editor (long
  file names, an unsaved edit on another page) and then makes a user error (a wrong step
  in Pick weights), which must show as one short red message;
- `gradio.png`: the Gradio UI for tiny weights, started from the generate cell's settings,
  with the height of the page's content (the notebook's frame must not be much taller).

Not a test: it takes a minute and a browser, and the screenshots are for a person to look at.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1400"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.binary_location = "/usr/bin/chromium"
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def wait_for(check, timeout: float = 120, every: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        try:
            value = check()
            if value:
                return value
        except Exception:
            pass
        time.sleep(every)
    raise TimeoutError("gave up waiting")


def make_data(work: Path) -> tuple[Path, Path]:
    from PIL import Image

    from dbtools.tiny import build_tiny_sd

    images = work / "captioned"
    images.mkdir(parents=True)
    names = ["a woman standing on a mountain with a very long caption that wraps twice_0.png",
             "a cat_1.png", "a red car parked in front of a small house at night_2.png", "a dog_3.png",
             "a castle on a hill_4.png", "a bowl of fruit on a wooden table_5.png", "a boat_6.png"]
    for i, name in enumerate(names):
        Image.new("RGB", (64 + 40 * (i % 3), 64), (40 * i, 90, 160)).save(images / name)
    model = build_tiny_sd(work / "sd", "sd1")
    return images, model


def notebook_check(work: Path, images: Path, out: Path) -> None:
    """JupyterLab: the editor and a user error, screenshot of the notebook."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in (
        "from pathlib import Path\nfrom dbtools import notebook as nb\nnb.enable_logging()\n"
        f"session = nb.Session(model='m', output_dir=Path({str(work / 'out')!r}))\n"
        f"editor = nb.review_step(session, {str(images)!r}, 'filename', 4)",
        "editor.set_caption(editor.images[0], 'a woman on a mountain')\neditor.page(1);",
        "WEIGHTS_DIR = nb.pick_weights(session, '7')",
    )]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (work / "out" / "1").mkdir(parents=True)
    (work / "out" / "1" / "model_index.json").write_text("{}")
    path = work / "check.ipynb"
    nbformat.write(nb, path)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JUPYTER_CONFIG_DIR": str(work / "jcfg"),
           "JUPYTER_RUNTIME_DIR": str(work / "jrt"), "IPYTHONDIR": str(work / "ipy")}
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
                               "--ServerApp.token=", "--ServerApp.password=", "--ServerApp.disable_check_xsrf=True",
                               "--allow-root",
                               f"--ServerApp.root_dir={work}", "--LabApp.news_url=None"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(out / "lab.log", "w"))
    driver = browser(work / "profile-lab")
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1), 300)
        driver.get(f"http://127.0.0.1:{port}/lab/tree/check.ipynb")
        from selenium.webdriver.common.by import By

        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 180)
        wait_for(lambda: "Idle" in driver.page_source or "idle" in driver.page_source.lower(), 120)
        time.sleep(3)
        driver.execute_script("window.dispatchEvent(new Event('resize'))")
        menu = wait_for(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel")
                                 if e.text == "Run"])
        menu[0].click()
        item = wait_for(lambda: [e for e in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-itemLabel")
                                 if e.text.startswith("Run All Cells")])
        item[0].click()
        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-RenderedText[data-mime-type="
                                                               "'application/vnd.jupyter.stderr']"), 240)
        time.sleep(4)
        driver.save_screenshot(str(out / "editor.png"))
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR,
                                                       ".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']")]
        print("notebook error output:", json.dumps(errors, indent=1))
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)


def gradio_check(work: Path, model: Path, out: Path) -> None:
    from dbtools.after.generate import build_gradio_app

    app = build_gradio_app(str(model), out_dir=work / "gradio",
                           defaults=dict(prompt="a castle on a hill", steps=2, num_images=2, width=0, height=0))
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    driver = browser(work / "profile-gradio")
    try:
        driver.set_window_size(1000, 1100)
        driver.get(f"http://127.0.0.1:{port}/")
        from selenium.webdriver.common.by import By

        wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "button.primary, button.lg"), 120)
        time.sleep(3)
        height = driver.execute_script("return document.querySelector('gradio-app, .gradio-container')"
                                       ".getBoundingClientRect().height")
        print(f"gradio content height at 1000 px wide: {height:.0f} px")
        driver.save_screenshot(str(out / "gradio.png"))
    finally:
        driver.quit()
        app.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", default="browser-check")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    with tempfile.TemporaryDirectory(prefix="dbtools-browser-") as tmp:
        work = Path(tmp)
        images, model = make_data(work)
        gradio_check(work, model, out)
        notebook_check(work, images, out)
    print(f"screenshots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
