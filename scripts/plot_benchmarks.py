"""Draw the load benchmarks' JSON as PNG: latency CDFs, metrics against concurrency, RSS and lag over time.

    .venv/bin/python -m scripts.plot_benchmarks [--dir docs/bench] [--out docs/bench]
        [--files speech_load chat_load mixed]

Needs matplotlib (the ``bench`` extra). Each input is optional: a missing or unreadable JSON skips its plots. The
formats are read defensively, from whatever keys are present:

- **per-level rows** (``speech_load.json``, ``chat_load.json``): any list of objects that carry a concurrency key
  (``level``, ``streams``, ``sessions``, ``concurrency``, ``clients``, ``n``), wherever it sits in the file. A row's
  system is its ``system`` (or ``label``/``server``/``name``) field, else the key of the object that holds the
  list. Nested objects are flattened (``ttft_ms.p95``). Lists of numbers whose key names a latency (``latency``,
  ``ttft``, ``lag``, ``delay``) become CDFs (``<name>_cdf.png``, one panel per metric, one line per system and
  level); numeric fields that name a rate, a percentile, an error rate or a real-time factor are drawn against
  concurrency (``<name>_scaling.png``, one panel per metric, one line per system).
- **time series** (``mixed.json``): ``runs[label].series`` points with ``t_s`` and ``rss_mb`` (plus ``lag_p99_ms``,
  ``cpu_cores``) become ``<name>_timeline.png``; ``runs[label].raw`` latency lists become ``<name>_cdf.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.bench_common import DOCS_BENCH_DIR

logger = logging.getLogger("plot_benchmarks")

DEFAULT_FILES = ("speech_load", "chat_load", "mixed")
LEVEL_KEYS = ("level", "streams", "sessions", "concurrency", "clients", "n", "N")
SYSTEM_KEYS = ("system", "label", "server", "name")
LATENCY_WORDS = ("latenc", "ttft", "lag", "delay")  # "latenc": latency and latencies
# Metrics worth drawing against concurrency, most important first: throughput, latency percentiles, quality and
# capacity, cost. Counts (``tokens``, ``first_prompt_tokens``) and settings are left out.
SCALING_PATTERNS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"(tok_s|tokens_per_s|per_s\b|throughput)",
        r"(p50|p90|p95|p99)",
        r"(wer|real_?time|rtf|dropped|(^|[._])late($|[._])|cached)",
        r"(cpu_ms|busy|rss)",
    )
)
MAX_PANELS = 12
MAX_CDF_LINES = 16


@dataclass
class Row:
    system: str
    level: float
    scalars: dict[str, float] = field(default_factory=dict)
    lists: dict[str, list[float]] = field(default_factory=dict)


# ---- reading --------------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """The parsed file, or None (logged) when it is missing or not JSON."""
    if not path.is_file():
        logger.info("skip %s: not found", path)
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        logger.warning("skip %s: %s", path, exc)
        return None


def flatten(value: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) pairs of nested objects; lists are leaves."""
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping):
            yield from flatten(item, f"{name}.")
        else:
            yield name, item


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _numbers(value: Any) -> list[float] | None:
    if not isinstance(value, list) or not value:
        return None
    numbers = [_number(item) for item in value]
    return [n for n in numbers if n is not None] if all(n is not None for n in numbers) else None


def _level_of(item: Mapping[str, Any]) -> float | None:
    for key in LEVEL_KEYS:
        level = _number(item.get(key))
        if level is not None:
            return level
    return None


def _system_of(item: Mapping[str, Any], parent_key: str) -> str:
    for key in SYSTEM_KEYS:
        if isinstance(item.get(key), str) and item[key]:
            return str(item[key])
    return parent_key or "brook"


def find_rows(data: Any, parent_key: str = "") -> list[Row]:
    """Every per-level row anywhere in ``data`` (objects with a numeric concurrency key)."""
    rows: list[Row] = []
    if isinstance(data, Mapping):
        level = _level_of(data)
        if level is not None:
            row = Row(_system_of(data, parent_key), level)
            for key, value in flatten(data):
                if key in LEVEL_KEYS:
                    continue
                if (number := _number(value)) is not None:
                    row.scalars[key] = number
                elif (numbers := _numbers(value)) is not None:
                    row.lists[key] = numbers
            return [row]
        for key, value in data.items():
            rows.extend(find_rows(value, str(key) if isinstance(value, list | Mapping) else parent_key))
    elif isinstance(data, list):
        for item in data:
            rows.extend(find_rows(item, parent_key))
    return rows


def is_latency(key: str) -> bool:
    return any(word in key.lower() for word in LATENCY_WORDS)


def find_series(data: Any) -> dict[str, list[dict[str, float]]]:
    """``{label: points}`` for runs whose ``series`` points have ``t_s`` (mixed.json's layout, or a bare series)."""
    found: dict[str, list[dict[str, float]]] = {}
    runs = data.get("runs") if isinstance(data, Mapping) else None
    candidates = runs.items() if isinstance(runs, Mapping) else [("run", data)]
    for label, run in candidates:
        series = run.get("series") if isinstance(run, Mapping) else None
        if isinstance(series, list):
            points = [
                {k: float(v) for k, v in p.items() if _number(v) is not None}
                for p in series
                if isinstance(p, Mapping) and _number(p.get("t_s")) is not None
            ]
            if points:
                found[str(label)] = points
    return found


def find_raw_lists(data: Any) -> dict[str, dict[str, list[float]]]:
    """``{metric: {label: values}}`` from each run's ``raw`` latency lists (mixed.json)."""
    found: dict[str, dict[str, list[float]]] = {}
    runs = data.get("runs") if isinstance(data, Mapping) else None
    candidates = runs.items() if isinstance(runs, Mapping) else [("run", data)]
    for label, run in candidates:
        raw = run.get("raw") if isinstance(run, Mapping) else None
        if not isinstance(raw, Mapping):
            continue
        for key, value in flatten(raw):
            numbers = _numbers(value)
            if numbers and is_latency(key):
                found.setdefault(key, {})[str(label)] = numbers
    return found


# ---- drawing --------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(count: int) -> tuple[int, int]:
    columns = min(3, count)
    return math.ceil(count / columns), columns


def _cdf_axes(ax: Any, title: str, lines: Mapping[str, Sequence[float]]) -> None:
    for name, values in list(lines.items())[:MAX_CDF_LINES]:
        ordered = sorted(values)
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.step(ordered, fractions, where="post", label=f"{name} (n={len(ordered)})")
    if "lag" in title.lower():  # mostly around a millisecond with a long tail: a log axis shows both
        ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(title.rsplit(".", 1)[-1], fontsize=8)
    ax.set_ylabel("fraction ≤ x", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6)


def plot_cdfs(metrics: Mapping[str, Mapping[str, Sequence[float]]], out: Path, title: str) -> Path | None:
    """One panel per metric, one CDF line per entry. None (nothing written) without data."""
    metrics = {k: v for k, v in metrics.items() if any(v.values())}
    if not metrics:
        return None
    plt = _pyplot()
    keys = sorted(metrics)[:MAX_PANELS]
    rows, columns = _grid(len(keys))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        _cdf_axes(ax, key, metrics[key])
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _scaling_rank(key: str) -> int | None:
    """The priority group of a metric worth drawing against concurrency (None: not such a metric)."""
    return next((rank for rank, pattern in enumerate(SCALING_PATTERNS) if pattern.search(key)), None)


def plot_scaling(rows: Sequence[Row], out: Path, title: str) -> Path | None:
    """One panel per scaling metric, x = concurrency, one line per system. None without such metrics."""
    keys = sorted(
        {k for row in rows for k in row.scalars if _scaling_rank(k) is not None}, key=lambda k: (_scaling_rank(k), k)
    )[:MAX_PANELS]
    if not keys:
        return None
    plt = _pyplot()
    n_rows, columns = _grid(len(keys))
    fig, axes = plt.subplots(n_rows, columns, figsize=(5 * columns, 3.4 * n_rows), squeeze=False)
    systems = sorted({row.system for row in rows})
    for ax, key in zip(axes.flat, keys, strict=False):
        for system in systems:
            points = sorted(
                (row.level, row.scalars[key]) for row in rows if row.system == system and key in row.scalars
            )
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=system)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("concurrency", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(keys) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_timeline(series: Mapping[str, Sequence[Mapping[str, float]]], out: Path, title: str) -> Path | None:
    """RSS (and event-loop lag p99 and CPU when present) over time, one line per run."""
    panels = [key for key in ("rss_mb", "lag_p99_ms", "cpu_cores") if any(key in p for s in series.values() for p in s)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), squeeze=False, sharex=True)
    for ax, key in zip(axes.flat, panels, strict=True):
        for label, points in series.items():
            xs = [p["t_s"] for p in points if key in p]
            ys = [p[key] for p in points if key in p]
            if xs:
                ax.plot(xs, ys, marker=".", label=label)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6)
    axes.flat[-1].set_xlabel("seconds since start (idle, then load, then after)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_file(path: Path, out_dir: Path) -> list[Path]:
    """Every plot ``path`` supports; [] when it is absent or holds nothing plottable."""
    data = read_json(path)
    if data is None:
        return []
    name = path.stem
    written: list[Path | None] = []
    series = find_series(data)
    rows = [] if series else find_rows(data)  # a time-series file's summaries are not per-level rows
    cdfs: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        for key, values in row.lists.items():
            if is_latency(key):
                cdfs.setdefault(key, {})[f"{row.system} @ {row.level:g}"] = values
    for key, by_label in find_raw_lists(data).items():
        cdfs.setdefault(key, {}).update(by_label)
    written.append(plot_cdfs(cdfs, out_dir / f"{name}_cdf.png", f"{name}: latency CDFs"))
    if rows:
        written.append(plot_scaling(rows, out_dir / f"{name}_scaling.png", f"{name}: against concurrency"))
    if series:
        written.append(plot_timeline(series, out_dir / f"{name}_timeline.png", f"{name}: over time"))
    done = [p for p in written if p is not None]
    if not done:
        logger.info("skip %s: nothing plottable found", path)
    return done


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description="Plot docs/bench/*.json as PNG")
    parser.add_argument("--dir", type=Path, default=DOCS_BENCH_DIR, help="where the JSON files are")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: --dir)")
    parser.add_argument("--files", nargs="+", default=list(DEFAULT_FILES), help="JSON names without .json")
    args = parser.parse_args(argv)
    out_dir = args.out or args.dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [p for name in args.files for p in plot_file(args.dir / f"{name}.json", out_dir)]
    for path in written:
        print(f"wrote {path}")
    if not written:
        print("no plots written (no benchmark JSON found)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
