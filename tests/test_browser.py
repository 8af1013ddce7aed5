"""JupyterLab in a real browser: a package widget changes its output, the HTML index opens.

Debian's headless Chromium (`apt-get install chromium chromium-driver`; `.ci/run` installs them)
driven by selenium. JupyterLab serves a temporary folder; a notebook there builds notebook 01's
athlete widget (`viz.circuits_plots.athlete_heatmap_widget`) on the tiny random model; the test runs
it, picks another athlete in the dropdown and checks that the heatmap image changed. Then the saved
notebook is exported with `workbook.pages` into a results folder, and its index page and notebook page
are opened. Screenshots: results/browser/ (lab_widget.png, index.png, notebook.png).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from mechunlearn_utils.core.paths import REPO_ROOT

pytestmark = pytest.mark.browser
SHOTS = REPO_ROOT / "results" / "browser"
TOKEN = "mechunlearn-browser-test"
WIDGET_CELL = """\
import pandas as pd
from mechunlearn_utils import interp as C
from mechunlearn_utils.core.models import load_model
from mechunlearn_utils.viz import circuits_plots as V

model = load_model("tiny-random", "cpu")
pairs = C.corruption_pairs(model, pd.DataFrame(dict(athlete=["Michael Jordan", "Tom Brady"],
                                                    sport=["basketball", "football"])))
V.athlete_heatmap_widget(model, pairs, components=("mlp_out",))"""


def _missing() -> list[str]:
    missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        missing.append("jupyterlab (pip)")
    return missing


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        pytest.skip(f"browser test needs {', '.join(missing)} (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# Athlete widget (browser test)"), nbformat.v4.new_code_cell(WIDGET_CELL)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "widget.ipynb")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JUPYTER_RUNTIME_DIR": str(root / ".runtime")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root}",
         f"--LabApp.workspaces_dir={root / '.workspaces'}", "--LabApp.expose_app_in_browser=True"]
        + (["--allow-root"] if os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("JupyterLab exited: " + proc.stderr.read().decode()[-2000:])
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("JupyterLab did not answer within 60 s")
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)


def _wait(driver, condition, timeout=60, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition, message=f"timed out waiting for {what}")


def test_widget_changes_its_output_in_jupyterlab_and_the_index_opens(browser, lab, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from mechunlearn_utils.workbook.pages import export_html, write_index

    url, root = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.get(f"{url}/lab/tree/widget.ipynb?token={TOKEN}")
    _wait(browser, lambda d: d.execute_script(
        "const a = window.jupyterapp; const w = a && a.shell.currentWidget;"
        "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
        " && w.sessionContext.session.kernel.connectionStatus === 'connected');"), what="the notebook's kernel")
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    select = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".widget-dropdown select"),
                   what="the athlete dropdown")[0]
    image = _wait(browser, lambda d: [i for i in d.find_elements(By.CSS_SELECTOR, ".jupyter-widgets img")
                                      if i.get_attribute("src")], what="the heatmap image")[0]
    before = image.get_attribute("src")
    assert Select(select).first_selected_option.text == "Michael Jordan"

    Select(select).select_by_visible_text("Tom Brady")  # the kernel patches Tom Brady and redraws
    _wait(browser, lambda d: image.get_attribute("src") != before, what="the heatmap to change")
    assert browser.execute_script("return arguments[0].naturalWidth", image) > 0
    browser.save_screenshot(str(SHOTS / "lab_widget.png"))

    # the executed notebook as the workbook writes it: HTML page + index with figures and numbers
    browser.execute_script("return window.jupyterapp.commands.execute('docmanager:save')")
    _wait(browser, lambda d: json.loads((root / "widget.ipynb").read_text())["cells"][1].get("outputs"),
          what="the saved notebook")
    results = tmp_path / "results"
    stem = "01_factual_recall_circuits"
    (results / stem).mkdir(parents=True)
    shutil.copy(root / "widget.ipynb", results / stem / f"{stem}.ipynb")
    export_html(results / stem / f"{stem}.ipynb")
    shutil.copy(SHOTS / "lab_widget.png", results / stem / "widget_in_lab.png")
    (results / stem / "metrics.json").write_text(json.dumps({"resid_handoff_layer": 1, "smoke": True}))
    browser.get(write_index(results).as_uri())
    figure = browser.find_element(By.CSS_SELECTOR, f'[id="{stem}"] img[alt="widget_in_lab"]')
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", figure) > 0
    assert "resid_handoff_layer" in browser.find_element(By.ID, stem).text
    browser.save_screenshot(str(SHOTS / "index.png"))
    browser.find_element(By.LINK_TEXT, "the executed notebook").click()
    _wait(browser, lambda d: "corruption_pairs" in d.find_element(By.TAG_NAME, "body").text,
          what="the notebook page")
    browser.save_screenshot(str(SHOTS / "notebook.png"))
