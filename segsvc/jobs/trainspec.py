"""What a training job is: the request, the server's training settings, and the command lines it runs.

``resolve_submission`` turns a ``TrainingRequest`` into the job's stored spec
once, at submission: the dataset's spec path and hash (from the dataset
registry), the recipe text (a named recipe of ``training/recipes``, inline
YAML, or the base model's recorded training configuration), the base version
directory to fine-tune from, and the target model. ``trainer_argv`` and
``eval_argv`` build the child command lines from that spec; the keys the
service controls (``output.*``, ``data.spec``, ``model.init_from``) are set by
the service last and refused in the client's overrides.

Whatever the trainer refuses from the recipe alone is refused at submission,
by the trainer's own code: ``check_recipe`` runs ``python -m training --check``
with the job's exact command line (``check_argv``), which checks every key and
value, the dataset's classes and splits, the device (without creating a CUDA
context), and plans the model on the meta device (its architecture, parameters,
crop and size), then exits without training. The service never imports the
trainer, so the rules have one copy; the price is a child process per
submission (the trainer's imports: a few seconds, at most ``MAX_RECIPE_CHECKS``
at once, each under a hard memory limit, and killed when its submission is
cancelled).

A client never names a file on the server: ``FILE_KEYS`` (``model.init_from``
and every ``model.params.*_path``, e.g. smp's ``encoder_weights_path``) are
checked on the configuration the client's part produces, its inline recipe with
its overrides applied as the trainer applies them, so a whole-``model``
override or an inline recipe cannot set them either. The service alone sets
``model.init_from`` (to the base model's version directory). Values in the
server's own recipes (``recipes_dir``) and in a base model's recorded
configuration are the operator's and the service's, not the client's.

What a request may cost is bounded the same way, when it is submitted: its own
part of the recipe may not ask for more threads, data-loader workers, batch,
repeat, crop, tile or scale than ``REQUEST_LIMITS`` allow, nor more than
``MAX_EPOCHS`` epochs or ``MAX_TIME_MIN`` minutes (``check_request_limits``);
its YAML may not grow, once its aliases are expanded, beyond ``MAX_YAML_NODES``
values nor nest deeper than ``MAX_YAML_DEPTH`` (``check_yaml_size``); it may not
start more trainer processes than the server has GPUs or CPUs for
(``check_processes``); and every trainer runs under the server's time limit
(``TrainingConfig.max_time_min``), an ``epochs`` budget too.

Example:
    >>> TrainingRequest(dataset="shapes", recipe="synthetic-quick", epochs=2).budget_overrides()
    ['train.epochs=2', 'train.max_time_min=null']
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import yaml

from segsvc.config import usable_cpus
from segsvc.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, SegsvcError
from segsvc.inference.repository import ModelRepository, parse_model_ref
from segsvc.jobs.gate import POLICIES
from segsvc.jobs.held_start import CANNOT_RUN, NOT_FOUND
from segsvc.jobs.procgroup import run_bounded
from segsvc.models.artifact import check_name
from segsvc.overrides import apply_override, parse_override

log = logging.getLogger("segsvc.jobs")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GOLDEN_PREFIX = "golden-"  # a dataset registered as golden-<model> is that model's frozen golden set
PROTECTED_KEYS = ("output", "data.spec", "model.init_from", "name")
# Keys whose value is a file the trainer reads: never from a client (model.params.* ending in _path too).
FILE_KEYS = ("model.init_from",)
_PATH_PARAM_SUFFIX = "_path"
MAX_RECIPE_BYTES = 64 << 10  # an inline recipe's text; the overrides' text, all together, too
MAX_OVERRIDES = 100
MAX_REASON_CHARS = 500  # a failure reason taken from the trainer (or its check) is cut to this
# A client's YAML (inline recipe, override value) with its aliases expanded: a few KiB of anchors and aliases
# (the billion-laughs pattern) would make the trainer, which copies and writes its configuration, expand them
# to gigabytes. Plain YAML holds at most about one value a byte, so no 64 KiB recipe without aliases is refused.
MAX_YAML_NODES = 100_000
# How deep a client's YAML may nest: a recipe nests a few levels; hundreds exhaust the recursion of PyYAML's
# composer and dumper (the server writes the recipe out at submission) and of the trainer.
MAX_YAML_DEPTH = 32
MAX_EPOCHS = 100_000  # also the cap a time budget sets, so that the time is the limit
MAX_TIME_MIN = 7 * 24 * 60.0  # a week: the longest time budget a request may give
# The most a request's own part of a recipe (its inline recipe with its overrides applied) may ask of the
# server, by dotted key: every item of a pair or list is checked, and a list holds at most MAX_LIST_ITEMS.
# The trainer checks the least values and the types; the server's own recipes are the operator's.
REQUEST_LIMITS = {
    "train.epochs": MAX_EPOCHS, "train.max_time_min": MAX_TIME_MIN,
    "train.threads": 64, "data.workers": 16,
    "train.batch_size": 256, "train.val_batch_size": 256, "train.accumulate_steps": 64, "data.repeat": 100,
    "data.crop": 4096, "data.val_tile_size": 4096,  # pixels
    "data.scale": 4.0, "data.val_scale": 4.0, "data.val_tta_scales": 4.0,  # resize factors
    "output.samples_in_report": 16,  # an inline recipe's (overrides may not set output.*)
}
MAX_LIST_ITEMS = 8
MIN_TILE = 32  # data.val_tile_size: 0 (whole images) or at least this many pixels
_RECIPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DEVICE = re.compile(r"auto|cpu|cuda")  # what the trainer's train.device takes
# What `python -m training` imports that the server's own packages (deploy/requirements/serve.txt) lack.
TRAINER_DEPENDENCIES = ("albumentations",)
# ``training: error: ...`` as training/train.py prints it (torchrun may prefix a rank: ``[rank0]: ...``).
TRAINER_ERROR = re.compile(r"(?:\[[^\]]{1,40}\]:?\s*)?training: error:\s*(\S.*)")
# torchrun's report of a failed run (``ChildFailedError``): the worker that failed first, and how.
_ROOT_CAUSE = "Root Cause (first observed failure):"
_CAUSE_RANK = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank")
_CAUSE_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid")
# python -m training --check: the trainer's imports and a model built on the meta device take about 5 s (twice
# that with two at once on a loaded host). The wait for a slot and the check get 45 s in all: under the client's
# default deadline of 60 s, so such a client hears "busy, submit again later" rather than its own deadline.
RECIPE_CHECK_TIMEOUT_S = 45.0
MAX_RECIPE_CHECKS = 2  # checks running at once (each is a trainer's imports: about 1 GB resident while it runs)
# The check's hard address-space limit (RLIMIT_AS). Importing the trainer (torch with its CUDA libraries mapped,
# albumentations) reserves about 4 GiB of address space, of which under 1 GiB is resident; the model is planned
# on the meta device, so a normal check peaks there whatever its size. A recipe whose model would not fit in
# what is left is refused by the trainer (``training/train.py::check_model_fits``); whatever else would
# allocate past it fails in the check, never on the host.
RECIPE_CHECK_MEMORY_GIB = 8
# The check's environment: one compute thread (it computes almost nothing), and CUDA counted by NVML, which
# creates no CUDA context on the server's GPU (and needs none of the address space the CUDA driver reserves).
RECIPE_CHECK_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
LOG_TAIL_BYTES = 64 << 10  # how much of a trainer's log (or its check's output) is read for its last words


class DatasetRecord(Protocol):
    spec_path: Any
    sha256: str


class DatasetRegistry(Protocol):
    def get(self, name_or_hash: str) -> DatasetRecord: ...

    def check_unchanged(self, name_or_hash: str) -> DatasetRecord:
        """The dataset, after checking that a folder registered in place still holds what was registered."""


@dataclass(frozen=True)
class TrainingConfig:
    """The server's training settings.

    Args:
        state_dir: runs live under ``<state_dir>/training/<job_id>/`` (a relative path, like
            ``recipes_dir`` and ``workdir``, is made absolute here, against the current directory).
        max_training_jobs: trainers running at once; more jobs wait in submission order.
        recipes_dir: where recipe names are looked up.
        workdir: the trainer's working directory (the project root: ``python -m training`` runs there).
        python: the interpreter of the trainer and evaluator.
        kill_grace_s: after SIGTERM (cancel, server stop), how long before SIGKILL.
        progress_interval_s: how often live metadata is written to the store.
        eval_threads: torch threads of the evaluation children (None: torch's default).
        max_time_min: the longest a trainer runs, in minutes: a request's time budget may not exceed it, and
            every trainer gets it as ``train.max_time_min`` when its recipe and request give none or a longer
            one (an ``epochs`` budget too). The trainer stops after the epoch that reaches it.
        check_recipes: run the trainer's check (``check_recipe``) on every submission. Off only where the
            trainer and the datasets are stand-ins (tests): a bad recipe then fails when its trainer starts.
    """

    state_dir: Path
    max_training_jobs: int = 1
    recipes_dir: Path = PROJECT_ROOT / "training" / "recipes"
    workdir: Path = PROJECT_ROOT
    python: str = sys.executable
    kill_grace_s: float = 10.0
    progress_interval_s: float = 0.5
    eval_threads: int | None = None
    max_time_min: float = MAX_TIME_MIN
    check_recipes: bool = True

    def __post_init__(self) -> None:
        # The children run in ``workdir``, not where the server started: every folder they are told about
        # (``state_dir`` gives the recipe, run, candidate and evaluation paths) must be absolute.
        for name in ("state_dir", "recipes_dir", "workdir"):
            object.__setattr__(self, name, Path(os.path.abspath(getattr(self, name))))
        if os.sep in self.python and not os.path.isabs(self.python):  # ./venv/bin/python, not a bare name
            object.__setattr__(self, "python", os.path.abspath(self.python))
        if self.max_training_jobs < 1:
            raise InvalidArgument(f"max_training_jobs must be positive, got {self.max_training_jobs}")
        if self.kill_grace_s < 0 or self.progress_interval_s <= 0:
            raise InvalidArgument("kill_grace_s must be >= 0 and progress_interval_s > 0")
        if not (math.isfinite(self.max_time_min) and 0 < self.max_time_min <= MAX_TIME_MIN):
            raise InvalidArgument(f"max_time_min must be in (0, {MAX_TIME_MIN:g}] minutes, got {self.max_time_min}")


@dataclass(frozen=True)
class TrainingRequest:
    """What a client asks for (the idempotency comparison is over exactly this).

    Args:
        dataset: a registered dataset's name or SHA-256.
        recipe, recipe_yaml: a recipe name, or a whole recipe as YAML (at most one).
        overrides: ``a.b=value`` recipe overrides, in order.
        base_model: ``NAME`` or ``NAME:VERSION`` to fine-tune from.
        model_name: the model to publish into (default: base model, recipe's model name, recipe name).
        max_time_min, epochs: the budget (at most one; none: the recipe's).
        device: auto, cpu or cuda. nproc_per_node: >1 runs torchrun.
        promote: gate, always or never. gate_margin: mIoU margin over the default.
    """

    dataset: str
    recipe: str = ""
    recipe_yaml: str = ""
    overrides: tuple[str, ...] = ()
    base_model: str = ""
    model_name: str = ""
    max_time_min: float | None = None
    epochs: int | None = None
    device: str = "auto"
    nproc_per_node: int = 1
    promote: str = "gate"
    gate_margin: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if not self.dataset:
            raise InvalidArgument("a training job needs a dataset (a registered name or hash)")
        if self.recipe and self.recipe_yaml:
            raise InvalidArgument("give a recipe name or an inline recipe (recipe_yaml), not both")
        if len(self.recipe_yaml.encode()) > MAX_RECIPE_BYTES:
            raise InvalidArgument(f"the inline recipe is larger than {MAX_RECIPE_BYTES} bytes")
        if not (self.recipe or self.recipe_yaml or self.base_model):
            raise InvalidArgument("a training job needs a recipe (name or inline YAML) or a base model to fine-tune")
        if len(self.overrides) > MAX_OVERRIDES:
            raise InvalidArgument(f"at most {MAX_OVERRIDES} overrides")
        if sum(len(text.encode()) for text in self.overrides) > MAX_RECIPE_BYTES:
            raise InvalidArgument(f"the overrides are larger than {MAX_RECIPE_BYTES} bytes together")
        values = 0
        for text in self.overrides:
            key = check_override(text)
            if any(key == p or key.startswith(p + ".") for p in PROTECTED_KEYS):
                raise InvalidArgument(f"override {text[:80]!r}: the service sets {key} itself")
            values += check_yaml_size(text.partition("=")[2], f"override {key}")
        if values > MAX_YAML_NODES:  # the trainer expands them all into one configuration
            raise InvalidArgument(f"the overrides' aliases expand them to more than {MAX_YAML_NODES} values "
                                  "together; write the values out, or use fewer aliases")
        check_client_config(self.recipe_yaml, self.overrides)
        if self.max_time_min is not None and self.epochs is not None:
            raise InvalidArgument("give one budget: max_time_min or epochs")
        if self.max_time_min is not None and not (math.isfinite(self.max_time_min)
                                                  and 0 < self.max_time_min <= MAX_TIME_MIN):
            raise InvalidArgument(f"max_time_min must be a positive number of minutes, at most {MAX_TIME_MIN:g}, "
                                  f"got {self.max_time_min}")
        if self.epochs is not None and not 1 <= self.epochs <= MAX_EPOCHS:
            raise InvalidArgument(f"epochs must be in 1..{MAX_EPOCHS}, got {self.epochs}")
        if not _DEVICE.fullmatch(self.device):
            raise InvalidArgument(f"device must be auto, cpu or cuda, got {self.device[:40]!r}")
        if not 1 <= self.nproc_per_node <= 64:
            raise InvalidArgument(f"nproc_per_node must be in 1..64, got {self.nproc_per_node}")
        if self.promote not in POLICIES:
            raise InvalidArgument(f"promote must be one of {', '.join(POLICIES)}, got {self.promote[:40]!r}")
        if not (math.isfinite(self.gate_margin) and 0.0 <= self.gate_margin <= 1.0):
            raise InvalidArgument(f"gate_margin must be in [0, 1] (mIoU), got {self.gate_margin}")

    def budget_overrides(self) -> list[str]:
        """The budget as ``--set`` overrides. A time budget is the limit: the recipe's epoch count
        no longer caps it (unless the request's own overrides set ``train.epochs``)."""
        if self.max_time_min is not None:
            sets = [f"train.max_time_min={self.max_time_min:g}", "schedule.horizon=time"]
            if not any(o.partition("=")[0].strip() == "train.epochs" for o in self.overrides):
                sets.append(f"train.epochs={MAX_EPOCHS}")
            return sets
        if self.epochs is not None:
            return [f"train.epochs={self.epochs}", "train.max_time_min=null"]
        return []

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["overrides"] = list(self.overrides)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingRequest":
        return cls(**{**data, "overrides": tuple(data["overrides"])})


def check_override(text: str) -> str:
    """``a.b=value`` -> ``a.b`` (the value is the trainer's to check)."""
    key, sep, _ = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part or not part.replace("_", "").isalnum() for part in key.split(".")):
        raise InvalidArgument(f"override {text[:80]!r} must look like key.subkey=value")
    return key


def _client_part(recipe_yaml: str, overrides: tuple[str, ...]) -> dict[str, Any]:
    """What the client's part of a recipe sets: its inline recipe (if any) with its overrides applied,
    as the trainer applies them (``segsvc.overrides``)."""
    data = _yaml_mapping(recipe_yaml) if recipe_yaml else {}
    for text in overrides:
        apply_override(data, *parse_override(text))
    return data


def check_yaml_size(text: str, what: str) -> int:
    """Refuse YAML whose aliases expand it to more than ``MAX_YAML_NODES`` values, that contains itself (an
    alias inside its own anchor), or that nests more than ``MAX_YAML_DEPTH`` levels; ``what`` names it. Returns
    its expanded size in values (0 for YAML that does not parse or is empty).

    Only the node graph is built (``yaml.compose``: an alias is one more reference to its anchor's node, nothing
    is copied), and the expanded size is counted over it, each node once. YAML that does not parse is left to
    the parse that follows, which says what is wrong.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return 0
    except RecursionError:  # the composer recurses once per level; not an internal error
        raise InvalidArgument(f"{what} is nested more than {MAX_YAML_DEPTH} levels deep") from None
    if root is None:
        return 0
    size = _expanded_size(root)
    if size is None:
        raise InvalidArgument(f"{what} refers to itself (an alias inside its own anchor)")
    if size > MAX_YAML_NODES:
        raise InvalidArgument(f"{what}: its aliases expand it to more than {MAX_YAML_NODES} values; write the values "
                              "out, or use fewer aliases")
    if _depth(root) > MAX_YAML_DEPTH:  # walks the expanded document: after the size check, never a long walk
        raise InvalidArgument(f"{what} is nested more than {MAX_YAML_DEPTH} levels deep")
    return size


def _expanded_size(root: yaml.Node) -> int | None:
    """How many nodes ``root`` holds with every alias expanded (counted up to ``MAX_YAML_NODES`` + 1), or None
    when a node contains itself. Iterative: a deep document does not exhaust the stack here."""
    sizes: dict[int, int] = {}
    counting: set[int] = set()  # nodes whose children are being counted: reaching one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            counting.discard(key)
            sizes[key] = min(MAX_YAML_NODES + 1, 1 + sum(sizes[id(child)] for child in _yaml_children(node)))
        elif key in counting:
            return None
        elif key not in sizes:
            counting.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _yaml_children(node))
    return sizes[id(root)]


def _depth(root: yaml.Node) -> int:
    """How many levels ``root`` nests with its aliases expanded (a scalar: 1), up to ``MAX_YAML_DEPTH`` + 1.
    Every path is walked (an anchor's node is as deep as the deepest alias of it): call it on a document whose
    expanded size is bounded and that does not contain itself."""
    deepest = 0
    stack = [(root, 1)]
    while stack and deepest <= MAX_YAML_DEPTH:
        node, level = stack.pop()
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in _yaml_children(node))
    return deepest


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _yaml_mapping(text: str) -> dict[str, Any]:
    """A recipe's text as a mapping; ``InvalidArgument`` if it is not YAML or not a mapping, or is too large
    once its aliases are expanded or too deep (``check_yaml_size``)."""
    check_yaml_size(text, "the recipe")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"the recipe is not valid YAML: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("the recipe must be a YAML mapping")
    return data


def _file_keys(config: dict[str, Any]) -> list[str]:
    """The dotted ``FILE_KEYS`` and ``model.params`` ``*_path`` keys that ``config`` sets (to anything but null)."""
    found: list[str] = []
    for key in FILE_KEYS:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            found.append(key)
    model = config.get("model")
    params = model.get("params") if isinstance(model, dict) else None
    # Every mapping under model.params, each once (YAML aliases may share one), without recursion.
    todo: list[tuple[str, Any]] = [("model.params", params)]
    seen: set[int] = set()
    while todo:
        prefix, node = todo.pop()
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        for name, value in node.items():
            dotted = f"{prefix}.{name}"
            if str(name).lower().endswith(_PATH_PARAM_SUFFIX) and value is not None:
                found.append(dotted)
            todo.append((dotted, value))
    return found


def _lookup(config: dict[str, Any], key: str) -> Any:
    """The value of dotted ``key`` in nested mappings (None when a level is missing or not a mapping)."""
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _as_number(value: Any) -> float | None:
    """A number as the trainer reads it (YAML 1.1 reads ``1e9`` as a string); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def check_request_limits(config: dict[str, Any]) -> None:
    """Refuse a request's part of a recipe that asks more of the server than ``REQUEST_LIMITS`` allow.

    A value of the wrong type is left to the trainer, whose message names the type it expects.

    Raises:
        InvalidArgument: naming the first key over its limit and the limit.
    """
    for key, most in REQUEST_LIMITS.items():
        value = _lookup(config, key)
        items = value if isinstance(value, (list, tuple)) else [value]
        if len(items) > MAX_LIST_ITEMS:
            raise InvalidArgument(f"{key}: a request may give at most {MAX_LIST_ITEMS} items, got {len(items)}")
        for item in items:
            number = _as_number(item)
            if number is not None and not (math.isfinite(number) and number <= most):
                raise InvalidArgument(f"{key}: a request may ask for at most {most:g}, got {str(item)[:40]}")
    tile = _as_number(_lookup(config, "data.val_tile_size"))
    if tile is not None and 0 < tile < MIN_TILE:
        raise InvalidArgument(f"data.val_tile_size: tiles must be 0 (whole images) or at least {MIN_TILE} pixels, "
                              f"got {tile:g}")


def check_client_config(recipe_yaml: str, overrides: tuple[str, ...]) -> None:
    """Refuse a request whose own part (inline recipe, overrides) names a file on the server, or asks more of
    it than ``REQUEST_LIMITS`` allow (``check_request_limits``).

    Raises:
        InvalidArgument: naming the first such key (not its value, for a file).
    """
    client = _client_part(recipe_yaml, overrides)
    check_request_limits(client)
    keys = _file_keys(client)
    if keys:
        key = keys[0]
        hint = ("to fine-tune, give base_model: the service then sets it to that version"
                if key == "model.init_from" else "only the server's own recipes may set it")
        raise InvalidArgument(f"{key} names a file on the server, which a request may not set ({hint})")


def _recipe(request: TrainingRequest, base_config: dict[str, Any] | None, config: TrainingConfig
            ) -> tuple[str, dict[str, Any]]:
    if request.recipe:
        if not _RECIPE_NAME.fullmatch(request.recipe):
            raise InvalidArgument(f"invalid recipe name {request.recipe[:80]!r}")
        path = Path(config.recipes_dir) / f"{request.recipe}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in Path(config.recipes_dir).glob("*.yaml"))
            raise NotFound(f"no recipe named {request.recipe!r}; recipes: {names}")
        text, default_name = path.read_text(), request.recipe
    elif request.recipe_yaml:
        text, default_name = request.recipe_yaml, "inline"
    else:
        if not base_config:
            raise InvalidArgument(f"base model {request.base_model} records no training configuration; give a recipe")
        text, default_name = yaml.safe_dump(base_config), str(base_config.get("name") or "finetune")
    raw = _yaml_mapping(text)
    raw.setdefault("name", default_name)
    name = str(raw["name"])
    if not _RECIPE_NAME.fullmatch(name):
        raise InvalidArgument(f"recipe name {name[:80]!r} must be letters, digits, '-', '_' or '.'")
    return name, raw


def _record(datasets: DatasetRegistry, query: str) -> dict[str, Any]:
    record = datasets.get(query)
    return {"name": str(getattr(record, "name", query)), "sha256": str(record.sha256),
            "spec_path": str(Path(record.spec_path).resolve())}


def check_can_train(config: TrainingConfig) -> None:
    """Refuse training when the trainer would die on import here (a server image without its packages).

    The packages are looked up (``importlib.util.find_spec``), never imported: the service does not import
    the trainer. Only a trainer that runs with this interpreter (the default ``python``) can be checked.
    """
    if config.python != sys.executable:
        return
    for name in TRAINER_DEPENDENCIES:
        if importlib.util.find_spec(name) is None:
            raise FailedPrecondition(f"this server cannot train: the trainer's dependency {name} is not installed; "
                                     "run training in the trainer image")


def resolve_submission(request: TrainingRequest, datasets: DatasetRegistry, repository: ModelRepository,
                       config: TrainingConfig) -> dict[str, Any]:
    """The job's stored spec: everything it needs, resolved now (later changes do not move it)."""
    if request.max_time_min is not None and request.max_time_min > config.max_time_min:
        raise InvalidArgument(f"max_time_min: this server trains for at most {config.max_time_min:g} minutes, "
                              f"got {request.max_time_min:g}")
    dataset = _record(datasets, request.dataset)
    base = None
    base_config = None
    if request.base_model:
        name, version = parse_model_ref(request.base_model)
        version = repository.resolve_version(name, version)
        base_dir = repository.version_dir(name, version)
        base = {"model": name, "version": version, "dir": str(base_dir)}
        base_config = dict(repository.read_manifest(name, version).training.get("config") or {}) or None
    recipe_name, raw = _recipe(request, base_config, config)
    model_name = check_name(request.model_name or (base or {}).get("model") or _recipe_model_name(raw)
                            or recipe_name)
    if request.promote == "never":
        _check_never_servable(repository, model_name)
    check_processes(request)
    eval_sets = {"val": dataset}
    try:
        eval_sets["golden"] = _record(datasets, GOLDEN_PREFIX + model_name)
    except SegsvcError:  # none registered (or not a valid dataset name): no golden split
        pass
    return {
        "request": request.to_dict(), "dataset": dataset, "eval_sets": eval_sets, "base": base,
        "recipe_name": recipe_name, "recipe_text": yaml.safe_dump(raw, sort_keys=False), "model_name": model_name,
        "run_dir": f"{recipe_name}/run",
    }


def _recipe_model_name(raw: dict[str, Any]) -> str:
    """The recipe's ``output.model_name`` ("" when it names none). An inline recipe may set ``output``: one that
    is not a mapping, or a model name that is not text, is the client's mistake, not an internal error."""
    output = raw.get("output")
    if output is None:
        return ""
    if not isinstance(output, dict):
        raise InvalidArgument(f"the recipe's output must be a mapping, got {type(output).__name__}")
    name = output.get("model_name")
    if name is not None and not isinstance(name, str):
        raise InvalidArgument(f"the recipe's output.model_name must be a model name, got {type(name).__name__}")
    return name or ""


def _check_never_servable(repository: ModelRepository, name: str) -> None:
    """Refuse promote NEVER into a model with no version: the version the job publishes would be the model's
    only one, which every server serves by default (a DEFAULT pointer can only name a version that exists), so
    the policy could not be kept. Refused at submission, before hours of training, not reported after."""
    try:
        versions = repository.versions(name)
    except NotFound:
        versions = []
    if not versions:
        raise InvalidArgument(
            f"promote NEVER: model {name!r} has no version yet, so the version this job publishes would be its only "
            "one and served by default whatever the policy; submit with promote GATE or ALWAYS (the same for a first "
            "version), or publish into a model that has a version (model_name)")


def check_processes(request: TrainingRequest) -> None:
    """Refuse more trainer processes (``nproc_per_node``, one torchrun worker each) than the device can use: on
    CUDA one per visible GPU (each worker takes the GPU of its local rank), on the CPU one per CPU this server may
    run on (each gloo worker computes with at least one). ``auto`` is CUDA when a GPU is visible, as the trainer
    decides. The trainer inherits the server's environment, so it sees the same GPUs."""
    wanted = request.nproc_per_node
    if wanted <= 1:
        return
    gpus = 0 if request.device == "cpu" else _visible_gpus()
    if request.device == "cuda" and not gpus:
        raise InvalidArgument(f"nproc_per_node={wanted} on device cuda: this server sees no GPU; use device cpu")
    limit, unit = (gpus, "visible GPUs") if gpus else (usable_cpus(), "CPUs to run on")
    if wanted > limit:
        raise InvalidArgument(f"nproc_per_node: this server runs at most {limit} trainer processes on "
                              f"{'cuda' if gpus else 'cpu'} (it has {limit} {unit}), got {wanted}")


def _visible_gpus() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def trainer_argv(spec: dict[str, Any], root: Path, config: TrainingConfig, resume: bool) -> list[str]:
    """``python -m training`` (or torchrun) with the recipe, the client's overrides and then the service's
    (the server's time limit, ``TrainingConfig.max_time_min``, unless the run already has a lower one)."""
    request = TrainingRequest.from_dict(spec["request"])
    if request.nproc_per_node > 1:
        argv = [config.python, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={request.nproc_per_node}", "-m", "training"]
    else:
        argv = [config.python, "-m", "training"]
    argv += _trainer_args(spec, root, config)
    if resume:
        argv += ["--resume", str(root / spec["run_dir"])]
    return argv


def check_argv(spec: dict[str, Any], root: Path, config: TrainingConfig) -> list[str]:
    """``python -m training --check`` with the job's recipe (``<root>/recipe.yaml``) and every ``--set`` its trainer
    gets: one process, also for a torchrun job (``check_processes`` checks how many it may start)."""
    return [config.python, "-m", "training", *_trainer_args(spec, root, config), "--check"]


def _trainer_args(spec: dict[str, Any], root: Path, config: TrainingConfig) -> list[str]:
    """``--config`` and the ``--set`` overrides of the job's trainer: the client's, then the service's."""
    request = TrainingRequest.from_dict(spec["request"])
    argv = ["--config", str(root / "recipe.yaml")]
    sets = [*request.overrides, *request.budget_overrides()]
    sets += _time_limit(spec.get("recipe_text") or "", sets, config)
    if spec.get("base"):
        sets.append(f"model.init_from={json.dumps(spec['base']['dir'])}")
    sets += [
        f"data.spec={json.dumps(spec['dataset']['spec_path'])}",
        f"output.runs_dir={json.dumps(str(root))}",
        "output.run_name=run",
        f"output.repo={json.dumps(str(root / 'candidate'))}",
        f"output.model_name={_yaml_text(spec['model_name'])}",
        f"train.device={request.device}",
        "train.progress=false",
    ]
    for text in sets:
        argv += ["--set", text]
    return argv


async def check_recipe(spec: dict[str, Any], config: TrainingConfig, env: dict[str, str],
                       public: Callable[[str, Path], str], slots: asyncio.Semaphore) -> None:
    """Refuse a job whose trainer would refuse its recipe: run ``python -m training --check`` (``check_argv``) in a
    scratch folder under ``<state_dir>/training``, removed after, once one of ``slots`` is free.

    The check runs as an asyncio subprocess in a session of its own (``run_bounded``), under
    ``RECIPE_CHECK_MEMORY_GIB`` of address space; the wait for a slot and the check together take at most
    ``RECIPE_CHECK_TIMEOUT_S``. A cancelled submission (the client's deadline) or a timeout kills the check's
    group and waits for it to exit before its slot is given back and its folder removed. ``public(message,
    folder)`` makes the trainer's message one a client may read (the scratch folder and the server's other
    paths named, not shown).

    Raises:
        InvalidArgument: the trainer's own message (``training: error: ...``), a model too large for the
            check's memory limit included.
        DeadlineExceeded: the wait and the check took longer than ``RECIPE_CHECK_TIMEOUT_S``.
        FailedPrecondition: the check failed without saying why in its own terms (it could not start, or crashed).
    """
    try:
        async with asyncio.timeout(RECIPE_CHECK_TIMEOUT_S), slots:
            await _run_check(spec, config, env, public)
    except TimeoutError:
        raise DeadlineExceeded(f"the trainer's check of the recipe took more than {RECIPE_CHECK_TIMEOUT_S:g} s; "
                               "the server is busy: submit again later") from None


async def _run_check(spec: dict[str, Any], config: TrainingConfig, env: dict[str, str],
                     public: Callable[[str, Path], str]) -> None:
    root = await asyncio.to_thread(_check_folder, Path(config.state_dir) / "training", spec["recipe_text"])
    try:
        output = root / "check.log"
        code = await run_bounded(check_argv(spec, root, config), output=output, cwd=config.workdir,
                                 env={**env, **RECIPE_CHECK_ENV}, max_address_space=RECIPE_CHECK_MEMORY_GIB << 30)
        if code == 0:
            return
        said, last = await asyncio.to_thread(lambda: (trainer_error(output), last_words(output)))
        if code == NOT_FOUND and last and last.startswith(CANNOT_RUN):
            log.warning("the recipe check cannot start the trainer %s: %s", config.python, last)
            raise FailedPrecondition("this server cannot start its trainer (its configured Python): "
                                     f"{last.rpartition(': ')[2].strip() or 'cannot run it'}")
        if said is not None:
            raise InvalidArgument(public(said, root)[:MAX_REASON_CHARS])
        raise FailedPrecondition(public(f"the trainer's check of the recipe failed (exit code {code})"
                                        + (f": {last}" if last else ""), root)[:MAX_REASON_CHARS])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _check_folder(parent: Path, recipe_text: str) -> Path:
    """A new scratch folder under ``parent`` (made if need be) for one check, its ``recipe.yaml`` written."""
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=".check-", dir=parent))
    try:
        (root / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def trainer_error(log_path: Path, start: int = 0, limit: int = LOG_TAIL_BYTES) -> str | None:
    """The trainer's own last error in ``log_path`` (the text after ``training: error:``), or None.

    Only the log's output from byte ``start`` on (this attempt's) is looked at, and of that at most its
    last ``limit`` bytes: a long log is not read whole. The text is as the trainer wrote it (paths included).
    """
    for line in reversed(log_tail(log_path, start, limit)):
        found = TRAINER_ERROR.fullmatch(line.strip())
        if found:
            return found.group(1).strip()
    return None


def last_words(log_path: Path, start: int = 0, limit: int = LOG_TAIL_BYTES) -> str | None:
    """What a child that failed without saying why in its own terms last printed, from byte ``start`` of
    ``log_path`` on: the first failure of torchrun's report (a worker's rank and exit code), else its last line
    with words in it (a traceback's exception); None when it printed nothing. As written (paths included)."""
    lines = log_tail(log_path, start, limit)
    cause = _root_cause(lines)
    if cause is not None:
        return f"its torchrun worker of rank {cause[0]} exited with code {cause[1]}"
    for line in reversed(lines):
        if any(c.isalnum() for c in line):  # not a separator, nor a traceback's carets
            return line.strip()
    return None


def _root_cause(lines: list[str]) -> tuple[int, int] | None:
    """``(rank, exit code)`` of the first failure in torchrun's last report of a failed run (``ChildFailedError``)
    in ``lines``, or None when there is none."""
    heads = [i for i, line in enumerate(lines) if line.strip() == _ROOT_CAUSE]
    if not heads:
        return None
    rank = code = None
    for line in lines[heads[-1] + 1:]:
        text = line.strip()
        if text.startswith("==="):  # the report's end
            break
        if rank is None and (found := _CAUSE_RANK.match(text)):
            rank = int(found.group(1))
        elif code is None and (found := _CAUSE_EXIT.match(text)):
            code = int(found.group(1))
    return None if rank is None or code is None else (rank, code)


def log_tail(log_path: Path, start: int, limit: int) -> list[str]:
    """The lines of ``log_path`` from byte ``start`` on, at most its last ``limit`` bytes of them (a first line
    the read began inside of left out); none when it cannot be read."""
    try:
        with open(log_path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            offset = max(start, size - limit)
            f.seek(offset)
            lines = f.read(limit).decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    if offset > start and lines:  # the read may have begun inside a line
        lines = lines[1:]
    return lines


def _yaml_text(text: str) -> str:
    """``text`` as an override value that YAML reads back as that text: plain when it does (``shapes``), quoted
    when YAML would read another type (a model named ``123``, ``true`` or ``null``)."""
    try:
        if yaml.safe_load(text) == text:
            return text
    except yaml.YAMLError:
        pass
    return json.dumps(text)


def _time_limit(recipe_text: str, sets: list[str], config: TrainingConfig) -> list[str]:
    """``train.max_time_min`` set to the server's limit, unless the recipe with ``sets`` applied has a lower one."""
    try:
        data = yaml.safe_load(recipe_text) if recipe_text else {}
        data = data if isinstance(data, dict) else {}
        for text in sets:
            apply_override(data, *parse_override(text))
    except (yaml.YAMLError, SegsvcError):  # the trainer names what is wrong; the limit still applies
        data = {}
    budget = _as_number(_lookup(data, "train.max_time_min"))
    if budget is not None and budget <= config.max_time_min:  # one <= 0 is the trainer's to refuse
        return []
    return [f"train.max_time_min={config.max_time_min!r}"]


def eval_argv(config: TrainingConfig, model_dir: Path, spec_path: str, out: Path, device: str) -> list[str]:
    """``segsvc eval`` of one model version on a dataset's val split, into ``out``."""
    argv = [config.python, "-m", "segsvc", "eval", "--model", str(model_dir), "--data", str(spec_path),
            "--split", "val", "--out", str(out), "--device", device,
            "--no-progress"]
    if config.eval_threads:
        argv += ["--threads", str(config.eval_threads)]
    return argv

