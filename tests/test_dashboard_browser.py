"""The page in a real headless Chromium (Debian's chromium + chromium-driver, installed when missing):
cards and plots render, and they change when the log grows. Screenshot: test-artifacts/dashboard.png."""

from __future__ import annotations

import json
import time

import pytest

from dashboard import create_app
from dashboard.fake_runs import generate
from dashboard.testing import REPO_ROOT, ThreadedServer, chromium_driver, ensure_chromium, wait_until

ARTIFACTS = REPO_ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def chromium():
    ensure_chromium()   # apt-get update && apt-get install chromium chromium-driver, once


@pytest.fixture
def runs(tmp_path):
    return generate(tmp_path / "runs", seed=3)


@pytest.fixture
def server(runs, tmp_path):
    app = create_app(str(tmp_path / "runs"), poll_interval=0.2)
    with ThreadedServer(app) as srv:
        yield srv


@pytest.fixture
def browser(chromium, server, tmp_path):
    # depends on server: pytest closes the browser first, then the server
    driver = chromium_driver(str(tmp_path / "profile"))
    yield driver
    driver.quit()


def text(driver, css):
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)


def plot_state(driver, name):
    """(src, naturalWidth) of a plot's <img>: width > 0 once a PNG decoded."""
    return driver.execute_script(
        "const i = document.querySelector(`#plot-${arguments[0]} img`); return [i.getAttribute('src'), i.naturalWidth];",
        name)


@pytest.mark.slow
def test_page_renders_and_updates_live(browser, server, runs):
    running = runs["moe-qlora-running"]
    browser.get(server.url + "/")
    wait_until(lambda: text(browser, "#card-loss .value") not in (None, "–"), timeout=20, message="loss card")
    assert text(browser, "#run-name") == "moe-qlora-running"
    assert text(browser, "#run-status") == "running"
    assert text(browser, "#progress-step") == "300" and text(browser, "#progress-total") == "1,000"
    for card in ("loss", "loss_smoothed", "lr", "tokens_per_sec", "grad_norm", "memory", "best_eval"):
        assert text(browser, f"#card-{card} .value") not in (None, "", "–"), card
    for plot in ("loss", "eval", "metric", "lr", "grad_norm", "throughput", "memory", "experts_heatmap", "experts_imbalance"):
        wait_until(lambda: plot_state(browser, plot)[1] > 0, timeout=20, message=f"plot {plot}")
    wait_until(lambda: plot_state(browser, "compare")[1] > 0, timeout=20, message="compare plot")
    assert "hidden" not in browser.find_element("id", "experts-section").get_attribute("class")
    # panels load on their own requests: wait for each
    wait_until(lambda: len(browser.find_elements("css selector", "#checkpoints tbody tr")) == 3,
               timeout=10, message="checkpoint table")
    assert "deleted" in text(browser, "#checkpoints") and "best" in text(browser, "#checkpoints")
    wait_until(lambda: "new best" in text(browser, "#events"), timeout=10, message="event timeline")
    wait_until(lambda: "NonFiniteLoss" in text(browser, "#errors"), timeout=10, message="error panel")
    wait_until(lambda: "No GPU telemetry" in text(browser, "#gpus"), timeout=10, message="GPU panel")
    assert all(not s.get_attribute("src") for s in browser.find_elements("tag name", "script"))
    picker = [o.text for o in browser.find_elements("css selector", "#run-picker option")]
    assert len(picker) == 5 and any("stalled" in o for o in picker) and any("failed" in o for o in picker)

    before_loss = text(browser, "#card-loss .value")
    before_plot = plot_state(browser, "loss")[0]
    before_heatmap = plot_state(browser, "experts_heatmap")[0]
    before_throughput = plot_state(browser, "throughput")[0]
    for _ in range(50):                        # the run trains on: 50 more steps and an eval at 350
        running.advance(now=time.time())
    with open(running.run_dir / "logs" / "training_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 351, "time": time.time(), "loss": 0.4321, "lr": 1e-4}) + "\n")
    wait_until(lambda: text(browser, "#progress-step") == "351", timeout=20, message="progress update")
    wait_until(lambda: text(browser, "#card-loss .value") == "0.4321", timeout=10, message="loss card update")
    assert text(browser, "#card-loss .value") != before_loss
    wait_until(lambda: plot_state(browser, "loss")[0] != before_plot and plot_state(browser, "loss")[1] > 0,
               timeout=20, message="loss plot redrawn")
    wait_until(lambda: text(browser, "#events li .step") == "350", timeout=10, message="new events on top")

    wait_until(lambda: browser.execute_script(
        "return [...document.querySelectorAll('.plot img')].every((i) => !i.dataset.wanted || i.dataset.wanted === i.dataset.loaded)"),
        timeout=20, message="every plot shows its newest version")
    assert plot_state(browser, "experts_heatmap")[0] != before_heatmap   # snapshots at 320 and 340 came
    assert plot_state(browser, "throughput")[0] != before_throughput
    ARTIFACTS.mkdir(exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not severe, severe

    # another run from the picker: the page follows it
    browser.get(server.url + "/?run=dense-lora-failed")
    wait_until(lambda: text(browser, "#run-status") == "failed", timeout=20, message="failed run")
    wait_until(lambda: "OutOfMemoryError" in text(browser, "#errors"), timeout=10, message="error panel")
    assert "hidden" in browser.find_element("id", "experts-section").get_attribute("class")
