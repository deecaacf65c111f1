"""The page in a real headless Chromium (Debian's chromium + chromium-driver, installed when missing):
charts drawn in the browser (uPlot) that gain points as the log grows, zoom, pan, hover, log-y, the
smoothing slider, compare, the failure banner, config, CSV download, both themes, and the token kept
out of every URL and Referer. Screenshots go to test-artifacts/ (gitignored)."""

from __future__ import annotations

import csv
import json
import os
import time
from urllib.parse import quote

import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

from dashboard import create_app
from dashboard.downsample import ema_debiased
from fake_runs import SyntheticRun, generate, write_big_log
from helpers_dashboard import REPO_ROOT, ThreadedServer, chromium_driver, ensure_chromium, get_json, wait_until

ARTIFACTS = REPO_ROOT / "test-artifacts"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def chromium():
    ensure_chromium()   # apt-get update && apt-get install chromium chromium-driver, once


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    runs = generate(root, seed=3)
    for name in ("lr=1e-4,bs=8", "lr=3e-4,bs=8"):                    # commas: compare must cope
        run = SyntheticRun(root, name, moe=False, total_steps=200, seed=len(name), start_time=time.time() - 900)
        for _ in range(120 if "1e-4" in name else 90):
            run.advance()
    write_big_log(root, 6000, name="long-run", start_time=time.time() - 7200)   # downsampled: 6,000 rows
    raw = os.fsencode(str(root)) + b"/caf\xe9-run"                   # a name that is not UTF-8
    os.makedirs(raw + b"/logs")
    with open(raw + b"/logs/training_log.jsonl", "w") as f:
        for step in range(1, 40):
            f.write(json.dumps({"step": step, "time": time.time() - 100 + step, "loss": 3.0 - step / 40}) + "\n")
    return runs


def start(root, **settings):
    app = create_app(str(root), poll_interval=0.2, **settings)
    server = ThreadedServer(app)
    server.__enter__()
    wait_until(lambda: (lambda h: h["runs"] == 9 and h["indexing_done"])(get_json(server.url + "/health")[1]),
               message="runs indexed")
    return server


@pytest.fixture
def server(runs, tmp_path):
    srv = start(tmp_path / "runs")
    yield srv
    srv.__exit__(None, None, None)


@pytest.fixture
def browser(chromium, server, tmp_path):
    # depends on server: pytest closes the browser first, then the server
    driver = chromium_driver(str(tmp_path / "profile"), height=1600)
    set_theme(driver, "dark")
    yield driver
    driver.quit()


def set_theme(driver, scheme):
    driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": scheme}]})


def text(driver, css):
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", css)


def open_page(driver, url):
    driver.get(url)
    wait_until(lambda: driver.execute_script("return document.body.dataset.ready") == "1", timeout=30,
               message="charts drawn")


CHART_STATE = """
const c = TK.charts[arguments[0]] || (arguments[0] === 'compare' ? TK.compare.chart : null);
if (!c || !c.u) return null;
const u = c.u;
return {points: u.data[0].length, lastStep: c.data.lastStep, xmin: u.scales.x.min, xmax: u.scales.x.max,
        x: u.data[0], distr: u.scales.y.distr, labels: u.series.slice(1).map((s) => s.label),
        columns: u.data.map((col) => col.length), hidden: c.el.classList.contains('hidden'),
        note: c.el.querySelector('.chart-note').textContent};
"""


def chart(driver, name):
    return driver.execute_script(CHART_STATE, name)


def legend_values(driver, name):
    return driver.execute_script("""
        const c = TK.charts[arguments[0]] || TK.compare.chart;
        return [...c.u.root.querySelectorAll('.u-legend .u-series:not(.band-edge)')].map(
            (row) => [row.querySelector('.u-label').textContent, row.querySelector('.u-value').textContent]);""", name)


def click(driver, css):
    """Click like a user, with the element scrolled clear of the sticky header."""
    element = driver.find_element(By.CSS_SELECTOR, css)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def screenshot(driver, name):
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / name))


def no_console_errors(driver):
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_charts_draw_in_the_browser_and_gain_points_as_the_log_grows(browser, server, runs):
    running = runs["moe-qlora-running"]
    open_page(browser, server.url + "/?run=moe-qlora-running")
    assert text(browser, "#run-name") == "moe-qlora-running" and text(browser, "#run-status") == "running"
    assert text(browser, "#progress-step") == "300" and text(browser, "#progress-total") == "1,000"
    for card in ("loss", "loss_smoothed", "lr", "tokens_per_sec", "grad_norm", "memory", "best_eval"):
        assert text(browser, f"#card-{card} .value") not in (None, "", "–"), card
    for name in ("loss", "lr", "grad_norm", "throughput", "memory", "router_aux_loss"):
        state = chart(browser, name)
        assert state["points"] == 300 and state["lastStep"] == 300 and not state["hidden"], name
    assert chart(browser, "eval")["points"] == 6 and chart(browser, "metric")["points"] == 6
    assert chart(browser, "distill")["hidden"]                       # a QLoRA run logs no KD loss
    wait_until(lambda: (chart(browser, "experts_imbalance") or {}).get("points", 0) == 15, message="expert chart")
    wait_until(lambda: browser.execute_script("return TK.heatmap.el.dataset.yTicks") == "0,1,2,3,4,5",
               message="heatmap with whole layer ticks")
    assert browser.execute_script("return TK.heatmap.el.dataset.xTicks") == "0,1,2,3,4,5,6,7"
    # checkpoint, resume and best markers with labels
    wait_until(lambda: len(browser.execute_script("return TK.charts.loss.markers")) == 3, message="checkpoint markers")
    labels = browser.execute_script("return TK.charts.loss.markers.map((m) => m.label)")
    assert any(label.startswith("best ") for label in labels) and any(label.startswith("ckpt ") for label in labels)
    assert browser.execute_script("return TK.charts.eval.markers[0].label").startswith("best ")
    resources = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert not any("/plots/" in r or ".png" in r for r in resources)   # no server-rendered image on the page
    assert not any(r.startswith("http") and not r.startswith(server.url) for r in resources)   # nothing off-host
    wait_until(lambda: "new best" in text(browser, "#events"), message="event timeline")
    wait_until(lambda: "ago (" in text(browser, "#events"), message="relative times with dates")
    screenshot(browser, "dashboard-dark.png")

    for _ in range(50):                                               # the run trains on: 50 steps, an eval at 350
        running.advance(now=time.time())
    with open(running.run_dir / "logs" / "training_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 351, "time": time.time(), "loss": 0.4321, "lr": 1e-4}) + "\n")
    wait_until(lambda: chart(browser, "loss")["lastStep"] == 351, timeout=20, message="loss chart reaches step 351")
    for name in ("loss", "lr", "grad_norm", "throughput", "memory"):
        assert chart(browser, name)["points"] == 351, name
    wait_until(lambda: chart(browser, "eval")["points"] == 7, message="eval chart gains the eval at 350")
    wait_until(lambda: text(browser, "#card-loss .value") == "0.4321", message="loss card")
    resources = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert any("since_step=300" in r and "stream=training" in r for r in resources)   # appended, not reloaded
    draws = browser.execute_script("return TK.draws.loss")
    assert draws[-1][0] == 351
    no_console_errors(browser)

    set_theme(browser, "light")
    wait_until(lambda: browser.execute_script(
        "return getComputedStyle(document.body).backgroundColor") == "rgb(245, 247, 251)", message="light theme")
    wait_until(lambda: browser.execute_script("return TK.charts.loss.pal.text") == "#1c2433", message="charts redrawn light")
    screenshot(browser, "dashboard-light.png")


def drag(driver, element, start_fraction, end_fraction):
    width = element.size["width"]
    actions = ActionChains(driver)
    actions.move_to_element_with_offset(element, int(width * (start_fraction - 0.5)), 0).click_and_hold()
    actions.move_by_offset(int(width * (end_fraction - start_fraction) / 2), 0)
    actions.move_by_offset(int(width * (end_fraction - start_fraction) / 2), 0).release().perform()


def test_zoom_pan_reset_and_hover_values(browser, server):
    open_page(browser, server.url + "/?run=long-run")
    overview = chart(browser, "loss")
    assert overview["lastStep"] == 6000 and overview["points"] <= 1000 and "mean of" in overview["note"]
    over = browser.find_element(By.CSS_SELECTOR, "#chart-loss .u-over")
    drag(browser, over, 0.30, 0.45)                                   # drag to zoom: ~900 of 6,000 steps
    wait_until(lambda: browser.execute_script("return TK.state.zoom") is not None, message="zoomed")
    zoom = browser.execute_script("return TK.state.zoom")
    assert 1000 < zoom[0] < zoom[1] < 3500 and zoom[1] - zoom[0] < 1500
    wait_until(lambda: chart(browser, "loss")["note"] == "", message="detail: one point per step")
    detail = chart(browser, "loss")
    inside = [x for x in detail["x"] if zoom[0] <= x <= zoom[1]]
    assert len(inside) >= int(zoom[1] - zoom[0]) - 1                  # every step of the range, not buckets
    assert abs(detail["xmin"] - zoom[0]) < 1 and abs(detail["xmax"] - zoom[1]) < 1
    lr = chart(browser, "lr")                                         # the run's charts zoom together
    assert abs(lr["xmin"] - zoom[0]) < 1 and abs(lr["xmax"] - zoom[1]) < 1
    assert "zoomed: steps" in text(browser, "#zoom-state")

    ActionChains(browser).move_to_element(over).perform()             # hover: a value for every series
    wait_until(lambda: all(v not in ("", "–", "--") for _, v in legend_values(browser, "loss")), message="loss legend")
    values = dict(legend_values(browser, "loss"))
    step_at_cursor = float(values["step"].replace(",", ""))
    assert zoom[0] <= step_at_cursor <= zoom[1] and float(values["loss"].split()[0]) > 0
    wait_until(lambda: all(v not in ("", "–", "--") for _, v in legend_values(browser, "memory")),
               message="synced hover on another chart")
    screenshot(browser, "dashboard-zoom-hover.png")

    before = browser.execute_script("return TK.state.zoom")           # Shift+drag pans
    width = over.size["width"]
    ActionChains(browser).move_to_element(over).key_down(Keys.SHIFT).click_and_hold().move_by_offset(
        -width // 4, 0).release().key_up(Keys.SHIFT).perform()
    wait_until(lambda: browser.execute_script("return TK.state.zoom")[0] > before[0] + 100, message="panned right")
    after = browser.execute_script("return TK.state.zoom")
    assert after[1] - after[0] == pytest.approx(before[1] - before[0], rel=0.02)

    click(browser, '#chart-loss [data-act="reset"]')
    wait_until(lambda: browser.execute_script("return TK.state.zoom") is None, message="reset")
    wait_until(lambda: "mean of" in chart(browser, "loss")["note"], message="overview again")
    reset = chart(browser, "loss")
    assert reset["xmin"] <= 1 and reset["xmax"] >= 6000
    no_console_errors(browser)


def test_log_y_smoothing_slider_and_windows(browser, server):
    open_page(browser, server.url + "/?run=dense-qlora-finished")
    button = browser.find_element(By.CSS_SELECTOR, '#chart-loss [data-act="logy"]')
    click(browser, '#chart-loss [data-act="logy"]')
    wait_until(lambda: chart(browser, "loss")["distr"] == 3, message="log y")
    assert button.get_attribute("aria-pressed") == "true" and chart(browser, "lr")["distr"] == 1
    click(browser, '#chart-loss [data-act="logy"]')
    wait_until(lambda: chart(browser, "loss")["distr"] == 1, message="linear again")

    raw = np.array(browser.execute_script("return TK.charts.loss.u.data[1]"), dtype=float)
    slider = browser.find_element(By.ID, "smoothing")
    slider.click()
    for _ in range(70):                                                # keyboard, as a user would
        slider.send_keys(Keys.ARROW_LEFT)
    wait_until(lambda: text(browser, "#smoothing-value") == "0.00", message="smoothing off")
    smoothed = np.array(browser.execute_script("return TK.charts.loss.u.data[2]"), dtype=float)
    np.testing.assert_allclose(smoothed, raw)
    assert "smoothing off" in text(browser, "#card-loss_smoothed .sub")
    for _ in range(90):
        slider.send_keys(Keys.ARROW_RIGHT)
    wait_until(lambda: text(browser, "#smoothing-value") == "0.90", message="smoothing 0.9")
    smoothed = np.array(browser.execute_script("return TK.charts.loss.u.data[2]"), dtype=float)
    np.testing.assert_allclose(smoothed, ema_debiased(raw, 0.9), rtol=1e-12)   # TensorBoard's debiased EMA
    assert abs(smoothed[0] - raw[0]) < 1e-9                            # debiased: no pull towards zero
    stroke = browser.execute_script("return [TK.charts.loss.u.series[1].stroke(), TK.charts.loss.u.series[2].stroke()]")
    assert stroke[0].startswith("rgba(") and stroke[0].endswith(",0.28)") and not stroke[1].startswith("rgba(")
    assert text(browser, "#card-loss_smoothed .value") == browser.execute_script(
        "return TK.fmt(TK.charts.loss.u.data[2].filter((v) => v !== null).pop())")
    screenshot(browser, "dashboard-smoothing.png")

    Select(browser.find_element(By.ID, "x-mode")).select_by_value("time")     # x axis by wall time
    wait_until(lambda: chart(browser, "loss")["x"][0] > 1e9, message="wall-time axis")
    Select(browser.find_element(By.ID, "x-mode")).select_by_value("tokens")
    wait_until(lambda: 0 < chart(browser, "loss")["x"][-1] != 400 and chart(browser, "eval")["x"][-1] > 1e5,
               message="tokens axis, eval placed through the training log")
    Select(browser.find_element(By.ID, "x-mode")).select_by_value("step")
    Select(browser.find_element(By.ID, "window")).select_by_value("1000")
    open_page(browser, server.url + "/?run=long-run")
    Select(browser.find_element(By.ID, "window")).select_by_value("1000")
    wait_until(lambda: chart(browser, "loss")["x"][0] >= 5000 and chart(browser, "loss")["note"] == "",
               message="last 1,000 steps, one point per step")
    no_console_errors(browser)


def test_compare_runs_with_commas_filter_alignment_and_errors(browser, server):
    open_page(browser, server.url + "/?run=dense-qlora-finished")
    browser.execute_script("document.getElementById('compare-section').scrollIntoView()")
    box = browser.find_element(By.ID, "compare-filter")
    box.send_keys("lr=")
    wait_until(lambda: {e.text for e in browser.find_elements(By.CSS_SELECTOR, "#compare-runs label")}
               == {"lr=1e-4,bs=8", "lr=3e-4,bs=8", *compare_selected(browser)}, message="filtered")   # chosen ones stay
    for label in browser.find_elements(By.CSS_SELECTOR, "#compare-runs label"):
        checkbox = label.find_element(By.TAG_NAME, "input")
        if checkbox.is_selected() != ("lr=" in label.text):
            checkbox.click()
    wait_until(lambda: compared_runs(browser) == {"lr=1e-4,bs=8", "lr=3e-4,bs=8"}, message="two runs overlaid")
    state = chart(browser, "compare")
    assert state["x"][-1] == 120 and state["x"][0] == 1
    assert text(browser, "#compare-error") == ""
    Select(browser.find_element(By.ID, "compare-align")).select_by_value("relstep")
    wait_until(lambda: chart(browser, "compare")["x"][0] == 0, message="relative steps")
    Select(browser.find_element(By.ID, "compare-key")).select_by_value("eval:eval_loss")
    wait_until(lambda: "eval_loss" in text(browser, "#chart-compare .chart-title"), message="eval key")
    wait_until(lambda: chart(browser, "compare")["points"] >= 2, message="eval points")
    ActionChains(browser).move_to_element(browser.find_element(By.CSS_SELECTOR, "#chart-compare .u-over")).perform()
    wait_until(lambda: all(v not in ("", "–", "--") for label, v in legend_values(browser, "compare")
                           if not label.endswith("(EMA)")), message="a hover value for each run")
    screenshot(browser, "dashboard-compare.png")
    # a run without the metric: said so, the others still drawn
    for label in browser.find_elements(By.CSS_SELECTOR, "#compare-runs label"):
        if label.text == "lr=3e-4,bs=8":
            label.find_element(By.TAG_NAME, "input").click()
    box.clear()
    box.send_keys(Keys.BACKSPACE)
    wait_until(lambda: "caf\\xe9-run" in text(browser, "#compare-runs"), message="every run listed again")
    for label in browser.find_elements(By.CSS_SELECTOR, "#compare-runs label"):
        if label.text == "caf\\xe9-run":
            label.find_element(By.TAG_NAME, "input").click()
    wait_until(lambda: "caf\\xe9-run has no eval_loss" in text(browser, "#compare-error"), message="clear error")
    assert compared_runs(browser) == {"lr=1e-4,bs=8"}
    no_console_errors(browser)


def compared_runs(driver):
    labels = (chart(driver, "compare") or {}).get("labels", [])
    return {label for label in labels if not label.endswith(("(EMA)", " min", " max"))}


def compare_selected(driver):
    return driver.execute_script("return [...TK.compare.selected]")


def test_failed_run_banner_config_and_csv_download(browser, server, runs, tmp_path):
    failed = runs["dense-lora-failed"]
    failed.log.update_run_info(config={"training": {"learning_rate": 2e-4}, "tracking": {"hf_token": "hf_SHOULD_NOT_SHOW"}})
    # the server has read the new run.json (the old config also has training.learning_rate, which the wait for
    # the config table below would take for the new one)
    wait_until(lambda: "tracking" in get_json(server.url + "/api/runs/dense-lora-failed")[1]["info"]["config"],
               message="run.json read again")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    open_page(browser, server.url + "/?run=" + quote("dense-lora-failed"))
    wait_until(lambda: "hidden" not in browser.find_element(By.ID, "failure").get_attribute("class"), message="banner")
    assert text(browser, "#failure-title") == "Run failed at step 180 · exit code 1 (from how it stopped)"
    assert text(browser, "#failure-reason").startswith("OutOfMemoryError: CUDA out of memory")
    assert "ended" in text(browser, "#failure-facts") and " ago (" in text(browser, "#failure-facts")
    banner_top = browser.find_element(By.ID, "failure").location["y"]
    assert banner_top < browser.find_element(By.ID, "cards").location["y"]     # at the top of the run
    browser.execute_script("window.scrollTo(0, 0)")
    screenshot(browser, "dashboard-failed-run.png")
    click(browser, "#config summary")
    wait_until(lambda: "training.learning_rate" in text(browser, "#config-table"), message="config table")
    assert "tracking.hf_token" in text(browser, "#config-table") and "***" in text(browser, "#config-table")
    assert "hf_SHOULD_NOT_SHOW" not in browser.page_source
    assert "transformers" in text(browser, "#versions-table")
    browser.execute_script("document.getElementById('errors-section').scrollIntoView()")
    screenshot(browser, "dashboard-config.png")

    click(browser, '#chart-loss [data-act="csv"]')
    target = downloads / "dense-lora-failed-loss.csv"
    wait_until(target.exists, message="CSV downloaded")
    rows = list(csv.reader(target.open()))
    assert rows[0] == ["step", "loss", "loss (EMA 0.6)", "loss min", "loss max"]
    assert len(rows) == 1 + 180 and rows[1][0] == "1" and rows[-1][0] == "180"
    click(browser, '#chart-eval [data-act="json"]')
    target = downloads / "dense-lora-failed-eval.json"
    wait_until(target.exists, message="JSON downloaded")
    data = json.loads(target.read_text())
    assert data["x_axis"] == "step" and data["columns"]["step"] == [50, 100, 150]
    assert len(data["columns"]["eval loss"]) == 3

    open_page(browser, server.url + "/?run=dense-stalled")
    wait_until(lambda: text(browser, "#failure-title").startswith("Run stalled at step 120 · exit code unknown"),
               message="stall banner")
    assert "last log" in text(browser, "#failure-facts")
    no_console_errors(browser)


def test_a_run_name_that_is_not_utf8_opens_without_errors(browser, server):
    """Before: picking it threw URIError in the page (and /metrics answered 500)."""
    open_page(browser, server.url + "/")
    picker = Select(browser.find_element(By.ID, "run-picker"))
    next(o for o in picker.options if o.get_attribute("value") == "caf\\xe9-run").click()   # a CSS selector would need escaping
    wait_until(lambda: (chart(browser, "loss") or {}).get("lastStep") == 39, message="its loss chart")
    assert text(browser, "#run-name") == "caf\\xe9-run"
    no_console_errors(browser)


def test_the_token_is_in_no_url_and_no_referer(runs, tmp_path, chromium):
    token = "tok-browser-0123456789-secret"
    app = create_app(str(tmp_path / "runs"), poll_interval=0.2, token=token)
    seen = []
    inner = app.wsgi_app

    def recording(environ, start_response):
        seen.append((environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""), environ.get("HTTP_REFERER", "")))
        return inner(environ, start_response)

    app.wsgi_app = recording
    with ThreadedServer(app) as srv:
        driver = chromium_driver(str(tmp_path / "profile-token"), height=1200)
        try:
            open_page(driver, srv.url + f"/?run=moe-resumed&token={token}")
            assert driver.current_url == srv.url + "/?run=moe-resumed"
            assert driver.execute_script("return document.cookie") == ""      # HttpOnly
            wait_until(lambda: len(seen) > 15, message="the page's requests")
            no_console_errors(driver)
        finally:
            driver.quit()
    assert token in seen[0][1]                                         # the link the user opened, and only it
    assert all(token not in query and token not in referer for _, query, referer in seen[1:]), seen
    assert all(referer == "" for _, _, referer in seen)                # Referrer-Policy: no-referrer


def test_a_run_that_has_not_logged_yet_gains_its_first_points(browser, server, runs, tmp_path):
    """The page opened before the first line (or while a big log is indexed): empty charts, then points."""
    fresh = SyntheticRun(tmp_path / "runs", "zz-fresh", moe=False, total_steps=50, start_time=time.time())
    wait_until(lambda: "zz-fresh" in [r["name"] for r in get_json(server.url + "/api/runs")[1]["runs"]],
               message="the fresh run listed")
    open_page(browser, server.url + "/?run=zz-fresh")
    assert chart(browser, "loss")["points"] == 0
    assert "hidden" not in browser.find_element(By.CSS_SELECTOR, "#chart-loss .empty-note").get_attribute("class")
    for _ in range(3):
        fresh.advance(now=time.time())
    wait_until(lambda: chart(browser, "loss")["lastStep"] == 3 and chart(browser, "lr")["points"] == 3,
               message="first points drawn")
    assert "hidden" in browser.find_element(By.CSS_SELECTOR, "#chart-loss .empty-note").get_attribute("class")
    no_console_errors(browser)


def test_an_undefined_metric_shows_as_undefined(browser, server, tmp_path):
    """A CoLA evaluation whose gold has one class: MCC (and task_score) are NaN, written by the real
    RunLog as null + nan_fields; the page says "undefined" for them, not a number or a blank."""
    from trainkit.loop import is_better
    from trainkit.runlog import RunLog
    from trainkit.tasks import Example, get_task

    cola, now = get_task("cola"), time.time()
    log = RunLog(tmp_path / "runs" / "zz-cola")
    log.update_run_info(run_name="zz-cola", script="train_lora.py", status="running", start_time=now - 60,
                        last_start_time=now - 60, total_steps=40, world_size=1)
    for step in range(1, 21):
        log.write("training", {"step": step, "time": now - 60 + step, "loss": 2.0 - step / 20, "lr": 1e-4})
    best = None
    for step, labels in ((10, [1, 0, 1, 0]), (20, [1, 1, 1, 1])):  # step 20's sample has one gold class
        metrics = cola.score(["acceptable"] * 3 + ["unacceptable"], [Example("p", " x", meta={"label": g}) for g in labels])
        score = metrics["mcc"]
        log.write("eval", {"step": step, "time": now - 40 + step, "task": "cola", "split": "validation",
                           "eval_loss": 1.0, "mcc": metrics["mcc"], "task_score": score, "metric": "task_score",
                           "metric_value": score, "is_best": is_better(score, best, True)})
        best = score if is_better(score, best, True) else best
    wait_until(lambda: "zz-cola" in [r["name"] for r in get_json(server.url + "/api/runs")[1]["runs"]],
               message="the CoLA run listed")
    wait_until(lambda: (get_json(server.url + "/api/runs/zz-cola/stats")[1].get("last_eval") or {}).get("step") == 20,
               message="both evaluations read")
    stats = get_json(server.url + "/api/runs/zz-cola/stats")[1]
    assert stats["last_eval"]["nan_fields"] == ["mcc", "task_score", "metric_value"]
    assert stats["best_eval"]["step"] == 10 and "nan_fields" not in stats["best_eval"]
    open_page(browser, server.url + "/?run=zz-cola")
    wait_until(lambda: text(browser, "#card-last_eval .value") == "undefined", message="latest eval card")
    assert "task_score @ step 20" in text(browser, "#card-last_eval .sub")
    assert "mcc undefined" in text(browser, "#card-last_eval .sub")
    assert text(browser, "#card-best_eval .value") == "57.74"  # step 10: 2 / sqrt(12) x100
    no_console_errors(browser)
