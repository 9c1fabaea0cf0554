"""``transfusion-mot demo``: the server on a trained debug run, driven in a real headless Chromium (Debian's
``chromium`` + ``chromium-driver``, through Selenium): prompt -> images on the page, upload -> caption."""
from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from transfusion_mot.demo import BadRequest, parse_generate

DEFAULTS = {"num_inference_steps": 250, "guidance_scale": 4.0, "seed": 0, "num_images_per_prompt": 1}
START_TIMEOUT_S = 120  # loading torch and the model on a busy 2-core machine


def test_empty_fields_take_the_runs_defaults_and_strings_are_typed():
    assert parse_generate({"prompt": "a red circle", "num_inference_steps": "", "seed": "7",
                           "guidance_scale": "1.5"}, DEFAULTS) == {
        "prompt": "a red circle", "num_inference_steps": 250, "guidance_scale": 1.5, "seed": 7,
        "num_images_per_prompt": 1}
    big = str(2 ** 62 + 1)  # past a JavaScript number's exact range: the page sends the field's text
    assert parse_generate({"prompt": "x", "seed": big}, DEFAULTS)["seed"] == 2 ** 62 + 1


@pytest.mark.parametrize("body, field", [({"prompt": "  "}, "prompt"),
                                         ({"prompt": "x", "num_inference_steps": "0"}, "num_inference_steps"),
                                         ({"prompt": "x", "num_images_per_prompt": "17"}, "num_images_per_prompt"),
                                         ({"prompt": "x", "guidance_scale": "nan"}, "guidance_scale"),
                                         ({"prompt": "x", "seed": "1.5"}, "seed")])
def test_a_bad_field_is_named(body, field):
    with pytest.raises(BadRequest, match=field):
        parse_generate(body, DEFAULTS)


def _cli(*args: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "transfusion_mot.cli", "demo", *args], env=env,
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_a_bad_ckpt_is_one_line_before_any_server(tmp_path):
    proc = _cli("--ckpt", str(tmp_path / "no_such_run"), "--port", "0")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (out, err)
    assert err.strip().splitlines() == [f"error: checkpoint {tmp_path / 'no_such_run'} does not exist "
                                        "(give a run directory, a model folder or a hub id org/name)"]
    assert "http://" not in out


@pytest.fixture(scope="module")
def demo_url(debug_run, tmp_path_factory):
    """The demo of the session's debug run on a free port (--port 0); its printed URL."""
    log = tmp_path_factory.mktemp("demo") / "stderr.txt"  # a file, not a pipe nobody drains while it serves
    proc = _cli("--ckpt", str(debug_run), "--port", "0", "--device", "cpu", stderr=log.open("w"))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=START_TIMEOUT_S)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"the demo printed no URL within {START_TIMEOUT_S} s: {log.read_text()[-3000:]}")
    assert line.startswith("demo of ") and "http://127.0.0.1:" in line, line
    url = line.split(": ", 1)[1].split()[0]
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_the_server_answers_a_bad_request_with_the_field(demo_url):
    status, body = _post(demo_url + "api/generate", {"prompt": "a red circle", "num_inference_steps": 0})
    assert status == 400 and "num_inference_steps" in body["error"]
    status, body = _post(demo_url + "api/generate", {"prompt": "a red circle", "num_inference_steps": 1,
                                                     "num_images_per_prompt": 2})
    assert status == 200 and len(body["images"]) == 2 and body["images"][0].startswith("data:image/png;base64,")


def _browser():
    """Headless Chromium through chromedriver, both from the system (never Selenium Manager's download)."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium / chromedriver binary on PATH (Debian: apt-get install -y --no-install-recommends "
                    "chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_a_browser_types_a_prompt_and_sees_images_then_a_caption(demo_url, tmp_path):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(demo_url)
        field = browser.find_element(By.ID, "steps")
        assert field.get_attribute("value") == "250"  # the run's sample.steps, filled in by the page
        field.clear()
        field.send_keys("2")
        browser.find_element(By.ID, "n").clear()
        browser.find_element(By.ID, "n").send_keys("2")
        browser.find_element(By.ID, "prompt").send_keys("a large green star")
        browser.find_element(By.ID, "generate").click()
        shown = "return [...document.querySelectorAll('#images img')].filter(i => i.complete && i.naturalWidth > 0)" \
                ".map(i => [i.naturalWidth, i.naturalHeight])"
        sizes = WebDriverWait(browser, 60).until(lambda b: b.execute_script(shown) or False)
        assert sizes == [[32, 32], [32, 32]]  # two images at the debug run's resolution, decoded by the browser
        browser.save_screenshot(str(tmp_path / "demo_generate.png"))

        upload = tmp_path / "upload.png"
        Image.new("RGB", (48, 40), (200, 30, 30)).save(upload)
        browser.find_element(By.ID, "upload").send_keys(str(upload))
        browser.find_element(By.ID, "caption").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_element(By.ID, "cap-status").text.endswith(" s"))
        caption = browser.find_element(By.ID, "caption-text").text
        assert browser.find_element(By.ID, "cap-status").get_attribute("class") == "muted"  # not an error
        browser.save_screenshot(str(tmp_path / "demo_caption.png"))
    finally:
        browser.quit()
    assert caption  # the model's words, or the page's note that a 12-step model wrote none
    with Image.open(tmp_path / "demo_generate.png") as shot:
        low, high = shot.convert("L").getextrema()
        assert shot.size[0] >= 900 and high - low > 100  # a drawn page, not a blank one
    print(f"screenshots: {tmp_path}/demo_generate.png, demo_caption.png; caption {caption!r}")


def test_without_the_demo_extra_the_command_names_it(monkeypatch, tmp_path):
    from transfusion_mot.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as on a core install: import fastapi fails
    with pytest.raises(SystemExit, match=r"fastapi is not installed: it comes with the \[demo\] extra"):
        main(["demo", "--ckpt", str(tmp_path)])
