"""Server-side plots (matplotlib, Agg backend) for /api/.../plots/<name>.png and other tools.

The page draws its own charts in the browser from /api/runs/<run>/metrics; these PNGs are
off its path. Each plot names the log streams it depends on; the cache key holds those
streams' versions, so a plot is drawn again only after its data changed, and concurrent
requests for the same plot wait for one drawing. Data is copied (downsampled) under the
run's lock and drawn outside it.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

import numpy as np

from .downsample import ema_debiased

PLOT_POINTS = 1200
DEFAULT_SMOOTHING = 0.6   # TensorBoard's default EMA weight for the smoothed loss
# eval_log fields drawn on the "metric" plot when a run logs them (trainkit.runlog.EVAL_FIELDS)
METRIC_COLUMNS = ("task_score", "accuracy", "f1", "mcc", "pearson", "spearman", "accuracy_matched",
                  "accuracy_mismatched", "rouge1", "rouge2", "rougeL", "exact_match", "execution_accuracy", "bleu",
                  "eval_kd_loss", "eval_top1_agreement")
CACHE_ENTRIES = 256
LOG_Y_PLOTS = ("loss", "lr", "grad_norm", "throughput")   # plots that take ?log_y=1

# name -> (title, streams it depends on)
PLOTS = {
    "loss": ("Training loss", ("training", "events", "checkpoints")),
    "eval": ("Eval loss and perplexity", ("eval",)),
    "metric": ("Eval metrics (task metrics, distillation)", ("eval",)),
    "lr": ("Learning rate", ("training",)),
    "grad_norm": ("Gradient norm", ("training",)),
    "throughput": ("Throughput (tokens/s)", ("training",)),
    "memory": ("Device memory (GiB)", ("training",)),
    "experts_heatmap": ("Expert load (latest snapshot)", ("experts",)),
    "experts_imbalance": ("Expert load imbalance", ("experts",)),
}

BG, PANEL, GRID, TEXT, MUTED = "#0f1623", "#151e2e", "#263248", "#d8e0ee", "#8a97ad"
BLUE, ORANGE, GREEN, PINK, VIOLET = "#4ea1ff", "#ffb547", "#3ddc97", "#ff6b8b", "#a78bfa"
COLORS = [BLUE, ORANGE, GREEN, PINK, VIOLET, "#22d3ee", "#f472b6", "#facc15"]

# matplotlib is not thread-safe (shared font and text caches): one drawing at a time. Requests
# for a plot someone is drawing already wait on that drawing's own lock, not on the queue.
_render_lock = threading.Lock()
_drawing: dict = {}                # cache key -> lock held while that plot is drawn
_drawing_lock = threading.Lock()
_cache: OrderedDict = OrderedDict()
_matplotlib = None


def _pyplot_free_imports():
    """Import matplotlib lazily (it costs ~0.3 s and ~30 MB; the API may never draw)."""
    global _matplotlib
    if _matplotlib is None:
        import matplotlib
        matplotlib.use("Agg", force=True)
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        _matplotlib = (Figure, FigureCanvasAgg)
    return _matplotlib


def cached_png(key: tuple, draw, size: tuple = (7.2, 3.2)) -> bytes:
    """PNG for ``key``, drawing it with ``draw(fig)`` only when not cached."""
    png = _cache.get(key)
    if png is not None:
        return png
    with _drawing_lock:
        mine = _drawing.setdefault(key, threading.Lock())
    with mine:   # a second request for this plot waits here for the first one's drawing
        png = _cache.get(key)
        if png is not None:
            return png
        with _render_lock:
            Figure, FigureCanvasAgg = _pyplot_free_imports()
            fig = Figure(figsize=size, dpi=100, facecolor=BG)
            FigureCanvasAgg(fig)
            draw(fig)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", facecolor=BG)
        png = buffer.getvalue()
        _cache[key] = png
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    with _drawing_lock:
        _drawing.pop(key, None)
    return png


def _axes(fig, title: str, ylabel: str = ""):
    ax = fig.add_subplot(111)
    ax.set_facecolor(PANEL)
    ax.set_title(title, color=TEXT, fontsize=11, loc="left", pad=8)
    ax.tick_params(colors=MUTED, labelsize=8)
    for spine in ax.spines.values():
        spine.set_color(GRID)
    ax.grid(True, color=GRID, linewidth=0.6, alpha=0.8)
    ax.set_xlabel("step", color=MUTED, fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, color=MUTED, fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.97, top=0.88, bottom=0.16)
    return ax


def _empty(ax, message: str = "no data yet") -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", color=MUTED, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(ax) -> None:
    legend = ax.legend(fontsize=8, facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT, loc="best")
    legend.get_frame().set_alpha(0.9)


def _series_plot(fig, title, steps, data, key, color, label=None, log_y=False, band=True):
    ax = _axes(fig, title)
    series = data["series"].get(key)
    if series is None or not np.isfinite(series["value"]).any():
        _empty(ax)
        return ax
    if band and data["downsampled"]:
        ax.fill_between(steps, series["min"], series["max"], color=color, alpha=0.18, linewidth=0,
                        label="min-max per bucket")
    ax.plot(steps, series["value"], color=color, linewidth=1.3, label=label or key)
    if log_y and np.nanmin(series["value"]) > 0:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5))
        ax.yaxis.get_offset_text().set_color(MUTED)
    return ax


def render(run, name: str, smoothing: float = DEFAULT_SMOOTHING, log_y: bool = False) -> bytes:
    """PNG bytes of plot ``name`` for ``run`` (a RunState); ``smoothing`` is the loss plot's EMA weight,
    ``log_y`` a logarithmic y axis for the training-series plots."""
    streams = PLOTS[name][1]
    key = ("run", run.name, name, tuple(run.versions[s] for s in streams), smoothing if name == "loss" else None,
           log_y and name in LOG_Y_PLOTS)
    png = _cache.get(key)
    if png is not None:
        return png
    snapshot = _snapshot(run, name)
    snapshot.update(smoothing=smoothing, log_y=log_y)
    return cached_png(key, lambda fig: _DRAW[name](fig, snapshot))


def _snapshot(run, name: str) -> dict:
    with run.lock:
        if name in ("loss", "lr", "grad_norm", "throughput", "memory"):
            table = run.training
            keys = {"loss": ["loss"], "lr": ["lr"], "grad_norm": ["grad_norm"],
                    "throughput": ["tokens_per_sec"],
                    "memory": ["memory_allocated_gb", "memory_peak_gb"]}[name]
            snap = {"data": table.downsample(keys, PLOT_POINTS)}
            if name == "loss":
                snap["checkpoints"] = [(c["step"], c["state"], c["is_best"]) for c in run.checkpoints]
                snap["resumes"] = [r["to_step"] for r in table.resumes]
            return snap
        if name == "eval":
            return {"steps": run.eval.steps.copy(), "eval_loss": run.eval.column("eval_loss").copy(),
                    "perplexity": run.eval.column("perplexity").copy(), "best": run.best_eval()}
        if name == "metric":
            present = [k for k in METRIC_COLUMNS if k in run.eval.columns]
            return {"steps": run.eval.steps.copy(), "metric": run.eval.strings.get("metric"),
                    "metric_value": run.eval.column("metric_value").copy(),
                    "series": {k: run.eval.column(k).copy() for k in present}}
        if name == "experts_heatmap":
            layers = run.expert_layers
            rows = [layer.get("tokens_per_expert") for layer in layers]
            rows = [[v if isinstance(v, (int, float)) else np.nan for v in row] for row in rows if isinstance(row, list)]
            width = max((len(r) for r in rows), default=0)
            matrix = np.full((len(rows), width), np.nan)
            for i, row in enumerate(rows):
                matrix[i, :len(row)] = row
            return {"matrix": matrix, "step": getattr(run, "expert_latest_step", None)}
        if name == "experts_imbalance":
            per_layer = sorted(run.expert_layer_imbalance.items())
            return {"steps": run.experts.steps.copy(), "mean": run.experts.column("mean_load_imbalance").copy(),
                    "per_layer": per_layer[-PLOT_POINTS:]}
    raise KeyError(name)


def _draw_loss(fig, snap):
    data = snap["data"]
    steps = data["step"]
    ax = _series_plot(fig, "Training loss", steps, data, "loss", BLUE, label="loss", log_y=snap["log_y"])
    loss = data["series"].get("loss")
    if loss is None or not np.isfinite(loss["value"]).any():
        return   # _series_plot said "no data yet"
    if snap["smoothing"] > 0:
        smoothed = ema_debiased(loss["value"], snap["smoothing"])
        ax.plot(steps, smoothed, color=ORANGE, linewidth=1.8, label=f"EMA {snap['smoothing']:g} (debiased)")
    # the markers and legend with smoothing off too (smoothing=0 once dropped them)
    for step, state, is_best in snap["checkpoints"]:
        ax.axvline(step, color=GREEN if is_best else MUTED, linewidth=1.0,
                   linestyle="-" if state == "kept" else ":", alpha=0.8 if state == "kept" else 0.45)
    for step in snap["resumes"]:
        ax.axvline(step, color=PINK, linewidth=1.0, linestyle="--", alpha=0.8)
    if snap["checkpoints"]:
        ax.plot([], [], color=MUTED, linewidth=1.0, label="checkpoint (dotted: deleted)")
    if snap["resumes"]:
        ax.plot([], [], color=PINK, linewidth=1.0, linestyle="--", label="resume")
    _legend(ax)


def _draw_eval(fig, snap):
    ax = _axes(fig, "Eval loss and perplexity", "eval loss")
    steps, losses = snap["steps"], snap["eval_loss"]
    if not np.isfinite(losses).any():
        _empty(ax, "no evaluation yet")
        return
    ax.plot(steps, losses, color=BLUE, marker="o", markersize=3, linewidth=1.4, label="eval loss")
    best = snap["best"]
    if best and "eval_loss" in best:
        ax.scatter([best["step"]], [best["eval_loss"]], s=90, marker="*", color=ORANGE, zorder=5,
                   label=f"best @ {int(best['step'])}")
    if np.isfinite(snap["perplexity"]).any():
        right = ax.twinx()
        right.plot(steps, snap["perplexity"], color=VIOLET, linewidth=1.2, linestyle="--", label="perplexity")
        right.tick_params(colors=MUTED, labelsize=8)
        right.set_ylabel("perplexity", color=MUTED, fontsize=8)
        for spine in right.spines.values():
            spine.set_color(GRID)
        right.plot([], [])
        ax.plot([], [], color=VIOLET, linestyle="--", label="perplexity")
        fig.subplots_adjust(right=0.9)
    _legend(ax)


def _draw_metric(fig, snap):
    """The checkpoint-ranking metric (logging.metric_for_best) and the scores evaluations log besides it:
    train_lora.py's official task metrics, distill.py's KD loss and teacher agreement."""
    ax = _axes(fig, "Eval metrics", snap["metric"] or "metric")
    steps, drawn = snap["steps"], False
    for i, (key, values) in enumerate(snap["series"].items()):
        mask = np.isfinite(values)
        if mask.any():
            ax.plot(steps[mask], values[mask], color=COLORS[(i + 1) % len(COLORS)], marker="o", markersize=3,
                    linewidth=1.2, label=key)
            drawn = True
    values = snap["metric_value"]
    mask = np.isfinite(values)
    if mask.any() and snap["metric"] not in snap["series"]:
        ax.plot(steps[mask], values[mask], color=BLUE, marker="o", markersize=3, linewidth=1.6,
                label=snap["metric"] or "metric_value")
        drawn = True
    if not drawn:
        _empty(ax, "no evaluation metric yet")
        return
    _legend(ax)


def _draw_simple(key, title, color):
    def draw(fig, snap):
        data = snap["data"]
        _series_plot(fig, title, data["step"], data, key, color, log_y=snap["log_y"])
    return draw


def _draw_memory(fig, snap):
    data = snap["data"]
    ax = _axes(fig, "Device memory (GiB)")
    drawn = False
    for key, color, label in (("memory_allocated_gb", GREEN, "allocated"), ("memory_peak_gb", PINK, "peak")):
        values = data["series"][key]["value"]
        if np.isfinite(values).any():
            ax.plot(data["step"], values, color=color, linewidth=1.4, label=label)
            drawn = True
    if drawn:
        _legend(ax)
    else:
        _empty(ax)


def _draw_experts_heatmap(fig, snap):
    matrix = snap["matrix"]
    title = "Expert load, tokens per expert" + (f" (step {int(snap['step'])})" if snap["step"] is not None else "")
    ax = _axes(fig, title)
    ax.grid(False)
    if matrix.size == 0:
        _empty(ax, "dense model: no expert statistics")
        return
    from matplotlib.ticker import MaxNLocator
    image = ax.imshow(matrix, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel("expert", color=MUTED, fontsize=8)
    ax.set_ylabel("layer", color=MUTED, fontsize=8)
    for axis in (ax.xaxis, ax.yaxis):   # layers and experts are whole numbers: no 0.5 ticks
        axis.set_major_locator(MaxNLocator(integer=True))
    colorbar = fig.colorbar(image, ax=ax, pad=0.02)
    colorbar.ax.tick_params(colors=MUTED, labelsize=7)
    colorbar.outline.set_edgecolor(GRID)


def _draw_experts_imbalance(fig, snap):
    ax = _axes(fig, "Expert load imbalance (max / mean tokens per expert)")
    if not np.isfinite(snap["mean"]).any():
        _empty(ax, "dense model: no expert statistics")
        return
    per_layer = snap["per_layer"]
    layers = max((len(v) for _, v in per_layer), default=0)
    for layer in range(min(layers, 48)):
        steps = [s for s, v in per_layer if layer < len(v) and v[layer] is not None]
        values = [v[layer] for s, v in per_layer if layer < len(v) and v[layer] is not None]
        ax.plot(steps, values, color=COLORS[layer % len(COLORS)], linewidth=0.8, alpha=0.35)
    ax.plot(snap["steps"], snap["mean"], color=TEXT, linewidth=2.0, label="mean over layers")
    ax.axhline(1.0, color=GREEN, linewidth=1.0, linestyle=":", label="perfect balance")
    if layers:
        ax.plot([], [], color=MUTED, alpha=0.6, label="per layer")
    _legend(ax)


_DRAW = {
    "loss": _draw_loss,
    "eval": _draw_eval,
    "metric": _draw_metric,
    "lr": _draw_simple("lr", "Learning rate", VIOLET),
    "grad_norm": _draw_simple("grad_norm", "Gradient norm (before clipping)", PINK),
    "throughput": _draw_simple("tokens_per_sec", "Throughput (tokens/s)", GREEN),
    "memory": _draw_memory,
    "experts_heatmap": _draw_experts_heatmap,
    "experts_imbalance": _draw_experts_imbalance,
}


def render_compare(runs: list, key: str, stream: str = "training") -> bytes:
    """One metric of several runs overlaid."""
    cache_key = ("compare", key, stream, tuple((r.name, r.versions[stream]) for r in runs))
    png = _cache.get(cache_key)
    if png is not None:
        return png
    lines = []
    for run in runs:
        with run.lock:
            table = run.training if stream == "training" else run.eval
            data = table.downsample([key], PLOT_POINTS)
        lines.append((run.name, data["step"], data["series"][key]["value"]))

    def draw(fig):
        ax = _axes(fig, f"Compare: {key}")
        fig.subplots_adjust(left=0.07, right=0.98)
        drawn = False
        for i, (name, steps, values) in enumerate(lines):
            if np.isfinite(values).any():
                ax.plot(steps, values, color=COLORS[i % len(COLORS)], linewidth=1.4, label=name)
                drawn = True
        if drawn:
            _legend(ax)
        else:
            _empty(ax)
    return cached_png(cache_key, draw, size=(10.0, 3.6))
