"""End-to-end: the comparison app served on localhost, driven in headless Debian Chromium via selenium.

Skips (with the reason) when gradio, selenium, chromium or chromedriver is missing. Locally:
``pip install "fastgen[app]" selenium`` and ``apt-get install -y chromium chromium-driver``. Paths can be
overridden with ``FASTGEN_CHROMIUM`` / ``FASTGEN_CHROMEDRIVER``. Screenshots go to pytest's tmp dir and,
when ``FASTGEN_ARTIFACTS`` is set, there too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import time

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio", reason='the app extra is not installed (pip install "fastgen[app]")')
pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")

CHROMIUM = os.environ.get("FASTGEN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("FASTGEN_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"headless browser not installed ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install -y chromium chromium-driver", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import fastgen  # noqa: E402
from fastgen.apps.app import PipelineCache, build_app, launch_kwargs  # noqa: E402

MODEL = "tiny-sd3"
WAIT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """The app on a free localhost port, in this process (the compute runs in gradio's worker threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: the browser needs the other core
    cache = PipelineCache()
    demo = build_app(MODEL, steps=2, repeats=1, cache=cache, concurrency=2)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                **launch_kwargs(demo))
    try:
        yield f"http://127.0.0.1:{port}/", cache
    finally:
        demo.close()
        torch.set_num_threads(threads)


@pytest.fixture
def browser(tmp_path):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,2200",
                 # nothing but this machine: the page must not need the internet (fonts, CDNs)
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"):
        opts.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    except WebDriverException as e:
        pytest.skip(f"chromium did not start under chromedriver: {e.msg}")
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _save_screenshot(driver, tmp_path, name: str) -> None:
    path = tmp_path / name
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000
    out = os.environ.get("FASTGEN_ARTIFACTS")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copy(path, os.path.join(out, name))


def _open(driver, url: str) -> None:
    driver.get(url)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#fastgen-generate"))


def _type(driver, css: str, text: str, enter: bool = False) -> None:
    el = driver.find_element(By.CSS_SELECTOR, css)
    el.click()
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(text)
    if enter:
        el.send_keys(Keys.ENTER)
    el.send_keys(Keys.TAB)  # blur: gradio commits the value


def _value(driver, elem_id: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input").get_property("value") or ""


def _setup(driver, seed: int, recipe: str) -> None:
    _type(driver, "#fastgen-seed input", str(seed))
    _type(driver, "#fastgen-recipe input", recipe, enter=True)
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, "#fastgen-recipe input")
                                    .get_property("value") == recipe)


def _wait_result(driver, seed: int, recipe: str) -> str:
    want = f"seed {seed} | {recipe} vs baseline"
    WebDriverWait(driver, WAIT_S).until(lambda d: _value(d, "fastgen-result").startswith(want))
    return _value(driver, "fastgen-result")


def _image_sizes(driver, elem_id: str) -> list[int]:
    imgs = driver.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
    return [driver.execute_script("return arguments[0].complete ? arguments[0].naturalWidth : 0", i) for i in imgs]


def _numbers(driver) -> dict[str, float]:
    def num(elem_id, unit):
        text = _value(driver, elem_id)
        assert text.endswith(unit), (elem_id, text)
        return float(text[: -len(unit)].strip().split()[0])

    return {"baseline_latency": num("fastgen-baseline-latency", "s"), "latency": num("fastgen-latency", "s"),
            "speedup": num("fastgen-speedup", "x"), "ssim": float(_value(driver, "fastgen-ssim")),
            "psnr": float("inf") if _value(driver, "fastgen-psnr").startswith("inf") else num("fastgen-psnr", "dB")}


def test_compare_in_browser(served, browser, tmp_path):
    url, cache = served
    _open(browser, url)
    _setup(browser, 3, "sampler:dpm++2m@1")
    browser.find_element(By.CSS_SELECTOR, "#fastgen-generate").click()
    assert "tiny-sd3 on cpu" in _wait_result(browser, 3, "sampler:dpm++2m@1")
    n = _numbers(browser)
    assert n["baseline_latency"] > 0 and n["latency"] > 0 and n["speedup"] > 0
    assert 0 < n["ssim"] <= 1 and n["psnr"] > 0
    assert "MB" in _value(browser, "fastgen-memory")
    # both images present and decoded (upscaled 32 px -> 256 px), the slider holds the pair, the plot is drawn
    WebDriverWait(browser, 30).until(lambda d: all(_image_sizes(d, e) and min(_image_sizes(d, e)) > 0
                                                   for e in ("fastgen-baseline-image", "fastgen-accel-image",
                                                             "fastgen-pareto")))
    assert _image_sizes(browser, "fastgen-baseline-image")[0] == _image_sizes(browser, "fastgen-accel-image")[0] == 256
    assert "sampler:dpm++2m@1" in _value(browser, "fastgen-history")
    summary_text = browser.find_element(By.CSS_SELECTOR, "#fastgen-summary").text
    assert "sampler:dpm++2m@1" in summary_text and "No exact evaluator" in summary_text
    _save_screenshot(browser, tmp_path, "fastgen-app-compare.png")

    # a bad recipe: a visible error, the page and the last results stay
    _type(browser, "#fastgen-recipe input", "nosuch:1", enter=True)
    browser.find_element(By.CSS_SELECTOR, "#fastgen-generate").click()
    WebDriverWait(browser, 30).until(lambda d: "unknown technique 'nosuch'" in d.find_element(By.TAG_NAME, "body").text)
    assert _value(browser, "fastgen-speedup").endswith("x")
    # the mobile target says what it runs, or what to install, instead of hiding
    browser.find_element(By.XPATH, "//*[@id='fastgen-target']//label[contains(., 'mobile')]").click()
    expect = "ExecuTorch XNNPACK program" if importlib.util.find_spec("executorch") else "fastgen[mobile]"
    WebDriverWait(browser, 30).until(lambda d: expect in d.find_element(By.CSS_SELECTOR, "#fastgen-target-note").text)
    _save_screenshot(browser, tmp_path, "fastgen-app-errors.png")
    assert fastgen.summary(cache.get(MODEL, "cpu").pipe)["recipe"] == "baseline"


def test_two_tabs_generate_at_once(served, browser, tmp_path):
    url, cache = served
    jobs = {"A": (11, "steps:1"), "B": (22, "sampler:dpm++2m@1")}
    handles = {}
    for i, (name, (seed, recipe)) in enumerate(jobs.items()):
        if i:
            browser.switch_to.new_window("tab")
        handles[name] = browser.current_window_handle
        _open(browser, url)
        _setup(browser, seed, recipe)
    t0 = time.perf_counter()
    for name in jobs:  # click both before either finishes
        browser.switch_to.window(handles[name])
        browser.find_element(By.CSS_SELECTOR, "#fastgen-generate").click()
    for name, (seed, recipe) in jobs.items():
        browser.switch_to.window(handles[name])
        _wait_result(browser, seed, recipe)
        assert _numbers(browser)["speedup"] > 0
        hist = _value(browser, "fastgen-history")
        other = [r for n, (_, r) in jobs.items() if n != name][0]
        assert recipe in hist and other not in hist, f"tab {name} sees another session's results: {hist!r}"
        WebDriverWait(browser, 30).until(lambda d: min(_image_sizes(d, "fastgen-accel-image") or [0]) > 0)
        _save_screenshot(browser, tmp_path, f"fastgen-app-tab-{name}.png")
    assert time.perf_counter() - t0 < WAIT_S
    assert fastgen.summary(cache.get(MODEL, "cpu").pipe)["recipe"] == "baseline"


#: The recipe `fastgen tune` found on shapes-mmdit (README, "fastgen tune"); override with FASTGEN_SHOWCASE_RECIPE.
SHOWCASE_RECIPE = os.environ.get("FASTGEN_SHOWCASE_RECIPE", "schedule:shapes-mmdit-euler4+gd+int8:dynamic")


@pytest.mark.slow
def test_zoo_model_with_the_tuned_recipe_side_by_side(browser, tmp_path):
    """The acceptance view: shapes-mmdit at its default 28-step CFG call against the tuned recipe, with the
    evaluator's verdict; the README's screenshot (``FASTGEN_ARTIFACTS=DIR`` saves it as DIR/fastgen-app-shapes-mmdit.png)."""
    from fastgen import zoo

    if not (zoo.weights_path("shapes-mmdit") / "model_index.json").exists():
        pytest.skip("shapes-mmdit weights are not installed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache = PipelineCache()
    demo = build_app("shapes-mmdit", repeats=3, cache=cache, concurrency=1)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                **launch_kwargs(demo))
    try:
        _open(browser, f"http://127.0.0.1:{port}/")
        _type(browser, "#fastgen-prompt textarea, #fastgen-prompt input", "a red triangle left of a blue circle")
        _setup(browser, 7, SHOWCASE_RECIPE)
        browser.find_element(By.CSS_SELECTOR, "#fastgen-generate").click()
        assert "shapes-mmdit on cpu" in _wait_result(browser, 7, SHOWCASE_RECIPE)
        n = _numbers(browser)
        assert n["speedup"] > 1.5
        WebDriverWait(browser, 30).until(lambda d: min(_image_sizes(d, "fastgen-accel-image") or [0]) > 0)
        summary_text = browser.find_element(By.CSS_SELECTOR, "#fastgen-summary").text
        assert "criterion" in summary_text and "overall" in summary_text
        _save_screenshot(browser, tmp_path, "fastgen-app-shapes-mmdit.png")
    finally:
        demo.close()
        torch.set_num_threads(threads)
        assert fastgen.summary(cache.get("shapes-mmdit", "cpu").pipe)["recipe"] == "baseline"
