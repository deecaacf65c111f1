// Charts of the dashboard, drawn in the browser with uPlot (vendor/uplot, MIT).
//
// TK.Chart: a uPlot line chart with a min/max band per series (downsampled data), an EMA
// smoothing line (TensorBoard's debiased formula; the raw series faint behind), log-y,
// drag-to-zoom, Shift+drag pan, Ctrl/Alt+wheel zoom, double-click reset, markers with
// labels (checkpoints, resumes, best eval), hover values for every series, and CSV / JSON
// download of exactly what it shows. TK.Heatmap: the expert-load heatmap on a canvas.
// Zooming is reported to the page (onZoom), which loads detail and sets the range of
// every chart, so the charts of a run stay aligned.
(function () {
  "use strict";
  const TK = (window.TK = window.TK || {});

  // ----- numbers --------------------------------------------------------------------------
  TK.emaDebiased = function (values, weight) {
    // TensorBoard: last = last * w + (1 - w) * y; smoothed = last / (1 - w ** n), n = finite values so far.
    // Same formula as dashboard.downsample.ema_debiased (the server's PNGs).
    const out = new Array(values.length);
    let last = 0, n = 0;
    for (let i = 0; i < values.length; i++) {
      const y = values[i];
      if (y === null || y === undefined || !Number.isFinite(y)) { out[i] = null; continue; }
      if (weight <= 0) { out[i] = y; continue; }
      last = last * weight + (1 - weight) * y;
      n += 1;
      out[i] = last / (1 - Math.pow(weight, n));
    }
    return out;
  };

  TK.fmt = function (value, digits = 4) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    if (typeof value !== "number") return String(value);
    const abs = Math.abs(value);
    if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(2);
    return value.toFixed(abs >= 100 ? 0 : abs >= 10 ? 2 : digits > 3 && abs < 1 ? 4 : 3);
  };

  TK.palette = function () {
    const css = getComputedStyle(document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return {
      text: v("--text"), muted: v("--muted"), grid: v("--grid"), panel: v("--panel"), border: v("--border"),
      blue: v("--blue"), orange: v("--orange"), green: v("--green"), red: v("--red"), violet: v("--violet"),
      series: ["--blue", "--orange", "--green", "--pink", "--violet", "--cyan", "--yellow", "--lime", "--teal", "--red"].map(v),
    };
  };

  function withAlpha(color, alpha) {
    // "#rrggbb" -> rgba(); other forms are returned as they are
    const m = /^#([0-9a-f]{6})$/i.exec(color || "");
    if (!m) return color;
    const n = parseInt(m[1], 16);
    return `rgba(${(n >> 16) & 255},${(n >> 8) & 255},${n & 255},${alpha})`;
  }

  // lag measurements for the benchmark: per chart, [last step drawn, wall-clock ms]
  TK.draws = {};
  TK.recordDraw = function (id, lastStep) {
    const log = (TK.draws[id] = TK.draws[id] || []);
    const prev = log.length ? log[log.length - 1][0] : null;
    if (lastStep !== null && lastStep !== undefined && lastStep !== prev) {
      log.push([lastStep, Date.now()]);
      if (log.length > 5000) log.splice(0, 1000);
    }
  };

  // steps and tokens are whole numbers: no tick at step 2.5
  const COUNT_AXES = new Set(["step", "relstep", "tokens"]);

  const X_LABELS = { step: "step", time: "wall time", tokens: "tokens", relstep: "steps since the run's first",
                     reltime: "time since start" };

  function fmtDuration(seconds) {
    const s = Math.abs(seconds), sign = seconds < 0 ? "-" : "";
    if (s < 120) return `${sign}${Math.round(s)}s`;
    if (s < 7200) return `${sign}${Math.round(s / 60)}m`;
    if (s < 172800) return `${sign}${(s / 3600).toFixed(1)}h`;
    return `${sign}${(s / 86400).toFixed(1)}d`;
  }

  function xValueFormatter(mode) {
    if (mode === "time") return (v) => (v === null ? "–" : new Date(v * 1000).toLocaleString());
    if (mode === "reltime") return (v) => (v === null ? "–" : fmtDuration(v));
    return (v) => (v === null ? "–" : Math.round(v).toLocaleString("en-US"));
  }

  // y-axis labels with as many decimals as the tick spacing needs (uPlot's default prints 2e-4 as "0")
  function axisValues(u, splits, axisIdx, space, incr) {
    const big = Math.max(...splits.map((v) => Math.abs(v || 0)));
    if (big !== 0 && (big < 1e-3 || big >= 1e6)) {
      const digits = Math.max(0, Math.min(6, Math.ceil(Math.log10(big / Math.abs(incr || big))) ));
      return splits.map((v) => (v === null ? "" : v === 0 ? "0" : v.toExponential(digits)));
    }
    // as many decimals as the tick step has: 2.5 -> 1, 0.25 -> 2, 5 -> 0
    const step = Math.abs(incr || 1);
    let decimals = 0;
    while (decimals < 8 && Math.abs(Math.round(step * 10 ** decimals) - step * 10 ** decimals) > 1e-6 * 10 ** decimals) decimals++;
    return splits.map((v) => (v === null ? "" : v.toFixed(decimals)));
  }

  function csvCell(value) {
    if (value === null || value === undefined) return "";
    const text = String(value);
    return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function download(filename, text, type) {
    const blob = new Blob([text], { type });
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = filename;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 5000);
  }
  TK.download = download;
  TK.safeFilename = (text) => String(text).replace(/[^A-Za-z0-9._=-]+/g, "_").slice(0, 120) || "chart";

  // hover: the nearest point of each series that has one (compare overlays runs whose x differ)
  function nearestDefined(u, seriesIdx, closestIdx) {
    const ys = u.data[seriesIdx];
    if (!ys || closestIdx === null || closestIdx === undefined) return closestIdx;
    if (ys[closestIdx] !== undefined && ys[closestIdx] !== null) return closestIdx;
    const xs = u.data[0], x = xs[closestIdx];
    let lo = closestIdx - 1, hi = closestIdx + 1, best = null;
    for (let k = 0; k < 4000 && (lo >= 0 || hi < ys.length); k++, lo--, hi++) {
      if (lo >= 0 && ys[lo] !== undefined && ys[lo] !== null) { best = lo; }
      if (hi < ys.length && ys[hi] !== undefined && ys[hi] !== null &&
          (best === null || Math.abs(xs[hi] - x) < Math.abs(xs[best] - x))) { best = hi; }
      if (best !== null) return best;
    }
    return closestIdx;
  }

  // ----- markers --------------------------------------------------------------------------
  function markersPlugin(chart) {
    return {
      hooks: {
        draw: [(u) => {
          const markers = chart.markers || [];
          if (!markers.length) return;
          const ctx = u.ctx, { left, top, width, height } = u.bbox, dpr = devicePixelRatio || 1;
          const pal = chart.pal;
          ctx.save();
          ctx.beginPath();
          ctx.rect(left, top, width, height);
          ctx.clip();
          ctx.font = `${11 * dpr}px sans-serif`;
          ctx.textBaseline = "top";
          let lastLabelEnd = -Infinity;
          const lines = markers.filter((m) => m.y === undefined).sort((a, b) => a.x - b.x);
          for (const m of lines) {
            const px = u.valToPos(m.x, "x", true);
            if (!Number.isFinite(px) || px < left - 1 || px > left + width + 1) continue;
            ctx.strokeStyle = m.color || pal.muted;
            ctx.globalAlpha = m.faint ? 0.45 : 0.85;
            ctx.lineWidth = dpr;
            ctx.setLineDash((m.dash || []).map((d) => d * dpr));
            ctx.beginPath();
            ctx.moveTo(px, top);
            ctx.lineTo(px, top + height);
            ctx.stroke();
            if (m.label && px + 3 * dpr > lastLabelEnd) {
              const w = ctx.measureText(m.label).width;
              ctx.globalAlpha = 1;
              ctx.fillStyle = m.color || pal.muted;
              ctx.fillText(m.label, px + 3 * dpr, top + 2 * dpr);
              lastLabelEnd = px + 3 * dpr + w + 6 * dpr;
            }
          }
          ctx.setLineDash([]);
          for (const m of markers.filter((m) => m.y !== undefined && m.y !== null)) {
            const px = u.valToPos(m.x, "x", true), py = u.valToPos(m.y, m.scale || "y", true);
            if (!Number.isFinite(px) || !Number.isFinite(py)) continue;
            ctx.globalAlpha = 1;
            ctx.fillStyle = m.color || pal.orange;
            star(ctx, px, py, 7 * dpr);
            if (m.label) {
              ctx.fillText(m.label, Math.min(px + 9 * dpr, left + width - ctx.measureText(m.label).width - 2),
                           Math.max(top + 2 * dpr, py - 16 * dpr));
            }
          }
          ctx.restore();
        }],
      },
    };
  }

  function star(ctx, x, y, r) {
    ctx.beginPath();
    for (let i = 0; i < 10; i++) {
      const radius = i % 2 ? r * 0.45 : r, angle = -Math.PI / 2 + (i * Math.PI) / 5;
      ctx.lineTo(x + radius * Math.cos(angle), y + radius * Math.sin(angle));
    }
    ctx.closePath();
    ctx.fill();
  }

  // ----- the chart -----------------------------------------------------------------------
  // spec: {id, title, height, smoothable, band, logY, emptyText, y2Label,
  //        smoothing: () => weight, onZoom: (range | null) => void}
  // data (update()): {xMode, x: [...], step: [...], series: [{label, key, color?, scale?, value, min?, max?, points?}],
  //                   lastStep, note}
  class Chart {
    constructor(container, spec) {
      this.spec = spec;
      this.logY = !!spec.logY;
      this.range = null;
      this.markers = [];
      this.data = null;
      this.u = null;
      this.el = document.createElement("div");
      this.el.className = "chart" + (spec.wide ? " wide" : "");
      this.el.id = `chart-${spec.id}`;
      this.el.innerHTML = `<div class="chart-head"><span class="chart-title"></span><span class="chart-note"></span>
        <button class="small" data-act="logy" aria-pressed="false" title="logarithmic y axis">log y</button>
        <button class="small" data-act="reset" title="reset zoom (or double-click the chart)">reset</button>
        <button class="small" data-act="csv" title="download this chart's data as CSV">CSV</button>
        <button class="small" data-act="json" title="download this chart's data as JSON">JSON</button></div>
        <div class="plot-area"><div class="empty-note"></div></div>`;
      this.el.querySelector(".chart-title").textContent = spec.title;
      this.area = this.el.querySelector(".plot-area");
      this.emptyNote = this.el.querySelector(".empty-note");
      this.emptyNote.textContent = spec.emptyText || "no data yet";
      this.el.querySelector('[data-act="logy"]').addEventListener("click", () => this.setLogY(!this.logY));
      this.el.querySelector('[data-act="reset"]').addEventListener("click", () => spec.onZoom && spec.onZoom(null));
      this.el.querySelector('[data-act="csv"]').addEventListener("click", () => this.download("csv"));
      this.el.querySelector('[data-act="json"]').addEventListener("click", () => this.download("json"));
      container.appendChild(this.el);
      this.resizer = new ResizeObserver(() => {
        if (this.u) this.u.setSize({ width: this.width(), height: this.height() });
      });
      this.resizer.observe(this.area);
    }

    width() { return Math.max(200, this.area.clientWidth); }
    height() { return this.spec.height || 240; }

    setLogY(on) {
      this.logY = on;
      this.el.querySelector('[data-act="logy"]').setAttribute("aria-pressed", String(on));
      this.rebuild();
    }

    setNote(text) { this.el.querySelector(".chart-note").textContent = text || ""; }

    setMarkers(markers) {
      this.markers = markers || [];
      // an empty chart has no axes laid out yet: uPlot cannot redraw it before its first data
      if (this.u && this.u.data[0] && this.u.data[0].length) this.u.redraw(false, false);
    }

    setRange(range) {   // [min, max] in x units, or null for everything
      this.range = range;
      if (this.u) this.applyRange();
    }

    applyRange() {
      const xs = this.u.data[0];
      if (this.range) this.u.setScale("x", { min: this.range[0], max: this.range[1] });
      else if (xs && xs.length) this.u.setScale("x", { min: xs[0], max: xs[xs.length - 1] });
    }

    signature(data) {
      return [data.xMode, this.logY, ...data.series.map((s) => `${s.label}|${s.scale || "y"}|${!!s.points}`)].join("\n");
    }

    // the uPlot columns: x, then per series: raw, [smoothed], [min, max]
    columns() {
      const d = this.data, weight = this.spec.smoothable && this.spec.smoothing ? this.spec.smoothing() : 0;
      const clean = (ys) => (this.logY ? ys.map((y) => (y !== null && y !== undefined && y > 0 ? y : null)) : ys);
      const cols = [d.x];
      for (const s of d.series) {
        cols.push(clean(s.value));
        if (this.spec.smoothable) cols.push(clean(TK.emaDebiased(s.value, weight)));
        if (this.spec.band) { cols.push(clean(s.min || s.value)); cols.push(clean(s.max || s.value)); }
      }
      return cols;
    }

    build() {
      const d = this.data, pal = (this.pal = TK.palette()), spec = this.spec;
      const weight = () => (spec.smoothable && spec.smoothing ? spec.smoothing() : 0);
      const series = [{ label: X_LABELS[d.xMode] || d.xMode, value: (u, v) => xValueFormatter(d.xMode)(v) }];
      const bands = [];
      d.series.forEach((s, i) => {
        const color = s.color || pal.series[i % pal.series.length];
        const scale = s.scale || "y";
        const idx = series.length;
        series.push({
          label: s.label, scale, width: spec.smoothable ? 1 : 1.5, spanGaps: true,
          stroke: () => (weight() > 0 ? withAlpha(color, 0.28) : color),
          points: { show: !!s.points, size: 5, fill: color },
          value: (u, v, si, di) => this.legendValue(u, idx, v, di),
        });
        if (spec.smoothable) {
          series.push({ label: `${s.label} (EMA)`, scale, width: 1.8, spanGaps: true,
                        stroke: () => (weight() > 0 ? color : "transparent"), points: { show: false },
                        value: (u, v) => (weight() > 0 ? TK.fmt(v) : "–") });
        }
        if (spec.band) {
          const lo = series.length;
          series.push({ label: `${s.label} min`, scale, class: "band-edge", stroke: "transparent", spanGaps: true,
                        points: { show: false } });
          series.push({ label: `${s.label} max`, scale, class: "band-edge", stroke: "transparent", spanGaps: true,
                        points: { show: false } });
          bands.push({ series: [lo + 1, lo], fill: withAlpha(color, 0.16) });
        }
      });
      const axis = { stroke: pal.muted, grid: { stroke: pal.grid, width: 1 }, ticks: { stroke: pal.grid, width: 1 } };
      const yDistr = this.logY ? 3 : 1;
      const usesY2 = d.series.some((s) => s.scale === "y2");
      const opts = {
        width: this.width(), height: this.height(),
        series, bands,
        scales: { x: { time: d.xMode === "time" }, y: { distr: yDistr }, ...(usesY2 ? { y2: { distr: 1 } } : {}) },
        axes: [
          { ...axis, ...(d.xMode === "reltime" ? { values: (u, vals) => vals.map(fmtDuration) } : {}),
            ...(COUNT_AXES.has(d.xMode) ? { filter: (u, splits) => splits.map((v) => (Number.isInteger(v) ? v : null)) } : {}) },
          { ...axis, size: 64, values: axisValues },
          ...(usesY2 ? [{ ...axis, scale: "y2", side: 1, grid: { show: false }, size: 64, label: spec.y2Label,
                          values: axisValues }] : []),
        ],
        legend: { live: true },
        cursor: {
          drag: { x: true, y: false, setScale: false },
          sync: spec.syncKey ? { key: spec.syncKey } : undefined,
          dataIdx: (u, si, closest) => nearestDefined(u, si, closest),
          bind: { dblclick: () => null },
        },
        hooks: {
          draw: [() => this.showLatestInLegend()],
          setCursor: [() => this.showLatestInLegend()],
          setSelect: [(u) => {
            if (u.select.width > 4 && spec.onZoom) {
              const a = u.posToVal(u.select.left, "x"), b = u.posToVal(u.select.left + u.select.width, "x");
              spec.onZoom([a, b], this);
            }
            u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
          }],
        },
        plugins: [markersPlugin(this)],
      };
      if (this.u) this.u.destroy();
      this.u = new uPlot(opts, this.columns(), this.area);
      this.sig = this.signature(d);
      this.bindPanAndWheel();
      this.applyRange();
    }

    legendValue(u, idx, v, di) {
      if (v === null || v === undefined) return "–";
      const lo = this.spec.band ? u.data[idx + (this.spec.smoothable ? 2 : 1)] : null;
      const hi = this.spec.band ? u.data[idx + (this.spec.smoothable ? 3 : 2)] : null;
      if (lo && hi && di !== null && di !== undefined && lo[di] !== null && hi[di] !== null && lo[di] !== hi[di]) {
        return `${TK.fmt(v)} (${TK.fmt(lo[di])} … ${TK.fmt(hi[di])})`;
      }
      return TK.fmt(v);
    }

    bindPanAndWheel() {
      const u = this.u, over = u.over, spec = this.spec;
      over.addEventListener("dblclick", () => spec.onZoom && spec.onZoom(null));
      over.addEventListener("wheel", (e) => {
        if (!(e.ctrlKey || e.altKey || e.metaKey) || !spec.onZoom) return;   // plain wheel scrolls the page
        e.preventDefault();
        const { min, max } = u.scales.x, at = u.posToVal(e.offsetX, "x"), f = e.deltaY < 0 ? 0.75 : 1.33;
        spec.onZoom([at - (at - min) * f, at + (max - at) * f], this);
      }, { passive: false });
      over.addEventListener("mousedown", (e) => {
        if (!e.shiftKey || e.button !== 0 || !spec.onZoom) return;
        e.stopPropagation();   // no drag-to-zoom selection: this is a pan
        e.preventDefault();
        const startX = e.clientX, { min, max } = u.scales.x, perPx = (max - min) / u.bbox.width * (devicePixelRatio || 1);
        const move = (ev) => {
          const dv = (ev.clientX - startX) * perPx;
          u.setScale("x", { min: min - dv, max: max - dv });
        };
        const up = () => {
          window.removeEventListener("mousemove", move);
          window.removeEventListener("mouseup", up);
          spec.onZoom([u.scales.x.min, u.scales.x.max], this);
        };
        window.addEventListener("mousemove", move);
        window.addEventListener("mouseup", up);
      }, true);
    }

    rebuild() { if (this.data) this.build(); }

    // new data: rebuild the uPlot when the set of series changed, else only its data
    update(data) {
      this.data = data;
      const empty = !data.x.length || data.series.every((s) => s.value.every((v) => v === null || v === undefined));
      this.emptyNote.classList.toggle("hidden", !empty);
      this.el.dataset.points = String(data.x.length);
      this.el.dataset.lastStep = data.lastStep === null || data.lastStep === undefined ? "" : String(data.lastStep);
      if (!this.u || this.sig !== this.signature(data)) this.build();
      else {
        this.u.setData(this.columns(), true);
        if (this.range) this.applyRange();
      }
      TK.recordDraw(this.spec.id, data.lastStep);
    }

    redrawSmoothing() { if (this.u && this.data) { this.u.setData(this.columns(), false); } }

    // without a cursor on the chart, the legend shows the latest values
    showLatestInLegend() {
      const u = this.u;
      if (!u || !u.data || !u.data[0] || u.cursor.left >= 0) return;
      const n = u.data[0].length;
      if (!n) return;
      // each series' own latest point (overlaid runs end at different x)
      const idxs = u.data.map((ys, si) => {
        if (si === 0) return n - 1;
        for (let i = n - 1; i >= 0; i--) if (ys[i] !== null && ys[i] !== undefined) return i;
        return null;
      });
      u.setLegend({ idxs }, false);
    }

    // what the chart shows, as columns
    table() {
      const d = this.data;
      if (!d) return { columns: {} };
      const weight = this.spec.smoothable && this.spec.smoothing ? this.spec.smoothing() : 0;
      const columns = {};
      columns[d.xMode] = d.x;
      if (d.step && d.xMode !== "step") columns.step = d.step;
      for (const s of d.series) {
        columns[s.label] = s.value;
        if (this.spec.smoothable && weight > 0) columns[`${s.label} (EMA ${weight})`] = TK.emaDebiased(s.value, weight);
        if (this.spec.band && s.min && s.max) { columns[`${s.label} min`] = s.min; columns[`${s.label} max`] = s.max; }
      }
      return { columns };
    }

    download(kind) {
      const { columns } = this.table();
      const names = Object.keys(columns);
      if (!names.length) return;
      const base = TK.safeFilename(`${this.spec.filePrefix ? this.spec.filePrefix() + "-" : ""}${this.spec.id}`);
      if (kind === "json") {
        download(`${base}.json`, JSON.stringify({ chart: this.spec.title, x_axis: this.data.xMode, columns }, null, 1),
                 "application/json");
        return;
      }
      const rows = [names.map(csvCell).join(",")];
      const n = columns[names[0]].length;
      for (let i = 0; i < n; i++) rows.push(names.map((k) => csvCell(columns[k][i])).join(","));
      download(`${base}.csv`, rows.join("\n") + "\n", "text/csv");
    }
  }
  TK.Chart = Chart;

  // ----- expert load heatmap -----------------------------------------------------------------
  const HEAT = [[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]];   // plasma-like

  function heatColor(t) {
    if (!Number.isFinite(t)) return "rgba(128,128,128,.25)";
    const x = Math.min(1, Math.max(0, t)) * (HEAT.length - 1), i = Math.min(HEAT.length - 2, Math.floor(x)), f = x - i;
    const c = HEAT[i].map((a, k) => Math.round(a + (HEAT[i + 1][k] - a) * f));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function integerTicks(count, pixels, minGap) {
    // every k-th index with k a whole number, so no tick ever falls between two layers or experts
    const k = Math.max(1, Math.ceil((minGap * count) / Math.max(1, pixels)));
    const ticks = [];
    for (let i = 0; i < count; i += k) ticks.push(i);
    return ticks;
  }

  class Heatmap {
    constructor(container, spec) {
      this.spec = spec;
      this.el = document.createElement("div");
      this.el.className = "chart";
      this.el.id = `chart-${spec.id}`;
      this.el.innerHTML = `<div class="chart-head"><span class="chart-title"></span><span class="chart-note"></span>
        <button class="small" data-act="csv">CSV</button><button class="small" data-act="json">JSON</button></div>
        <div class="plot-area heatmap-wrap"><canvas></canvas><div class="heatmap-tip hidden"></div>
        <div class="empty-note"></div></div>`;
      this.el.querySelector(".chart-title").textContent = spec.title;
      this.canvas = this.el.querySelector("canvas");
      this.tip = this.el.querySelector(".heatmap-tip");
      this.emptyNote = this.el.querySelector(".empty-note");
      this.emptyNote.textContent = spec.emptyText || "no data yet";
      this.matrix = [];
      this.el.querySelector('[data-act="csv"]').addEventListener("click", () => this.download("csv"));
      this.el.querySelector('[data-act="json"]').addEventListener("click", () => this.download("json"));
      this.canvas.addEventListener("mousemove", (e) => this.hover(e));
      this.canvas.addEventListener("mouseleave", () => this.tip.classList.add("hidden"));
      container.appendChild(this.el);
      new ResizeObserver(() => this.draw()).observe(this.el);
    }

    update(matrix, step) {
      this.matrix = matrix || [];
      this.step = step;
      this.el.querySelector(".chart-note").textContent = step === null || step === undefined ? "" : `step ${step}`;
      this.emptyNote.classList.toggle("hidden", this.matrix.length > 0);
      this.draw();
    }

    layout() {
      const rows = this.matrix.length, cols = Math.max(0, ...this.matrix.map((r) => r.length));
      const width = Math.max(200, this.canvas.parentElement.clientWidth), height = this.spec.height || 240;
      const pad = { left: 44, right: 70, top: 8, bottom: 30 };
      return { rows, cols, width, height, pad, cw: (width - pad.left - pad.right) / Math.max(1, cols),
               ch: (height - pad.top - pad.bottom) / Math.max(1, rows) };
    }

    draw() {
      const L = this.layout(), dpr = devicePixelRatio || 1, pal = TK.palette();
      this.canvas.width = L.width * dpr;
      this.canvas.height = L.height * dpr;
      this.canvas.style.height = `${L.height}px`;
      const ctx = this.canvas.getContext("2d");
      ctx.scale(dpr, dpr);
      ctx.clearRect(0, 0, L.width, L.height);
      if (!L.rows || !L.cols) { this.ticks = { x: [], y: [] }; return; }
      const values = this.matrix.flat().filter(Number.isFinite);
      const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1;
      for (let r = 0; r < L.rows; r++) {
        for (let c = 0; c < L.cols; c++) {
          ctx.fillStyle = heatColor((this.matrix[r][c] - lo) / span);
          ctx.fillRect(L.pad.left + c * L.cw, L.pad.top + r * L.ch, Math.ceil(L.cw), Math.ceil(L.ch));
        }
      }
      ctx.fillStyle = pal.muted;
      ctx.font = "11px sans-serif";
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      const xt = integerTicks(L.cols, L.width - L.pad.left - L.pad.right, 28);
      const yt = integerTicks(L.rows, L.height - L.pad.top - L.pad.bottom, 16);
      for (const c of xt) ctx.fillText(String(c), L.pad.left + (c + 0.5) * L.cw, L.height - L.pad.bottom + 4);
      ctx.fillText("expert", L.pad.left + (L.width - L.pad.left - L.pad.right) / 2, L.height - 13);
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      for (const r of yt) ctx.fillText(String(r), L.pad.left - 6, L.pad.top + (r + 0.5) * L.ch);
      ctx.save();
      ctx.translate(10, L.pad.top + (L.height - L.pad.top - L.pad.bottom) / 2);
      ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "center";
      ctx.fillText("layer", 0, 0);
      ctx.restore();
      const barX = L.width - L.pad.right + 14, barH = L.height - L.pad.top - L.pad.bottom;
      for (let i = 0; i < barH; i++) {
        ctx.fillStyle = heatColor(1 - i / barH);
        ctx.fillRect(barX, L.pad.top + i, 12, 1.5);
      }
      ctx.fillStyle = pal.muted;
      ctx.textAlign = "left";
      ctx.textBaseline = "top";
      ctx.fillText(TK.fmt(hi), barX + 16, L.pad.top);
      ctx.textBaseline = "bottom";
      ctx.fillText(TK.fmt(lo), barX + 16, L.pad.top + barH);
      this.ticks = { x: xt, y: yt };
      this.el.dataset.xTicks = xt.join(",");
      this.el.dataset.yTicks = yt.join(",");
    }

    hover(e) {
      const L = this.layout();
      const c = Math.floor((e.offsetX - L.pad.left) / L.cw), r = Math.floor((e.offsetY - L.pad.top) / L.ch);
      if (r < 0 || c < 0 || r >= L.rows || c >= L.cols) { this.tip.classList.add("hidden"); return; }
      this.tip.textContent = `layer ${r}, expert ${c}: ${TK.fmt(this.matrix[r][c])} tokens`;
      this.tip.classList.remove("hidden");
      this.tip.style.left = `${Math.min(e.offsetX + 12, L.width - 180)}px`;
      this.tip.style.top = `${e.offsetY + 12}px`;
    }

    download(kind) {
      const base = TK.safeFilename(`${this.spec.filePrefix ? this.spec.filePrefix() + "-" : ""}${this.spec.id}`);
      if (kind === "json") {
        download(`${base}.json`, JSON.stringify({ chart: this.spec.title, step: this.step,
                                                  tokens_per_expert: this.matrix }), "application/json");
        return;
      }
      const cols = Math.max(0, ...this.matrix.map((r) => r.length));
      const lines = [["layer", ...Array.from({ length: cols }, (_, i) => `expert_${i}`)].join(",")];
      this.matrix.forEach((row, i) => lines.push([i, ...row.map(csvCell)].join(",")));
      download(`${base}.csv`, lines.join("\n") + "\n", "text/csv");
    }
  }
  TK.Heatmap = Heatmap;
})();
