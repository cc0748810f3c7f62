"""``segsvc curves DIR``: validation mIoU against CPU-minutes for every training run under ``DIR``.

    segsvc curves runs/                       # every run under runs/ -> runs/curves.png + runs/curves.csv
    segsvc curves runs/camvid-unet --out out/unet-curves.png   # CSV beside it: out/unet-curves.csv

A run is a directory holding ``metrics.jsonl`` (``training.rundir``): one row
per epoch, with ``val_miou`` on the epochs that validated. The x axis is
CPU-minutes, wall minutes times the CPU threads working on the run, so runs
on machines or budgets with different thread counts compare by the compute
they used (on a GPU it is only the host's share). The trainer records
``cpu_minutes`` (cumulative) and ``cpu_threads`` in every row
(``cpu_time_row``). Older runs do not: their CPU-minutes are ``elapsed_s``
times the recipe's ``train.threads`` (``config.yaml``) times the world size
(``events.jsonl``), or, when the recipe left the threads to torch, times
``--threads`` (at least 1) or else this machine's torch thread count, an
assumption the legend (which of the two) and the CSV say.
One line per run, labelled by its path under ``DIR`` and its recipe, in one
panel per dataset (``data.spec`` of the run's config: a membrane mIoU is not
a CamVid mIoU); every line of a panel has its own colour and dash pattern.
The CSV beside the picture has every plotted point.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from segsvc.errors import InvalidArgument, NotFound
from segsvc.files import write_atomic

METRICS_FILE = "metrics.jsonl"
FIGSIZE_IN = (9.0, 5.5)
DPI = 100  # the picture is FIGSIZE_IN * DPI pixels: 900 x 550 (taller with long legends)
LEGEND_INSIDE = 6  # runs per panel whose legend (under the panel) fits the base picture; more add a row each
LEGEND_ROW_IN = 0.16
LEGEND_DROP_IN = 0.3  # from a panel's bottom edge to the top of its legend: clears the tick labels
CSV_COLUMNS = ("run", "recipe", "dataset", "epoch", "wall_minutes", "cpu_threads", "cpu_minutes", "cpu_minutes_source",
               "val_miou")


def cpu_time_row(history: Sequence[dict[str, Any]], epoch_s: float, threads: int) -> dict[str, Any]:
    """The ``cpu_threads`` and cumulative ``cpu_minutes`` entries of an epoch's metrics row.

    ``history`` holds the rows before this epoch; a resumed run whose earlier rows
    have no ``cpu_minutes`` continues from their ``elapsed_s`` times ``threads``.

    Example:
        >>> cpu_time_row([{"elapsed_s": 60.0}], 30.0, 4)
        {'cpu_threads': 4, 'cpu_minutes': 6.0}
    """
    before = 0.0
    if history and "cpu_minutes" in history[-1]:
        before = float(history[-1]["cpu_minutes"])
    elif history:
        before = float(history[-1].get("elapsed_s", 0.0)) * threads / 60
    return {"cpu_threads": int(threads), "cpu_minutes": round(before + epoch_s * threads / 60, 3)}


@dataclass(frozen=True)
class CurvePoint:
    epoch: int
    wall_minutes: float
    cpu_threads: int
    cpu_minutes: float
    source: str  # "recorded", "config threads" or "assumed threads"
    val_miou: float


@dataclass(frozen=True)
class RunCurve:
    """The validated epochs of one run. ``name`` is its path under the folder searched."""

    name: str
    recipe: str
    points: list[CurvePoint] = field(default_factory=list)
    dataset: str = ""
    threads_given: bool = False  # the assumed count came from ``--threads`` (not this machine's torch default)

    @property
    def label(self) -> str:
        """The legend entry: name, recipe (unless the name shows it) and how CPU-minutes were derived."""
        text = self.name if self.recipe in Path(self.name).parts else f"{self.name} [{self.recipe}]"
        fallback = {p.source for p in self.points} - {"recorded"}
        if fallback:
            threads = sorted({p.cpu_threads for p in self.points if p.source != "recorded"})
            if "assumed threads" not in fallback:
                how = "from config.yaml"
            elif self.threads_given:
                how = f"assumed: --threads {'/'.join(map(str, threads))}"
            else:
                how = "assumed: torch's default here"
            plural = "s" if threads != [1] else ""
            text += f" (wall × {'/'.join(map(str, threads))} thread{plural}, {how})"
        return text


def find_runs(root: Path) -> list[Path]:
    """Run directories (holding ``metrics.jsonl``) at or under ``root``, sorted."""
    if not root.is_dir():
        raise NotFound(f"{root} is not a directory")
    return sorted(p.parent for p in root.rglob(METRICS_FILE) if p.is_file())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a line being written (or damaged) is skipped."""
    rows = []
    try:  # a file that is not UTF-8 (damaged, or another program's) keeps its readable lines
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    except OSError:  # unreadable: no rows, as a run without metrics
        text = ""
    if text:
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


@dataclass(frozen=True)
class RunSettings:
    """What a run's ``config.yaml`` and ``events.jsonl`` say about it."""

    recipe: str
    threads: int | None  # train.threads; None: torch's default
    world: int
    dataset: str  # data.spec as a name ("camvid"; a spec file's ``name:`` or stem), "" when unknown


def _dataset_name(spec: str) -> str:
    """The ``name:`` of the spec file ``spec`` (a folder's ``dataset.yaml``) when it is readable, else its stem.

    Registered datasets are all stored as ``<store>/<sha256>/spec.yaml``: their stems
    would put every training-service dataset in one panel named "spec".
    """
    path = Path(spec)
    described = path / "dataset.yaml" if path.is_dir() else path  # a folder is described by its dataset.yaml
    try:
        raw = yaml.safe_load(described.read_text()) if described.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raw = None
    name = raw.get("name") if isinstance(raw, dict) else None
    return str(name) if isinstance(name, (str, int)) and str(name) else path.stem


def _run_settings(run_dir: Path) -> RunSettings:
    """The recipe name, ``train.threads``, world size and dataset of a run."""
    recipe, threads, dataset = run_dir.parent.name, None, ""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # damaged, or another program's: the folder's name
        config = None
    if isinstance(config, dict):
        recipe = str(config.get("name") or recipe)
        train, data = config.get("train"), config.get("data")
        value = train.get("threads") if isinstance(train, dict) else None
        threads = value if isinstance(value, int) and value > 0 else None
        spec = data.get("spec") if isinstance(data, dict) else None
        dataset = _dataset_name(spec) if isinstance(spec, str) else ""
    starts = [e for e in _read_jsonl(run_dir / "events.jsonl") if e.get("event") == "start"]
    world = starts[-1].get("world_size") if starts else None
    return RunSettings(recipe, threads, world if isinstance(world, int) and world > 0 else 1, dataset)


def read_run(run_dir: Path, root: Path, default_threads: int | None = None) -> RunCurve:
    """The validated epochs of the run in ``run_dir`` with their CPU-minutes (see the module docstring)."""
    settings = _run_settings(run_dir)
    fallback_threads = (settings.threads or default_threads or torch.get_num_threads()) * settings.world
    source = "config threads" if settings.threads else "assumed threads"
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    points = []
    for row in _read_jsonl(run_dir / METRICS_FILE):
        point = _curve_point(row, fallback_threads, source)
        if point is not None:
            points.append(point)
    given = default_threads is not None and not settings.threads
    return RunCurve(name or run_dir.name, settings.recipe, points, settings.dataset, given)


def _curve_point(row: dict[str, Any], fallback_threads: int, source: str) -> CurvePoint | None:
    """A validated epoch's point, or None: no validation, or a row whose values are not what the trainer writes
    (a null epoch, text, ``true`` for an mIoU, an mIoU outside [0, 1]: a damaged or another program's file)."""
    miou, epoch = _real(row.get("val_miou")), row.get("epoch", 0)
    if miou is None or not 0.0 <= miou <= 1.0 or not _count(epoch):
        return None
    elapsed_s = _real(row.get("elapsed_s"))
    wall_min = elapsed_s / 60 if elapsed_s is not None else math.nan
    cpu_minutes, threads = _real(row.get("cpu_minutes")), row.get("cpu_threads") or 0
    if cpu_minutes is not None and _count(threads):
        return CurvePoint(epoch, wall_min, threads, cpu_minutes, "recorded", miou)
    if cpu_minutes is None and not math.isnan(wall_min):
        return CurvePoint(epoch, wall_min, fallback_threads, wall_min * fallback_threads, source, miou)
    return None  # no CPU nor wall time to place it at, or a thread count that is no count


def _real(value: Any) -> float | None:
    """A finite JSON number as a float (``true`` is no number here), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def collect(root: Path, default_threads: int | None = None) -> list[RunCurve]:
    """Every run under ``root`` with at least one validated epoch."""
    curves = [read_run(run_dir, root, default_threads) for run_dir in find_runs(root)]
    return [c for c in curves if c.points]


def require_validated_runs(root: Path, default_threads: int | None = None) -> list[RunCurve]:
    """``collect(root)``; ``NotFound`` when it finds no run with a validated epoch (``segsvc eval --curves``
    checks this before it evaluates, not after)."""
    curves = collect(root, default_threads)
    if not curves:
        raise NotFound(f"no training run with a validated epoch under {root} (looked for {METRICS_FILE} rows "
                       "with val_miou)")
    return curves


def write_csv(curves: Sequence[RunCurve], path: Path) -> Path:
    """One row per plotted point (``CSV_COLUMNS``), written under a temporary name and renamed
    (``write_atomic``: a name of its own, never a file of the user's beside it)."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    for curve in curves:
        for p in curve.points:
            writer.writerow([curve.name, curve.recipe, curve.dataset, p.epoch, _num(p.wall_minutes), p.cpu_threads,
                             _num(p.cpu_minutes), p.source, round(p.val_miou, 6)])
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, text.getvalue().encode("utf-8"))


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.3f}"


def by_dataset(curves: Sequence[RunCurve]) -> dict[str, list[RunCurve]]:
    """The runs grouped by dataset, in order of first appearance (one panel each)."""
    panels: dict[str, list[RunCurve]] = {}
    for curve in curves:
        panels.setdefault(curve.dataset or "unknown dataset", []).append(curve)
    return panels


def line_styles(count: int) -> list[tuple[Any, str]]:
    """``count`` distinct (colour, dash pattern) pairs: tab20's 20 colours, then the next dash pattern.

    Example:
        >>> len(set(line_styles(45))), line_styles(21)[20][1]
        (45, '--')
    """
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    dashes = ("-", "--", ":", "-.")
    return [(colours[i % len(colours)], dashes[(i // len(colours)) % len(dashes)]) for i in range(count)]


X_LABEL = "CPU-minutes (wall minutes × CPU threads)"


def plot_curves(curves: Sequence[RunCurve], path: Path, title: str = "") -> Path:
    """Validation mIoU against CPU-minutes, one panel per dataset, one line per run (matplotlib, Agg backend)."""
    from training.report import save_figure  # matplotlib only when a picture is drawn

    return save_figure(curves_figure(curves, title), path, dpi=DPI)


def curves_figure(curves: Sequence[RunCurve], title: str = "") -> Any:
    """The figure of ``plot_curves`` (the caller closes it).

    The panels share one x label (the figure's, under them) and every panel's legend sits
    under its panel, outside the data area, so it hides no point; constrained layout keeps
    tick labels, legends and labels apart.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import ScaledTranslation

    panels = by_dataset(curves) or {"": []}
    longest = max(len(group) for group in panels.values())
    # the picture grows by one legend row per run beyond LEGEND_INSIDE
    extra_in = LEGEND_ROW_IN * longest if longest > LEGEND_INSIDE else 0.0
    fig, axes = plt.subplots(1, len(panels), figsize=(FIGSIZE_IN[0], FIGSIZE_IN[1] + extra_in), squeeze=False,
                             layout="constrained")
    for ax, (dataset, group) in zip(axes[0], panels.items()):
        for curve, (colour, dash) in zip(group, line_styles(len(group))):
            ax.plot([p.cpu_minutes for p in curve.points], [p.val_miou for p in curve.points], marker="o", ms=3,
                    color=colour, linestyle=dash, label=curve.label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if group:  # under the panel and its tick labels: a legend inside it hid the low points of early runs
            under_ticks = ax.transAxes + ScaledTranslation(0, -LEGEND_DROP_IN, fig.dpi_scale_trans)
            ax.legend(fontsize="small" if longest <= LEGEND_INSIDE else "x-small", loc="upper center",
                      bbox_to_anchor=(0.5, 0.0), bbox_transform=under_ticks, borderaxespad=0.0, frameon=False)
        if len(panels) > 1:
            ax.set_title(dataset, fontsize="medium")
    axes[0][0].set_ylabel("validation mIoU")
    fig.supxlabel(X_LABEL)  # one for all panels: one per panel ran into its neighbours
    fig.suptitle(title or "validation mIoU against compute")
    return fig


def write_curves(root: Path, png: Path, title: str = "", default_threads: int | None = None) -> list[RunCurve]:
    """Every validated run under ``root``: ``png`` and the CSV beside it (``png`` with ``.csv``).

    Raises:
        InvalidArgument: ``png`` does not end in ``.png``, or ``default_threads`` is below 1 (checked
            before anything is read or written).
        NotFound: ``root`` is not a directory or holds no validated run.
    """
    if default_threads is not None and default_threads < 1:  # would plot negative CPU-minutes
        raise InvalidArgument(f"--threads must be at least 1, got {default_threads}")
    if png.suffix.lower() != ".png":  # else the CSV would be written and the picture refused, or take its name
        raise InvalidArgument(f"{png}: the curves picture is a PNG, its name must end in .png "
                              "(the CSV goes beside it)")
    curves = require_validated_runs(root, default_threads)
    write_csv(curves, png.with_suffix(".csv"))
    plot_curves(curves, png, title)
    return curves


def run(args: argparse.Namespace) -> int:
    """Handler of ``segsvc curves`` (flags defined in ``segsvc/cli.py::_add_curves``)."""
    root = Path(args.dir)
    png = Path(args.out) if args.out else root / "curves.png"
    curves = write_curves(root, png, args.title or "", args.threads)
    for curve in curves:
        best = max(curve.points, key=lambda p: p.val_miou)
        last = curve.points[-1]
        print(f"{curve.label}: best val mIoU {100 * best.val_miou:.2f} at {best.cpu_minutes:.1f} CPU-min "
              f"(epoch {best.epoch}); last validation at {last.cpu_minutes:.1f} CPU-min (epoch {last.epoch})")
    print(f"wrote {png} and {png.with_suffix('.csv')}")
    return 0
