"""The demo Space in a real browser: `python spaces/lapvqa/app.py` in a subprocess, driven by headless Chromium
(Debian's chromium and chromium-driver; selenium) as a user drives it. Each test saves a screenshot into
`$LAPVQA_SCREENSHOTS` (.ci/run: build/screenshots in the checkout), else `<system temp>/lapvqa-screenshots`: pytest
deletes its own temporary folders after a passing run."""

import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from lapvqa_hf.convert.original import DiffVQAHead
from PIL import Image
from test_pipelines import QUESTIONS, TINY_HEAD, convert, tiny_clip_folder
from transformers import pipeline

pytest.importorskip("gradio", reason="the Space needs gradio: pip install -e '.[space]'")
pytest.importorskip("selenium", reason="the browser tests need selenium: pip install -e '.[space]'")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium or chromedriver (Debian: apt-get install chromium chromium-driver)",
)
APP = Path(__file__).resolve().parents[1] / "spaces" / "lapvqa" / "app.py"
TAB = "differential-vqa"  # the first tab's elements: #differential-vqa-{path,prior_image,...}
SCREENSHOTS = Path(os.environ.get("LAPVQA_SCREENSHOTS") or Path(tempfile.gettempdir()) / "lapvqa-screenshots")


@pytest.fixture(scope="module")
def app_process(tmp_path_factory):
    """The Space on a free local port, starting (it imports gradio, torch and transformers meanwhile)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path_factory.mktemp("space")
    log = folder / "app.log"
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(folder / "uploads")}  # fmt: skip
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, str(APP)], stdout=output, stderr=subprocess.STDOUT, env=env)
    yield process, f"http://127.0.0.1:{port}/", log
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def uploads(tmp_path_factory) -> dict[str, str]:
    """An 8-bit PNG, a 16-bit PNG, and a file that is no image."""
    folder = tmp_path_factory.mktemp("uploads")
    generator = np.random.default_rng(5)
    Image.fromarray(generator.integers(0, 255, (60, 50), dtype=np.uint8)).save(folder / "prior.png")
    Image.fromarray(generator.integers(200, 3000, (56, 64), dtype=np.uint16)).save(folder / "current16.png")
    (folder / "broken.png").write_bytes(b"not a png at all")
    return {path.name: str(path) for path in folder.iterdir()}


@pytest.fixture(scope="module")
def diffvqa_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("diffvqa")
    head = DiffVQAHead(vis_dim=1024, **TINY_HEAD)
    return convert("diffvqa", head, folder, tiny_clip_folder(folder / "tiny-clip"), "--num-heads", "4")


@pytest.fixture(scope="module")
def space(app_process, diffvqa_folder) -> str:
    """The Space's address, once it answers (the model folder was converted while it started)."""
    process, url, log = app_process
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the Space exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return url
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the Space did not answer within 120 s: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(CHROMEDRIVER))
    yield driver
    driver.quit()


def screenshot(driver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    assert driver.save_screenshot(str(path)), path
    print(f"screenshot: {path}")
    return path


def textbox(driver, name: str):
    return driver.find_element(By.CSS_SELECTOR, f"#{TAB}-{name} textarea, #{TAB}-{name} input")


def ask(driver, url: str, model: str, files: dict[str, str], question: str) -> str:
    """Opens the page, fills the first tab (model folder, uploads, question), runs it; the status line it shows."""
    driver.get(url)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda _: textbox(driver, "path")).send_keys(model)
    for column, path in files.items():
        driver.find_element(By.CSS_SELECTOR, f"#{TAB}-{column} input[type=file]").send_keys(path)
        # Uploaded: the file shows with its download link.
        wait.until(
            lambda _, c=column: driver.find_elements(By.CSS_SELECTOR, f"#{TAB}-{c} a[data-testid=download-link]")
        )
    question_box = textbox(driver, "question")
    question_box.clear()
    question_box.send_keys(question)
    driver.find_element(By.ID, f"{TAB}-run").click()
    return wait.until(lambda _: textbox(driver, "status").get_property("value"))


def test_two_xrays_and_a_question_give_the_answer_and_its_heat_maps(space, browser, diffvqa_folder, uploads):
    files = {"prior_image": uploads["prior.png"], "current_image": uploads["current16.png"]}
    status = ask(browser, space, diffvqa_folder, files, QUESTIONS[1])
    picture = WebDriverWait(browser, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{TAB}-picture img"))
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return arguments[0].complete", picture))
    screenshot(browser, "space-diffvqa-answer.png")
    assert status.startswith("Done in"), status
    expected = pipeline(model=diffvqa_folder, trust_remote_code=True)({**files, "question": QUESTIONS[1]})["answer"]
    assert textbox(browser, "text").get_property("value") == expected
    assert browser.execute_script("return arguments[0].naturalWidth", picture) == 640, "prior and current panels"
    with urllib.request.urlopen(picture.get_attribute("src"), timeout=10) as response:
        pixels = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB")).astype(int)
    assert (pixels[..., 0] - pixels[..., 2]).max() > 50, "a red-yellow heat map over the grey X-rays"
    assert "Research use only." in browser.find_element(By.TAG_NAME, "body").text


def test_a_broken_upload_is_one_line_in_the_page(space, browser, diffvqa_folder, uploads):
    files = {"prior_image": uploads["prior.png"], "current_image": uploads["broken.png"]}
    status = ask(browser, space, diffvqa_folder, files, QUESTIONS[0])
    screenshot(browser, "space-diffvqa-error.png")
    assert status.startswith("Error: current_image: broken.png: cannot read it as an image"), status
    assert "\n" not in status and "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    assert textbox(browser, "text").get_property("value") == ""
