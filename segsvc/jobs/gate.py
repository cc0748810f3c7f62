"""The evaluation gate of a training job and the publication of its candidate.

``compare`` lines up the candidate's and the current default's metrics per
evaluation split (both measured by ``segsvc eval`` in a child process, on the
same data); ``decide`` applies the promotion policy; ``publish_candidate``
writes the candidate as a new version of the target model, atomically, with
its lineage (dataset hash, parent version, recipe and overrides, segsvc
version, metrics). Whether it becomes the default is the caller's next step
(``ModelRepository.set_default``).

A decision is only as good as the default it was measured against: when
``current_default`` (what the repository serves by default now) is no longer
the version the job compared with, another job (or a person) moved the default
while this one evaluated, and the caller does not promote on that stale
comparison (``moved_verdict`` says so).

Example:
    >>> rows = compare({"val": {"miou": 0.61}}, {"val": {"miou": 0.55}})
    >>> decide("gate", rows, margin=0.02, has_default=True)
    (True, 'promoted: mIoU beats the default by more than 0.02 on val (+0.0600)')
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from segsvc.errors import AlreadyExists, ArtifactError, SegsvcError, UnknownModel
from segsvc.inference.repository import ModelRepository
from segsvc.models.artifact import load_artifact, read_manifest, save_artifact

POLICIES = ("gate", "always", "never")
METRICS = ("miou", "pixel_accuracy", "mean_class_accuracy", "mean_dice")
GATE_METRIC = "miou"
PUBLISH_ATTEMPTS = 5  # another writer may take the next version number between our scan and rename


@dataclass(frozen=True)
class Comparison:
    """One metric on one split: the candidate's value and the default's (None: no comparable default)."""

    split: str
    metric: str
    candidate: float
    default: float | None

    @property
    def delta(self) -> float:
        return 0.0 if self.default is None else self.candidate - self.default

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "metric": self.metric, "candidate": self.candidate, "default": self.default,
                "delta": self.delta}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Comparison":
        return cls(data["split"], data["metric"], float(data["candidate"]),
                   None if data.get("default") is None else float(data["default"]))


def read_eval_metrics(out_dir: Path) -> dict[str, float]:
    """The scalar metrics of one ``segsvc eval`` output folder (its ``metrics.json``)."""
    data = json.loads((out_dir / "metrics.json").read_text())
    return {k: float(v) for k, v in data["metrics"].items() if k in METRICS and isinstance(v, (int, float))}


def compare(candidate: Mapping[str, Mapping[str, float]],
            default: Mapping[str, Mapping[str, float]] | None) -> list[Comparison]:
    """One row per (split, metric) the candidate was measured on."""
    rows = []
    for split, metrics in candidate.items():
        theirs = (default or {}).get(split) or {}
        for metric in METRICS:
            if metric in metrics:
                rows.append(Comparison(split, metric, float(metrics[metric]),
                                       None if metric not in theirs else float(theirs[metric])))
    return rows


def decide(policy: str, rows: list[Comparison], margin: float, has_default: bool) -> tuple[bool, str]:
    """Whether the candidate becomes the default, and why (one line for people).

    Under ``gate`` it must beat the default's mIoU by more than ``margin`` on every
    evaluated split; a model without a default (``has_default`` False) takes the candidate.
    A default the candidate could not be compared with (other classes: not evaluated) is
    not replaced: only ``always`` does that.
    """
    if policy == "never":
        return False, "not promoted: promote policy is never"
    if policy == "always":
        return True, "promoted: promote policy is always"
    if not has_default:
        return True, "promoted: the model had no comparable default version"
    gate = [r for r in rows if r.metric == GATE_METRIC and r.default is not None]
    if not gate:
        return False, ("not promoted: the candidate could not be compared with the default version (other classes, "
                       "or no mIoU on the same data); promote ALWAYS replaces it")
    losing = [r for r in gate if not r.delta > margin]
    detail = ", ".join(f"{r.split} ({r.delta:+.4f})" for r in gate)
    if losing:
        return False, f"not promoted: mIoU does not beat the default by more than {margin:g} on {detail}"
    return True, f"promoted: mIoU beats the default by more than {margin:g} on {detail}"


def moved_verdict(compared: int, now: int) -> str:
    """The verdict of a candidate measured against version ``compared`` (0: none) when ``now`` is the default."""
    return (f"not promoted: the default moved from {_version_label(compared)} to {_version_label(now)} while this "
            f"job was evaluated; compare again with a new job")


def _version_label(version: int) -> str:
    return f"v{version}" if version else "none"


def format_table(rows: list[Comparison]) -> str:
    """The comparison as a text table (the CLI prints it)."""
    lines = [f"{'split':8} {'metric':20} {'candidate':>10} {'default':>10} {'delta':>9}"]
    for r in rows:
        default = "-" if r.default is None else f"{r.default:.4f}"
        delta = "-" if r.default is None else f"{r.delta:+.4f}"
        lines.append(f"{r.split:8} {r.metric:20} {r.candidate:>10.4f} {default:>10} {delta:>9}")
    return "\n".join(lines)


def lineage_of(manifest_dir: Path) -> dict[str, Any]:
    """The lineage recorded in a version's manifest ({} when it has none)."""
    return dict(read_manifest(manifest_dir).lineage)


def find_published(repository: ModelRepository, name: str, job_id: str) -> int | None:
    """The version a job already published (a restart between publishing and recording it)."""
    try:
        versions = repository.versions(name)
    except SegsvcError:
        return None
    for version in reversed(versions):
        try:
            if lineage_of(repository.version_dir(name, version)).get("job_id") == job_id:
                return version
        except SegsvcError:
            continue
    return None


def current_default(repository: ModelRepository, name: str, own: int | None = None) -> int:
    """The version ``name`` is served by default from the repository: the one ``DEFAULT`` names when it is
    complete, else the newest complete version other than ``own`` (a job's own version, published just before
    a crash, is not the default the job compared with); 0 when there is none.
    """
    try:
        versions = repository.versions(name)
    except UnknownModel:
        return 0
    pinned = repository.default_version(name)
    if pinned in versions:
        return pinned  # type: ignore[return-value]
    others = [v for v in versions if v != own]
    return others[-1] if others else 0


def publish_candidate(candidate_dir: Path, repo_root: Path, name: str, lineage: Mapping[str, Any]) -> Path:
    """Write the candidate as the next version of ``name`` under ``repo_root`` (atomic, never overwriting).

    The weights, spec, classes, input normalisation, inference contract and
    metrics come from the candidate's own manifest; ``lineage`` records where
    it came from.
    """
    model, manifest = load_artifact(candidate_dir)
    for _ in range(PUBLISH_ATTEMPTS):
        try:
            return save_artifact(
                model, repo_root, name, spec=manifest.spec, input_spec=manifest.input,
                class_names=list(manifest.class_names), palette=list(manifest.palette),
                ignore_index=manifest.ignore_index, training=dict(manifest.training), metrics=dict(manifest.metrics),
                inference=manifest.inference, lineage=dict(lineage),
            )
        except AlreadyExists:  # a concurrent publisher took that number: take the next one
            continue
    raise ArtifactError(f"could not publish a new version of {name}: the version numbers kept being taken")
