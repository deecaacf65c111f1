// The dashboard page. Everything comes from /api/*. A live stream (/api/runs/<run>/stream)
// says which log streams changed; the page then fetches only what is new: chart data as
// increments (/metrics?since_step=...), appended to what it has, and panels whose version
// moved. Each kind of request has one in flight at a time; a newer one that replaces it
// (another run, another zoom) aborts it.
(function () {
  "use strict";
  const TK = window.TK;
  const $ = (id) => document.getElementById(id);
  const enc = encodeURIComponent;

  // the token never stays in the URL (the server redirects already; this covers a URL typed with it)
  if (new URLSearchParams(location.search).has("token")) {
    const url = new URL(location.href);
    url.searchParams.delete("token");
    history.replaceState(null, "", url);
  }

  const MAX_POINTS = 1000;           // per chart request; the server downsamples with a min/max band
  const RELOAD_POINTS = 3 * MAX_POINTS;  // appended points beyond this: fetch a fresh downsampled series
  const TRAINING_KEYS = ["loss", "lr", "grad_norm", "tokens_per_sec", "memory_allocated_gb", "memory_peak_gb",
                         "router_aux_loss", "time", "tokens"];
  const DISTILL_KEYS = ["kd_loss", "ce_loss", "top1_agreement"];
  const EVAL_BASE_KEYS = ["eval_loss", "perplexity", "metric_value", "is_best", "time"];
  // task metrics drawn from the eval log: the server's list (dashboard/plots.py METRIC_COLUMNS)
  const METRIC_KEYS = (document.body.dataset.metricColumns || "").split(",").filter(Boolean);

  const state = {
    run: null, runs: [], stats: null, versions: {}, source: null, pollTimer: null,
    xMode: "step", smoothing: 0.6, windowSteps: null, zoom: null,
    keys: { training: [], eval: [], experts: [] }, info: null,
    checkpoints: [], experts: null, readyAt: null,
  };
  TK.state = state;

  // ----- small helpers ----------------------------------------------------------------------
  async function getJSON(url, signal) {
    const response = await fetch(url, { cache: "no-store", signal });
    let body = null;
    try { body = await response.json(); } catch (err) { /* not JSON */ }
    if (!response.ok) {
      const error = new Error((body && body.message) || `${url}: HTTP ${response.status}`);
      error.status = response.status;
      error.body = body;
      throw error;
    }
    return body;
  }
  const aborted = (err) => err && err.name === "AbortError";

  const fmt = TK.fmt;
  function fmtInt(value) { return value === null || value === undefined ? "–" : Math.round(value).toLocaleString("en-US"); }
  function fmtBytes(value) {
    if (value === null || value === undefined) return "–";
    const units = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
    while (value >= 1024 && i < units.length - 1) { value /= 1024; i++; }
    return `${value.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  function fmtDuration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    seconds = Math.max(0, Math.round(seconds));
    const d = Math.floor(seconds / 86400), h = Math.floor((seconds % 86400) / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
    return d ? `${d}d ${h}h` : h ? `${h}h ${String(m).padStart(2, "0")}m` : m ? `${m}m ${String(s).padStart(2, "0")}s` : `${s}s`;
  }
  function escapeHtml(text) {
    return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  // relative times with dates: "3 h ago (30 Nov 2026, 10:02)"; refreshed every 30 s
  const relative = new Intl.RelativeTimeFormat("en", { numeric: "auto", style: "short" });
  function ago(unix) {
    const seconds = unix - Date.now() / 1000, abs = Math.abs(seconds);
    if (abs < 45) return relative.format(Math.round(seconds), "second");
    if (abs < 2700) return relative.format(Math.round(seconds / 60), "minute");
    if (abs < 64800) return relative.format(Math.round(seconds / 3600), "hour");
    return relative.format(Math.round(seconds / 86400), "day");
  }
  function dateText(unix) {
    return new Date(unix * 1000).toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric",
                                                             hour: "2-digit", minute: "2-digit" });
  }
  function timeHtml(unix, withDate = true) {
    if (!unix) return "–";
    const full = new Date(unix * 1000).toString();
    return `<time data-unix="${unix}" data-date="${withDate ? 1 : 0}" datetime="${new Date(unix * 1000).toISOString()}"
      title="${escapeHtml(full)}">${escapeHtml(timeLabel(unix, withDate))}</time>`;
  }
  function timeLabel(unix, withDate) { return withDate ? `${ago(unix)} (${dateText(unix)})` : ago(unix); }
  function refreshTimes() {
    document.querySelectorAll("time[data-unix]").forEach((el) => {
      el.textContent = timeLabel(Number(el.dataset.unix), el.dataset.date === "1");
    });
  }
  setInterval(refreshTimes, 30000);

  // A metric the trainer logged as NaN (undefined, e.g. MCC when gold has one class) is null in the
  // line and named in its nan_fields: shown as "undefined", not as a missing value.
  function evalValue(row, key) {
    if ((row.nan_fields || []).includes(key)) return "undefined";
    return row[key] === undefined ? "–" : fmt(row[key]);
  }
  function renderLastEval(row) {
    if (!row) { setCard("last_eval", "–", ""); return; }
    const metric = row.metric || "eval_loss";
    const key = row.metric ? "metric_value" : "eval_loss";
    const shown = METRIC_KEYS.filter((k) => k !== metric && (row[k] !== undefined || (row.nan_fields || []).includes(k)));
    const others = shown.map((k) => `${k} ${evalValue(row, k)}`);
    setCard("last_eval", evalValue(row, key), [`${metric} @ step ${fmtInt(row.step)}`, ...others].join(" · "));
  }

  function setCard(id, value, sub) {
    const card = $(`card-${id}`);
    const el = card.querySelector(".value");
    if (el.textContent !== value) {
      el.textContent = value;
      card.classList.remove("flash"); void card.offsetWidth; card.classList.add("flash");
    }
    if (sub !== undefined) card.querySelector(".sub").textContent = sub;
  }
  function setLive(on, text) { $("live").classList.toggle("on", on); $("live-text").textContent = text; }

  // ----- chart data: feeds ---------------------------------------------------------------------
  // A feed holds one stream's columns for the selected run: a downsampled series (or the zoomed /
  // windowed part of it) plus the raw rows appended since. Its charts redraw from it.
  class Feed {
    constructor(stream) { this.stream = stream; this.listeners = []; this.clear(); }
    clear() {
      this.revision = (this.revision || 0) + 1;   // every change of the rows: a load, an append, a trim, a clear
      if (this.controller) this.controller.abort();
      this.controller = null;
      this.step = []; this.cols = {}; this.keys = []; this.generation = null; this.lastStep = null;
      this.loaded = false; this.busy = false; this.again = null; this.bucketRows = 1; this.appended = 0;
      clearTimeout(this.deferred);
      this.deferred = null;
      this.lastRequest = 0;
    }
    wantedKeys() {
      const present = new Set(state.keys[this.stream] || []);
      if (this.stream === "training") return TRAINING_KEYS.concat(DISTILL_KEYS.filter((k) => present.has(k)));
      return EVAL_BASE_KEYS.concat(METRIC_KEYS.filter((k) => present.has(k)));
    }
    rangeQuery() {
      if (state.zoom) {
        const pad = (state.zoom[1] - state.zoom[0]) * 0.05;
        return `&start_step=${Math.max(0, state.zoom[0] - pad)}&end_step=${state.zoom[1] + pad}`;
      }
      if (state.windowSteps && state.stats && state.stats.step !== null) {
        return `&start_step=${Math.max(0, state.stats.step - state.windowSteps + 1)}`;   // the last N steps
      }
      return "";
    }
    // one request at a time; "load" replaces whatever is in flight, "update" waits its turn
    request(kind) {
      if (kind === "load" && this.controller) { this.controller.abort(); this.busy = false; }
      if (this.busy) { this.again = this.again === "load" || kind === "load" ? "load" : "update"; return; }
      this.busy = true;
      this.controller = new AbortController();
      const signal = this.controller.signal, run = state.run;
      const job = kind === "load" || !this.loaded ? this.load(run, signal) : this.update(run, signal);
      job.catch((err) => { if (!aborted(err)) console.warn(`${this.stream} data:`, err.message); })
        .finally(() => {
          if (signal.aborted) return;   // a newer request owns the feed now
          this.busy = false;
          this.controller = null;
          const again = this.again;
          this.again = null;
          if (again) this.request(again);
        });
    }
    url(run, extra) {
      this.keys = this.wantedKeys();
      return `/api/runs/${enc(run)}/metrics?stream=${this.stream}&keys=${this.keys.join(",")}&max_points=${MAX_POINTS}${extra}`;
    }
    async load(run, signal) {
      const data = await getJSON(this.url(run, this.rangeQuery()), signal);
      if (run !== state.run) return;
      this.step = data.step.slice();
      this.revision++;
      this.cols = {};
      for (const key of this.keys) {
        const s = data.series[key];
        this.cols[key] = { value: s.value.slice(), min: s.min.slice(), max: s.max.slice() };
      }
      this.generation = data.generation;
      this.lastStep = data.last_step;
      this.bucketRows = data.bucket_rows;
      this.appended = 0;
      this.loaded = true;
      this.emit();
    }
    async update(run, signal) {
      if (this.lastStep === null) return this.load(run, signal);
      const data = await getJSON(this.url(run, `&since_step=${this.lastStep}`), signal);
      if (run !== state.run) return;
      const keysChanged = this.keys.some((k) => !this.cols[k]);
      if (data.generation !== this.generation || keysChanged || data.downsampled) {
        return this.load(run, signal);   // a resume dropped rows, a key appeared, or too many new rows
      }
      if (!data.step.length) return;
      this.step.push(...data.step);
      this.revision++;
      for (const key of this.keys) {
        const s = data.series[key], c = this.cols[key];
        c.value.push(...s.value); c.min.push(...s.min); c.max.push(...s.max);
      }
      this.lastStep = data.last_step;
      this.appended += data.step.length;
      if (state.windowSteps && !state.zoom) this.trim(this.lastStep - state.windowSteps + 1);
      if (this.appended > RELOAD_POINTS) return this.load(run, signal);
      this.emit();
    }
    trim(firstStep) {
      let i = 0;
      while (i < this.step.length && this.step[i] < firstStep) i++;
      if (!i) return;
      this.revision++;
      this.step.splice(0, i);
      for (const c of Object.values(this.cols)) { c.value.splice(0, i); c.min.splice(0, i); c.max.splice(0, i); }
    }
    emit() { this.listeners.forEach((fn) => fn(this)); }
  }

  const feeds = { training: new Feed("training"), eval: new Feed("eval") };

  // step <-> x (wall time, tokens) through the training log, for the other streams and markers
  function xColumn(mode) {
    const f = feeds.training;
    if (mode === "step") return null;
    return f.cols[mode === "time" ? "time" : "tokens"];
  }
  function interpolate(xs, ys, x) {
    // ys at x, xs ascending; linear between neighbours, clamped at the ends
    let lo = 0, hi = xs.length - 1;
    if (hi < 0) return null;
    if (x <= xs[0]) return ys[0];
    if (x >= xs[hi]) return ys[hi];
    while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (xs[mid] <= x) lo = mid; else hi = mid; }
    const t = (x - xs[lo]) / (xs[hi] - xs[lo] || 1);
    return ys[lo] === null || ys[hi] === null ? ys[lo] ?? ys[hi] : ys[lo] + t * (ys[hi] - ys[lo]);
  }
  // (step, x) pairs of the training feed, kept until the feed changes: stepToX runs once per
  // expert snapshot and marker, and a scan of the whole feed each time was most of that work
  let pairsMemo = null;
  function monotonicPairs(mode) {
    const f = feeds.training;
    if (pairsMemo && pairsMemo.mode === mode && pairsMemo.revision === f.revision) return pairsMemo.pairs;
    const col = xColumn(mode), steps = [], xs = [];
    let pairs = null;
    if (col) {
      let last = -Infinity;
      for (let i = 0; i < f.step.length; i++) {
        const x = col.value[i];
        if (x === null || x === undefined || !(x > last)) continue;
        steps.push(f.step[i]); xs.push(x); last = x;
      }
      pairs = { steps, xs };
    }
    pairsMemo = { mode, revision: f.revision, pairs };
    return pairs;
  }
  function stepToX(step, mode = state.xMode) {
    if (mode === "step") return step;
    const p = monotonicPairs(mode);
    return p && p.steps.length ? interpolate(p.steps, p.xs, step) : null;
  }
  function xToStep(x, mode = state.xMode) {
    if (mode === "step") return x;
    const p = monotonicPairs(mode);
    return p && p.steps.length ? interpolate(p.xs, p.steps, x) : null;
  }

  // the x column and rows of a feed for the current x axis (rows without an x value are left out)
  function feedRows(feed) {
    const mode = state.xMode, x = [], rows = [];
    let own = null, pairs = null;
    if (mode !== "step") {
      if (feed.stream === "training" || (mode === "time" && feed.cols.time)) own = feed.cols[mode === "time" ? "time" : "tokens"];
      else pairs = monotonicPairs(mode);
    }
    let last = -Infinity;
    for (let i = 0; i < feed.step.length; i++) {
      let v = feed.step[i];
      if (own) v = own.value[i];
      else if (pairs) v = pairs.steps.length ? interpolate(pairs.steps, pairs.xs, feed.step[i]) : null;
      if (v === null || v === undefined || !(v > last)) continue;
      x.push(v); rows.push(i); last = v;
    }
    return { x, rows };
  }

  // ----- the charts of a run --------------------------------------------------------------------
  const charts = {};
  let heatmap = null;

  const CHARTS = [
    { id: "loss", feed: "training", title: "Training loss", series: [["loss", "loss"]], smoothable: true, band: true,
      markers: "training" },
    { id: "lr", feed: "training", title: "Learning rate", series: [["lr", "learning rate"]], band: true },
    { id: "grad_norm", feed: "training", title: "Gradient norm (before clipping)", series: [["grad_norm", "grad norm"]],
      smoothable: true, band: true },
    { id: "throughput", feed: "training", title: "Throughput (tokens/s)", series: [["tokens_per_sec", "tokens/s"]],
      smoothable: true, band: true },
    { id: "memory", feed: "training", title: "Device memory (GiB)",
      series: [["memory_allocated_gb", "allocated"], ["memory_peak_gb", "peak"]], band: true },
    { id: "router_aux_loss", feed: "training", title: "Router load-balancing loss", series: [["router_aux_loss", "aux loss"]],
      smoothable: true, band: true, onlyWithData: true },
    { id: "distill", feed: "training", title: "Distillation losses", series: [["kd_loss", "KD loss"], ["ce_loss", "CE loss"]],
      smoothable: true, band: true, onlyWithData: true },
    { id: "agreement", feed: "training", title: "Teacher top-1 agreement", series: [["top1_agreement", "agreement"]],
      smoothable: true, band: true, onlyWithData: true },
    { id: "eval", feed: "eval", title: "Eval loss and perplexity", series: [["eval_loss", "eval loss"], ["perplexity", "perplexity", "y2"]],
      points: true, markers: "best", y2Label: "perplexity", emptyText: "no evaluation yet" },
    { id: "metric", feed: "eval", title: "Eval metrics", series: "metrics", points: true, markers: "best-metric",
      emptyText: "no evaluation metric yet" },
  ];

  function chartSpec(def) {
    return {
      id: def.id, title: def.title, smoothable: !!def.smoothable, band: !!def.band, y2Label: def.y2Label,
      emptyText: def.emptyText, syncKey: "run", smoothing: () => state.smoothing,
      onZoom: (range) => zoomTo(range), filePrefix: () => state.run,
    };
  }

  function buildCharts() {
    for (const def of CHARTS) {
      const container = def.feed === "eval" ? $("charts-eval") : $("charts-training");
      charts[def.id] = { def, chart: new TK.Chart(container, chartSpec(def)) };
    }
    const imbalance = { id: "experts_imbalance", title: "Expert load imbalance (max / mean tokens per expert)",
                        emptyText: "dense model: no expert statistics" };
    charts.experts_imbalance = { def: imbalance, chart: new TK.Chart($("charts-experts"), chartSpec(imbalance)) };
    heatmap = new TK.Heatmap($("charts-experts"), { id: "experts_heatmap", title: "Expert load, tokens per expert (latest snapshot)",
                                                    emptyText: "dense model: no expert statistics", filePrefix: () => state.run });
  }

  function seriesOf(def) {
    if (def.series !== "metrics") return def.series;
    const present = new Set(state.keys.eval || []);
    const metrics = METRIC_KEYS.filter((k) => present.has(k)).map((k) => [k, k]);
    const metric = state.stats && state.stats.best_eval ? state.stats.best_eval.metric : null;
    if (!metrics.some(([k]) => k === metric)) metrics.unshift(["metric_value", metric || "metric_value"]);
    return metrics;
  }

  function renderFeedCharts(feed) {
    const { x, rows } = feedRows(feed);
    const lastStep = feed.step.length ? feed.step[feed.step.length - 1] : null;
    for (const { def, chart } of Object.values(charts)) {
      if (def.feed !== feed.stream) continue;
      const series = seriesOf(def).map(([key, label, scale], i) => {
        const col = feed.cols[key] || { value: [], min: [], max: [] };
        const pick = (arr) => rows.map((r) => (arr[r] === undefined ? null : arr[r]));
        return { key, label, scale, points: !!def.points, value: pick(col.value), min: pick(col.min), max: pick(col.max) };
      });
      const hasData = series.some((s) => s.value.some((v) => v !== null));
      chart.el.classList.toggle("hidden", !!def.onlyWithData && !hasData);
      chart.update({ xMode: state.xMode, x, step: rows.map((r) => feed.step[r]), series, lastStep });
      chart.setNote(feed.bucketRows > 1 ? `mean of ${feed.bucketRows} steps per point, band min–max` : "");
      chart.setRange(zoomInX());
    }
    if (feed.stream === "training") {
      updateSmoothedCard();
      refreshMarkers();
      if (state.xMode !== "step") renderFeedCharts(feeds.eval);   // their x comes through the training log
    }
    markReady();
  }
  feeds.training.listeners.push(renderFeedCharts);
  feeds.eval.listeners.push(renderFeedCharts);

  function zoomInX() {
    if (!state.zoom) return null;
    const a = stepToX(state.zoom[0]), b = stepToX(state.zoom[1]);
    return a === null || b === null || !(b > a) ? null : [a, b];
  }

  function zoomTo(range) {
    if (range) {
      const a = xToStep(Math.min(...range)), b = xToStep(Math.max(...range));
      if (a === null || b === null || !(b > a)) return;
      state.zoom = [a, b];
    } else {
      state.zoom = null;
    }
    $("zoom-state").textContent = state.zoom ? `zoomed: steps ${fmtInt(state.zoom[0])}–${fmtInt(state.zoom[1])}` : "";
    const x = zoomInX();
    for (const { chart } of Object.values(charts)) chart.setRange(x);
    feeds.training.request("load");   // detail for the range (or the whole run again)
    feeds.eval.request("load");
  }

  function updateSmoothedCard() {
    const loss = feeds.training.cols.loss;
    if (!loss) return;
    const smoothed = TK.emaDebiased(loss.value, state.smoothing);
    let last = null;
    for (let i = smoothed.length - 1; i >= 0; i--) if (smoothed[i] !== null) { last = smoothed[i]; break; }
    setCard("loss_smoothed", fmt(last), state.smoothing > 0 ? `EMA ${state.smoothing.toFixed(2)}, as charted` : "smoothing off");
  }

  function refreshMarkers() {
    const css = TK.palette();
    const toX = (step) => stepToX(step);
    const training = [];
    for (const c of state.checkpoints) {
      const x = toX(c.step);
      if (x === null) continue;
      training.push({ x, label: `${c.is_best ? "best " : c.final ? "final " : "ckpt "}${fmtInt(c.step)}`,
                      color: c.is_best ? css.green : css.muted, dash: c.state === "kept" ? [] : [3, 3],
                      faint: c.state !== "kept" });
    }
    for (const r of (state.stats && state.stats.resumes) || []) {
      const x = toX(r.to_step);
      if (x !== null) training.push({ x, label: `resume ${fmtInt(r.to_step)}`, color: css.red, dash: [6, 4] });
    }
    const best = state.stats && state.stats.best_eval;
    const evalMarkers = [], metricMarkers = [];
    if (best) {
      const x = toX(best.step);
      if (x !== null && best.eval_loss !== undefined) {
        evalMarkers.push({ x, y: best.eval_loss, label: `best ${fmt(best.eval_loss)} @ ${fmtInt(best.step)}`, color: css.orange });
      }
      if (x !== null && best.metric_value !== undefined && best.metric && best.metric !== "eval_loss") {
        metricMarkers.push({ x, y: best.metric_value, label: `best ${best.metric} ${fmt(best.metric_value)} @ ${fmtInt(best.step)}`,
                             color: css.orange });
      }
    }
    charts.loss.chart.setMarkers(training);
    charts.eval.chart.setMarkers(evalMarkers);
    charts.metric.chart.setMarkers(metricMarkers);
  }

  function markReady() {
    // time to interactive: every chart of the run drew its first data, and its figures (the first stats) are shown
    if (state.readyAt !== null || !feeds.training.loaded || !feeds.eval.loaded || state.stats === null) return;
    state.readyAt = performance.now();
    TK.readyMs = state.readyAt;
    document.body.dataset.ready = "1";
  }

  // ----- experts ------------------------------------------------------------------------------------
  async function loadExperts() {
    const run = state.run;
    const data = await getJSON(`/api/runs/${enc(run)}/experts`);
    if (run !== state.run) return;
    state.experts = data;
    const h = data.history, layers = data.layer_history;
    const steps = h.step;
    // per-layer history is sampled; put every series on the union of steps
    const table = uPlot.join([[steps, h.mean_load_imbalance], [layers.step, ...layers.load_imbalance]]);
    const x = table[0].map((s) => stepToX(s));
    const keep = x.map((v, i) => v !== null && (i === 0 || v > x[i - 1]));
    const pick = (col) => col.filter((_, i) => keep[i]);
    const series = [{ key: "mean", label: "mean over layers", value: pick(table[1]) }];
    layers.load_imbalance.forEach((_, i) => series.push({ key: `layer_${i}`, label: `layer ${i}`, value: pick(table[2 + i]) }));
    const chart = charts.experts_imbalance.chart;
    chart.update({ xMode: state.xMode, x: pick(x), step: pick(table[0]), series, lastStep: steps.length ? steps[steps.length - 1] : null });
    chart.setMarkers([]);
    chart.setRange(zoomInX());
    const matrix = (data.latest.layers || []).map((layer) => (Array.isArray(layer.tokens_per_expert) ? layer.tokens_per_expert : [])
      .map((v) => (typeof v === "number" ? v : NaN)));
    heatmap.update(matrix.filter((row) => row.length), data.latest.step);
  }

  // ----- runs ----------------------------------------------------------------------------------------
  async function loadRuns() {
    const data = await getJSON("/api/runs");
    state.runs = data.runs;
    const picker = $("run-picker");
    const wanted = state.run || new URLSearchParams(location.search).get("run");
    const signature = data.runs.map((r) => `${r.name}\u0000${r.status}`).join("\n");
    if (picker.dataset.signature !== signature) {
      picker.dataset.signature = signature;
      picker.innerHTML = "";
      for (const r of data.runs) {
        const option = document.createElement("option");
        option.value = r.name;
        option.textContent = `${r.name} — ${r.status}`;
        picker.appendChild(option);
      }
    }
    $("no-runs").classList.toggle("hidden", data.runs.length > 0);
    $("run-view").classList.toggle("hidden", data.runs.length === 0);
    const names = data.runs.map((r) => r.name);
    compare.runsChanged(data.runs);
    if (!names.length) { state.run = null; return; }
    const run = names.includes(wanted) ? wanted : names[0];
    picker.value = run;
    if (run !== state.run) selectRun(run);
  }

  function selectRun(run) {
    state.run = run; state.versions = {}; state.eventsSince = null; state.stats = null; state.zoom = null;
    state.checkpoints = []; state.keys = { training: [], eval: [], experts: [] }; state.readyAt = null;
    $("zoom-state").textContent = "";
    $("events").innerHTML = "";
    Object.values(feeds).forEach((f) => f.clear());
    for (const { chart } of Object.values(charts)) { chart.setRange(null); chart.setMarkers([]); }
    const url = new URL(location.href);
    url.searchParams.set("run", run);   // (the token left the URL when the page loaded)
    history.replaceState(null, "", url);
    loadKeys().then(() => { feeds.training.request("load"); feeds.eval.request("load"); }).catch(() => {});
    connect();
  }

  async function loadKeys() {
    const run = state.run;
    const data = await getJSON(`/api/runs/${enc(run)}/keys`);
    if (run !== state.run) return;
    const changed = ["training", "eval"].some((s) => String(data[s]) !== String(state.keys[s]));
    state.keys = { training: data.training, eval: data.eval, experts: data.experts };
    return changed;
  }

  // ----- live updates ------------------------------------------------------------------------------------
  function connect() {
    if (state.source) { state.source.close(); state.source = null; }
    clearTimeout(state.pollTimer);
    if (!state.run) return;
    const run = state.run;
    if (!window.EventSource) { poll(); return; }
    const source = new EventSource(`/api/runs/${enc(run)}/stream`);
    state.source = source;
    source.addEventListener("update", (e) => { setLive(true, "live"); applyStats(JSON.parse(e.data).stats); });
    source.addEventListener("bye", () => { source.close(); connect(); });
    source.addEventListener("gone", () => { source.close(); loadRuns(); });
    source.onerror = () => {
      // the stream is refused or broken: poll instead, try the stream again later
      source.close();
      if (state.source !== source) return;
      state.source = null;
      setLive(false, "polling");
      poll();
      setTimeout(() => { if (state.run === run && !state.source) connect(); }, 30000);
    };
  }

  async function poll() {
    clearTimeout(state.pollTimer);
    if (state.source || !state.run) return;
    try { applyStats(await getJSON(`/api/runs/${enc(state.run)}/stats`)); setLive(true, "polling"); }
    catch (err) { setLive(false, "offline"); }
    state.pollTimer = setTimeout(poll, 2000);
  }

  const changed = (stream, versions) => state.versions[stream] !== versions[stream];

  function applyStats(s) {
    if (!s || s.name !== state.run) return;
    const first = state.stats === null;
    state.stats = s;
    $("run-name").textContent = s.name;
    const badge = $("run-status");
    badge.textContent = s.status; badge.className = `badge status-${s.status}`;
    const bits = [s.script, s.model, s.is_moe ? "MoE" : null, s.attempt > 1 ? `attempt ${s.attempt}` : null]
      .filter(Boolean).map(escapeHtml);
    if (s.last_log_time) bits.push(`last log ${timeHtml(s.last_log_time, false)}`);
    $("run-meta").innerHTML = bits.join(" · ");
    $("progress-step").textContent = fmtInt(s.step);
    $("progress-total").textContent = fmtInt(s.total_steps);
    $("progress-pct").textContent = s.progress === null ? "–" : `${(s.progress * 100).toFixed(1)}%`;
    $("progress-bar").style.width = `${((s.progress || 0) * 100).toFixed(2)}%`;
    $("progress-eta").textContent = s.status === "running" ? fmtDuration(s.eta_seconds) : s.status;
    $("progress-elapsed").textContent = s.start_time && s.last_log_time ? fmtDuration(s.last_log_time - s.start_time) : "–";
    $("progress-started").innerHTML = timeHtml(s.start_time);
    renderFailure(s.failure, s);

    setCard("loss", fmt(s.loss), s.step === null ? "latest logged" : `step ${fmtInt(s.step)}`);
    setCard("lr", fmt(s.lr), s.epoch === null ? "" : `epoch ${fmt(s.epoch, 3)}`);
    setCard("tokens_per_sec", fmtInt(s.tokens_per_sec), s.tokens === null ? "" : `${fmtInt(s.tokens)} tokens seen`);
    setCard("grad_norm", fmt(s.grad_norm), "before clipping");
    setCard("memory", s.memory_allocated_gb === null ? "–" : `${fmt(s.memory_allocated_gb, 2)} GiB`,
            s.memory_peak_gb === null ? "" : `peak ${fmt(s.memory_peak_gb, 2)} GiB`);
    const best = s.best_eval;
    setCard("best_eval", best ? fmt(best.metric_value ?? best.eval_loss) : "–",
            best ? `${best.metric || "eval_loss"} @ step ${fmtInt(best.step)}` : `${s.evals} evaluations`);
    renderLastEval(s.last_eval);

    const skipped = Object.values(s.skipped_lines || {}).reduce((n, reasons) =>
      n + Object.values(reasons).reduce((a, b) => a + b, 0), 0);
    $("skipped-notice").textContent = skipped ? `${skipped} malformed log line(s) skipped` : "";
    $("skipped-notice").classList.toggle("hidden", !skipped);
    if (s.indexing && !s.indexing.done) setLive(true, `indexing ${Math.round(100 * s.indexing.bytes_read / Math.max(1, s.indexing.bytes_total))}%`);

    const v = s.versions;
    $("experts-section").classList.toggle("hidden", !s.is_moe);
    if (changed("training", v)) requestWhileIndexing(feeds.training, s.indexing && !s.indexing.done);
    if (changed("eval", v) || changed("info", v)) {
      loadKeys().then((keysChanged) => feeds.eval.request(keysChanged ? "load" : "update")).catch(() => {});
    }
    if (s.is_moe && changed("experts", v)) serialized("experts", loadExperts);
    if (changed("events", v)) serialized("events", loadEvents);
    if (changed("checkpoints", v) || changed("events", v) || changed("eval", v)) serialized("checkpoints", loadCheckpoints);
    if (changed("errors", v) || changed("info", v)) serialized("errors", loadErrors);
    if (changed("info", v)) { serialized("info", loadInfo); if (!first) loadRuns().catch(() => {}); }
    if (!first) refreshMarkers();
    state.versions = { ...v };
    markReady();
  }

  // While a big log is being indexed every pass brings thousands of rows: fetch (a fresh downsampled
  // series) at most every INDEXING_FETCH_MS, so the page does not slow the indexing down.
  const INDEXING_FETCH_MS = 2000;
  function requestWhileIndexing(feed, indexing) {
    const wait = (feed.lastRequest || 0) + INDEXING_FETCH_MS - Date.now();
    if (indexing && wait > 0) {
      if (!feed.deferred) feed.deferred = setTimeout(() => requestWhileIndexing(feed, false), wait);
      return;
    }
    clearTimeout(feed.deferred);
    feed.deferred = null;
    feed.lastRequest = Date.now();
    feed.request("update");
  }

  const inflight = {};
  function serialized(name, load) {
    // one request per panel at a time, so an older answer never lands after a newer one;
    // a change during a request runs it once more afterwards
    if (inflight[name]) { inflight[name].again = true; return; }
    inflight[name] = { again: false };
    load().catch(() => {}).finally(() => {
      const again = inflight[name].again;
      inflight[name] = null;
      if (again) serialized(name, load);
    });
  }

  // ----- the failure banner ---------------------------------------------------------------------------
  function renderFailure(f, s) {
    const banner = $("failure");
    banner.classList.toggle("hidden", !f);
    if (!f) return;
    banner.className = `banner ${f.kind}`;
    const step = f.step !== null && f.step !== undefined ? f.step : s.step;
    const code = f.exit_code === null || f.exit_code === undefined
      ? "exit code unknown" : `exit code ${f.exit_code}${f.exit_code_source === "inferred" ? " (from how it stopped)" : ""}`;
    const what = { failed: "Run failed", nan_stop: "Run stopped: too many non-finite losses", stalled: "Run stalled",
                   preempted: "Run preempted" }[f.kind];
    $("failure-title").textContent = `${what} at step ${fmtInt(step)} · ${code}`;
    $("failure-reason").textContent = f.reason || "";
    const facts = [];
    if (f.time) facts.push(`${f.kind === "stalled" ? "last log" : "ended"} ${timeHtml(f.time)}`);
    if (f.kind === "stalled" && f.process && f.process !== "unknown") facts.push(`process ${escapeHtml(f.process)}`);
    if (f.error_type) facts.push(`<a href="#errors-section">traceback in Errors</a>`);
    $("failure-facts").innerHTML = facts.join(" · ");
  }

  // ----- panels ---------------------------------------------------------------------------------------
  async function loadEvents() {
    const run = state.run;
    const since = state.eventsSince === null ? "" : `&since=${state.eventsSince}`;
    const data = await getJSON(`/api/runs/${enc(run)}/events?limit=300${since}`);
    if (run !== state.run) return;
    if (state.eventsSince === null) $("events").innerHTML = "";
    state.eventsSince = data.latest_time;
    const items = data.events.map((e) => `<li><span class="step">${fmtInt(e.step)}</span>
        <span class="ev ev-${escapeHtml(e.event)}">${escapeHtml(String(e.event).replace(/_/g, " "))}</span>
        <span>${escapeHtml(e.message || "")} <span class="muted">${timeHtml(e.time)}</span></span></li>`).reverse().join("");
    $("events").insertAdjacentHTML("afterbegin", items);
    while ($("events").children.length > 500) $("events").lastElementChild.remove();
    $("events-empty").classList.toggle("hidden", $("events").children.length > 0);
  }

  async function loadCheckpoints() {
    const run = state.run;
    const data = await getJSON(`/api/runs/${enc(run)}/checkpoints`);
    if (run !== state.run) return;
    state.checkpoints = data.checkpoints;
    const rows = data.checkpoints.slice().reverse().map((c) => `<tr class="${c.state}">
        <td>${fmtInt(c.step)}</td><td>${escapeHtml(c.name)}</td>
        <td>${c.metric_value === null ? "–" : `${escapeHtml(c.metric_name || "")} ${fmt(c.metric_value)}`}</td>
        <td>${fmtBytes(c.size_bytes)}</td><td>${timeHtml(c.time, false)}</td>
        <td>${c.is_best ? '<span class="tag best">best</span> ' : ""}<span class="tag ${c.state}">${c.state}</span></td></tr>`);
    $("checkpoints").querySelector("tbody").innerHTML = rows.join("");
    $("checkpoints-empty").classList.toggle("hidden", rows.length > 0);
    refreshMarkers();
  }

  async function loadErrors() {
    const run = state.run;
    const data = await getJSON(`/api/runs/${enc(run)}/errors?limit=50`);
    if (run !== state.run) return;
    $("errors-count").textContent = data.total ? `(${data.total})` : "";
    if (!data.errors.length && !data.fatal_error) { $("errors").innerHTML = '<div class="muted">no errors</div>'; return; }
    const fatal = data.fatal_error && !data.errors.some((e) => e.fatal)
      ? `<div class="error fatal"><b>run failed:</b> ${escapeHtml(data.fatal_error)}</div>` : "";
    $("errors").innerHTML = fatal + data.errors.slice().reverse().map((e) => `<div class="error ${e.fatal ? "fatal" : ""}">
        <details${e.fatal ? " open" : ""}><summary><b>${escapeHtml(e.type || "error")}</b> at step ${fmtInt(e.step)}${e.fatal ? " · fatal" : ""}:
          ${escapeHtml(e.message || "")} <span class="muted">${timeHtml(e.time)}</span></summary>
        ${e.traceback ? `<pre>${escapeHtml(e.traceback)}</pre>` : '<div class="muted">no traceback</div>'}</details></div>`).join("");
  }

  function flatten(value, prefix, out) {
    if (value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length) {
      for (const [k, v] of Object.entries(value)) flatten(v, prefix ? `${prefix}.${k}` : k, out);
    } else {
      out.push([prefix, typeof value === "string" ? value : JSON.stringify(value)]);
    }
    return out;
  }
  function tableRows(pairs) {
    return pairs.map(([k, v]) => `<tr><td class="key">${escapeHtml(k)}</td><td class="val">${escapeHtml(v)}</td></tr>`).join("");
  }

  async function loadInfo() {
    const run = state.run;
    const data = await getJSON(`/api/runs/${enc(run)}`);
    if (run !== state.run) return;
    const info = (state.info = data.info || {});
    $("config-path").textContent = info.config_path ? `· ${info.config_path}` : "";
    $("config-table").querySelector("tbody").innerHTML =
      tableRows(flatten(info.config || {}, "", [])) || '<tr><td class="muted">run.json has no config</td></tr>';
    $("versions-table").querySelector("tbody").innerHTML =
      tableRows(Object.entries(info.versions || {}).map(([k, v]) => [k, String(v)]));
    const keys = ["script", "host", "pid", "world_size", "num_machines", "mixed_precision", "resumed_from", "status", "error"];
    const pairs = keys.filter((k) => info[k] !== undefined && info[k] !== null).map((k) => [k, String(info[k])]);
    for (const k of ["start_time", "last_start_time", "end_time"]) {
      if (typeof info[k] === "number") pairs.push([k, `${ago(info[k])} (${dateText(info[k])})`]);
    }
    $("runinfo-table").querySelector("tbody").innerHTML = tableRows(pairs);
  }

  // ----- GPUs --------------------------------------------------------------------------------------------
  function sparkline(values, max, color) {
    const points = values.map((v, i) => `${(i / Math.max(1, values.length - 1)) * 100},${40 - (Math.min(v ?? 0, max) / max) * 38}`);
    return `<svg viewBox="0 0 100 40" preserveAspectRatio="none"><polyline fill="none" stroke="${color}" stroke-width="1.5"
            vector-effect="non-scaling-stroke" points="${points.join(" ")}"/></svg>`;
  }

  async function loadGpus() {
    try {
      const data = await getJSON("/api/gpu");
      if (!data.available) {
        $("gpus").innerHTML = `<div class="panel muted" id="gpu-unavailable">No GPU telemetry: ${escapeHtml(data.reason)}</div>`;
      } else {
        const pal = TK.palette();
        $("gpus").innerHTML = data.gpus.map((g) => {
          const history = g.history || [];
          return `<div class="panel gpu"><div class="title"><span>GPU ${g.index} · ${escapeHtml(g.name || "")}</span>
            <span>${g.utilization_percent ?? "–"}%</span></div>
            <div class="kv"><div><span>memory</span> ${fmtBytes(g.memory_used_bytes)} / ${fmtBytes(g.memory_total_bytes)}</div>
            <div><span>temp</span> ${g.temperature_c ?? "–"} °C</div>
            <div><span>power</span> ${fmt(g.power_watts, 0)} / ${fmt(g.power_limit_watts, 0)} W</div>
            <div><span>clocks</span> ${g.sm_clock_mhz ?? "–"} / ${g.memory_clock_mhz ?? "–"} MHz</div>
            <div class="span2"><span>processes</span> ${g.processes.map((p) =>
              `${p.pid} ${escapeHtml(p.name.split(" ")[0].split("/").pop())} (${fmtBytes(p.memory_used_bytes)})`).join(", ") || "none"}</div></div>
            ${sparkline(history.map((h) => h.utilization_percent), 100, pal.blue)}
            ${g.memory_total_bytes ? sparkline(history.map((h) => h.memory_used_bytes), g.memory_total_bytes, pal.green) : ""}</div>`;
        }).join("");
      }
    } catch (err) { /* keep the last cards */ }
    setTimeout(loadGpus, 3000);
  }

  // ----- compare ---------------------------------------------------------------------------------------
  const compare = {
    selected: new Set(), versions: "", keysCache: {}, controller: null, chart: null, initialized: false,

    init() {
      this.chart = new TK.Chart($("compare-chart"), {
        id: "compare", title: "Compare", smoothable: true, band: true, wide: true, height: 300,
        smoothing: () => Number($("compare-smoothing").value),
        onZoom: (range) => this.chart.setRange(range ? [Math.min(...range), Math.max(...range)] : null),
        filePrefix: () => "compare",
      });
      $("compare-filter").addEventListener("input", () => this.renderChoices());
      $("compare-key").addEventListener("change", () => this.refresh(true));
      $("compare-align").addEventListener("change", () => this.refresh(true));
      $("compare-smoothing").addEventListener("input", () => {
        $("compare-smoothing-value").textContent = Number($("compare-smoothing").value).toFixed(2);
        this.chart.redrawSmoothing();
      });
    },

    runsChanged(runs) {
      const names = runs.map((r) => r.name);
      if (!this.initialized && names.length) {
        names.slice(0, 3).forEach((n) => this.selected.add(n));
        this.initialized = true;
      }
      for (const n of [...this.selected]) if (!names.includes(n)) this.selected.delete(n);
      this.renderChoices();
      const versions = runs.filter((r) => this.selected.has(r.name)).map((r) => `${r.name}:${JSON.stringify(r.versions)}`).join("\n");
      if (versions !== this.versions) { this.versions = versions; this.refresh(false); }
    },

    renderChoices() {
      const filter = $("compare-filter").value.trim().toLowerCase();
      const box = $("compare-runs");
      const shown = state.runs.filter((r) => this.selected.has(r.name) || !filter || r.name.toLowerCase().includes(filter));
      const signature = `${filter}\n${shown.map((r) => r.name).join("\n")}\n${[...this.selected].join("\n")}`;
      if (box.dataset.signature === signature) return;
      box.dataset.signature = signature;
      box.innerHTML = "";
      for (const r of shown) {
        const label = document.createElement("label");
        const input = document.createElement("input");
        input.type = "checkbox";
        input.value = r.name;
        input.checked = this.selected.has(r.name);
        input.addEventListener("change", () => {
          if (input.checked) this.selected.add(r.name); else this.selected.delete(r.name);
          this.refresh(true);
        });
        label.append(input, document.createTextNode(` ${r.name}`));
        box.appendChild(label);
      }
      if (!shown.length) box.innerHTML = '<span class="muted">no run name matches the filter</span>';
    },

    async keyOptions(names) {
      // the union of the numeric fields the chosen runs logged
      const keys = new Set();
      await Promise.all(names.map(async (name) => {
        const run = state.runs.find((r) => r.name === name);
        const cacheKey = `${name}\n${run ? JSON.stringify(run.versions) : ""}`;
        if (!this.keysCache[cacheKey]) this.keysCache[cacheKey] = getJSON(`/api/runs/${enc(name)}/keys`).catch(() => null);
        const data = await this.keysCache[cacheKey];
        if (!data) return;
        for (const stream of ["training", "eval"]) for (const k of data[stream]) if (k !== "time") keys.add(`${stream}:${k}`);
      }));
      return [...keys].sort((a, b) => (a.startsWith("training:loss") ? -1 : b.startsWith("training:loss") ? 1 : a.localeCompare(b)));
    },

    async refresh(userAction) {
      if (!this.chart) return;
      if (this.controller) this.controller.abort();   // a newer choice replaces the request in flight
      const controller = (this.controller = new AbortController());
      const names = [...this.selected];
      const error = $("compare-error"), note = $("compare-note");
      error.classList.add("hidden");
      try {
        const options = await this.keyOptions(names);
        if (controller.signal.aborted) return;
        const select = $("compare-key"), current = select.value || "training:loss";
        if (select.dataset.options !== options.join("\n")) {
          select.dataset.options = options.join("\n");
          select.innerHTML = "";
          for (const o of options) {
            const option = document.createElement("option");
            option.value = o;
            option.textContent = o.startsWith("training:") ? o.slice(9) : `${o.slice(5)} (eval)`;
            select.appendChild(option);
          }
          select.value = options.includes(current) ? current : options[0] || "";
        }
        if (!names.length) { this.chart.update({ xMode: "step", x: [], series: [], lastStep: null }); note.textContent = "choose runs to compare"; return; }
        const [stream, key] = (select.value || "training:loss").split(/:(.*)/s);
        const align = $("compare-align").value;
        const xKey = align === "tokens" ? "tokens" : align === "time" || align === "reltime" ? "time" : null;
        const keys = [key, ...(xKey && xKey !== key ? [xKey] : [])];
        const missing = [];
        const results = await Promise.all(names.map((name) =>
          getJSON(`/api/runs/${enc(name)}/metrics?stream=${stream}&keys=${keys.map(enc).join(",")}&max_points=${MAX_POINTS}`,
                  controller.signal).catch((err) => {
            if (aborted(err)) throw err;
            missing.push(`${name}: ${err.message}`);
            return null;
          })));
        if (controller.signal.aborted) return;
        const tables = [], series = [];
        results.forEach((data, i) => {
          if (!data) return;
          const s = data.series[key];
          let xs = data.step;
          if (xKey) xs = data.series[xKey].value;
          if (align === "relstep") xs = data.step.map((v) => v - data.step[0]);
          if (align === "reltime") {
            const run = state.runs.find((r) => r.name === names[i]);
            const t0 = (run && run.start_time) || xs.find((v) => v !== null);
            xs = xs.map((v) => (v === null ? null : v - t0));
          }
          const rows = [];
          let last = -Infinity;
          xs.forEach((x, j) => { if (x !== null && x > last) { rows.push(j); last = x; } });
          if (!rows.length || s.value.every((v) => v === null)) { missing.push(`${names[i]} has no ${key}${xKey ? ` with ${xKey}` : ""}`); return; }
          tables.push([rows.map((j) => xs[j]), rows.map((j) => s.value[j]), rows.map((j) => s.min[j]), rows.map((j) => s.max[j])]);
          series.push({ key: names[i], label: names[i] });
        });
        const joined = tables.length ? uPlot.join(tables) : [[]];
        series.forEach((s, i) => {
          s.value = joined[1 + 3 * i]; s.min = joined[2 + 3 * i]; s.max = joined[3 + 3 * i];
        });
        this.chart.el.querySelector(".chart-title").textContent = `Compare: ${key}${stream === "eval" ? " (eval)" : ""}`;
        this.chart.update({ xMode: align, x: joined[0], series, lastStep: null });
        if (userAction) this.chart.setRange(null);
        note.textContent = series.length ? `${series.length} run(s)` : "";
        if (missing.length) {
          error.textContent = `not shown: ${missing.join("; ")}`;
          error.classList.remove("hidden");
        }
      } catch (err) {
        if (aborted(err)) return;
        error.textContent = err.message;
        error.classList.remove("hidden");
      }
    },
  };
  TK.compare = compare;

  // ----- controls, start ---------------------------------------------------------------------------------
  function rerenderAll() {
    renderFeedCharts(feeds.training);
    renderFeedCharts(feeds.eval);
    if (state.experts) loadExperts().catch(() => {});
  }

  document.addEventListener("DOMContentLoaded", () => {
    buildCharts();
    compare.init();
    TK.charts = Object.fromEntries(Object.entries(charts).map(([k, v]) => [k, v.chart]));
    TK.heatmap = heatmap;
    TK.feeds = feeds;
    $("run-picker").addEventListener("change", (e) => selectRun(e.target.value));
    $("x-mode").addEventListener("change", (e) => { state.xMode = e.target.value; rerenderAll(); });
    $("smoothing").addEventListener("input", (e) => {
      state.smoothing = Number(e.target.value);
      $("smoothing-value").textContent = state.smoothing.toFixed(2);
      for (const { chart } of Object.values(charts)) chart.redrawSmoothing();
      updateSmoothedCard();
    });
    $("window").addEventListener("change", (e) => {
      state.windowSteps = e.target.value ? Number(e.target.value) : null;
      state.zoom = null;
      $("zoom-state").textContent = "";
      for (const { chart } of Object.values(charts)) chart.setRange(null);
      feeds.training.request("load");
      feeds.eval.request("load");
    });
    // a light or dark system theme: charts take their colours from the CSS variables
    window.matchMedia("(prefers-color-scheme: light)").addEventListener("change", () => {
      for (const { chart } of Object.values(charts)) chart.rebuild();
      compare.chart.rebuild();
      heatmap.draw();
    });
    loadRuns().catch(() => setLive(false, "offline"));
    setInterval(() => loadRuns().catch(() => setLive(false, "offline")), 5000);
    loadGpus();
  });
})();
