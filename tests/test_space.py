"""The Space (space/app.py) as its users meet it: a real server process, called with gradio_client and driven in a
headless Chromium (Debian's `chromium` + `chromium-driver`, installed with apt-get when missing and running as root)."""

import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from loracaptioner import LoraCaptionerForConditionalGeneration

REPO = Path(__file__).resolve().parents[1]
SPACE_APP = REPO / "space" / "app.py"
STARTUP_TIMEOUT_S = 120
APT_INSTALL = "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"space/app.py exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"space/app.py did not serve {url} within {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def saved_model(backbones, processor, tmp_path_factory) -> tuple[Path, LoraCaptionerForConditionalGeneration]:
    torch.manual_seed(0)
    model = LoraCaptionerForConditionalGeneration.from_backbones(*backbones).eval()
    folder = tmp_path_factory.mktemp("space-model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def space_url(saved_model, tmp_path_factory):
    """`python space/app.py --model DIR --port PORT` on 127.0.0.1, stopped at the end of the module."""
    folder, _ = saved_model
    work = tmp_path_factory.mktemp("space-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the app loads the model's own code files
    env.update(
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(work / "gradio"),
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(work / "modules"),
        OMP_NUM_THREADS="1",
    )
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        command = [sys.executable, str(SPACE_APP), "--model", str(folder), "--port", str(port)]
        process = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until_serving(url, process, log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def client(space_url) -> Client:
    return Client(space_url, verbose=False, download_files=False)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space-images") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def generate_caption(saved_model, processor, image_file: Path, prompt: str | None = None, **options) -> str:
    _, model = saved_model
    with torch.inference_mode():
        caption_ids = model.generate(**processor(images=Image.open(image_file), text=prompt), **options)
    return processor.batch_decode(caption_ids, skip_special_tokens=True)[0].strip()


def test_space_captions_an_uploaded_image_as_greedy_generate_does(client, saved_model, processor, image_file):
    expected = generate_caption(saved_model, processor, image_file)
    assert expected, "the tiny model should write some caption"
    assert client.predict(image=handle_file(str(image_file)), api_name="/caption") == expected


@pytest.mark.parametrize(
    "options, generate_options",
    [
        ({"decoding": "beam search", "num_beams": 3}, {"num_beams": 3}),
        ({"decoding": "sampling", "temperature": 1.5, "seed": 7}, {"do_sample": True, "temperature": 1.5}),
        ({"prompt": "a photo of", "max_new_tokens": 4}, {"prompt": "a photo of", "max_new_tokens": 4}),
    ],
    ids=["beam-search", "seeded-sampling", "prompt-and-length"],
)
def test_space_decoding_options_give_the_captions_generate_gives(
    client, saved_model, processor, image_file, options, generate_options
):
    torch.manual_seed(options.get("seed", 0))
    expected = generate_caption(saved_model, processor, image_file, **generate_options)
    assert client.predict(image=handle_file(str(image_file)), api_name="/caption", **options) == expected


def test_space_captions_an_image_url_as_it_captions_the_same_image_uploaded(client, image_file):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=image_file.parent)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_port}/{image_file.name}"
            from_url = client.predict(image=None, image_url=url, api_name="/caption")
            with pytest.raises(AppError, match="Could not download the image"):
                client.predict(image=None, image_url=url + ".missing", api_name="/caption")
        finally:
            server.shutdown()
    assert from_url == client.predict(image=handle_file(str(image_file)), api_name="/caption")


def test_space_reports_a_file_that_is_not_an_image_as_a_readable_error(client, tmp_path):
    not_an_image = tmp_path / "holiday.png"
    not_an_image.write_text("these are not pixels")
    with pytest.raises(AppError, match=r"holiday\.png is not an image this app can read"):
        client.predict(image=handle_file(str(not_an_image)), api_name="/caption")
    with pytest.raises(AppError, match="Upload an image or give an image URL first"):
        client.predict(image=None, api_name="/caption")


@functools.cache
def chromium_and_driver() -> tuple[str, str]:
    """Debian's chromium and chromedriver; installed (once) with apt-get when missing and running as root."""
    install_log = "not attempted (not root)"
    if not (shutil.which("chromium") and shutil.which("chromedriver")) and os.geteuid() == 0:
        result = subprocess.run(APT_INSTALL, shell=True, check=False, timeout=900, capture_output=True, text=True)
        install_log = f"exit status {result.returncode}\n{(result.stdout + result.stderr)[-2000:]}"
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail(
            f"the browser test needs Debian's chromium and chromium-driver (`{APT_INSTALL}`, as root); "
            f"installing them: {install_log}"
        )
    return chromium, chromedriver


def test_space_page_in_chromium_captions_an_uploaded_image_and_shows_errors(
    space_url, saved_model, processor, image_file, tmp_path, capsys
):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, chromedriver = chromium_and_driver()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    screenshot = REPO / "outputs" / "test-artifacts" / "space.png"  # kept after the run (outputs/ is git-ignored)
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    try:
        driver.set_page_load_timeout(60)
        driver.get(space_url)
        wait = WebDriverWait(driver, 60, ignored_exceptions=(StaleElementReferenceException,))  # Svelte re-renders
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "input[type=file]"))[0].send_keys(str(image_file))
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "img[src*='noise']"))  # the upload is shown
        driver.find_element(By.ID, "caption-button").click()
        caption_box = driver.find_element(By.CSS_SELECTOR, "#caption textarea")
        caption = wait.until(lambda page: caption_box.get_attribute("value"))
        driver.save_screenshot(str(screenshot))
        with capsys.disabled():  # shown in the test output even with -q
            print(f"\nscreenshot: {screenshot}")

        driver.find_element(By.CSS_SELECTOR, "button[aria-label='Remove Image']").click()
        driver.find_element(By.ID, "caption-button").click()
        error = wait.until(lambda page: [toast.text for toast in page.find_elements(By.CSS_SELECTOR, ".toast-body")
                                         if toast.text.strip()])  # the toast appears before its text does
    finally:
        driver.quit()
    assert caption == generate_caption(saved_model, processor, image_file)
    assert "Upload an image or give an image URL first." in error[0]
