"""The ``onnxruntime`` backend: the version's ONNX export (``segsvc export``) run by ONNX Runtime.

The file is the one the manifest's ``exports.onnx`` names, read once, and its
SHA-256 must match the recorded one, so a stale or swapped export is refused at
load rather than served; one larger than protobuf allows, or with external data
files (which the SHA-256 does not cover), is refused too. CPU runs the CPU execution provider with ``threads`` intra-op
threads; CUDA needs the CUDA provider (the ``onnxruntime-gpu`` wheel).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segsvc.errors import ArtifactError, InvalidArgument
from segsvc.inference.backends.base import Backend, EngineConfig, manifest_geometry
from segsvc.inference.contract import Geometry
from segsvc.models.artifact import Manifest, open_version_file

log = logging.getLogger(__name__)

# Used when the graph's live tensors cannot be counted: generous, so admission errs on the safe side.
FALLBACK_BYTES_PER_PIXEL = 4096.0
# ONNX Runtime's memory beyond the node outputs alive at once: its CPU arena grows in powers of two, the
# kernels' own buffers (checked against the peak RSS of real passes by ``bench/bench_hardening.py``).
ORT_WORKSPACE_FACTOR = 2.5


def peak_live_tensors(data: bytes, probe: np.ndarray) -> int | None:
    """The most bytes of node outputs alive at once when the graph ``data`` runs on ``probe``: each output
    counted from the node that makes it until its last reader has run (the graph's outputs to the end).

    Like the torch backend's layer-output count, this depends on the graph and the input alone: the
    process's resident memory, which an earlier measurement used, does not grow when the allocator reuses
    memory earlier traffic freed, and a version loaded after traffic then measured the floor of 1 byte per
    pixel. The sizes come from ONNX shape inference on the graph without its weights (``_light``: a few
    milliseconds, no copy of the weights kept); where it leaves a shape unknown (a size computed at run time,
    as SegNet's max-unpooling export does), from ONNX Runtime running a copy that returns every node output
    (``_run_sizes``). ``None`` for a graph neither can size (subgraphs are not followed).
    """
    import onnx

    try:
        model = onnx.load_model_from_string(data)
        light = _light(model, probe.shape)
        del model  # the weights: the sizes below need the graph alone
        sizes = _inferred_sizes(light)
        if sizes is None:
            sizes = _run_sizes(data, light, probe)
    except Exception:  # onnx and onnxruntime raise their own exception types
        log.warning("cannot count the live tensors of the exported graph", exc_info=True)
        return None
    nodes = list(light.graph.node)
    finals = {o.name for o in light.graph.output}
    last_read = {name: i for i, node in enumerate(nodes) for name in node.input}
    now = peak = 0
    for i, node in enumerate(nodes):
        now += sum(sizes[name] for name in node.output if name)
        peak = max(peak, now)
        now -= sum(sizes[name] for name in set(node.input)
                   if name in sizes and name not in finals and last_read[name] == i)
    return peak


# Weights of at most this many elements stay values in ``_light``'s graph: shape constants (a Reshape's target,
# a Resize's scales) that shape inference reads; larger ones become inputs of their shape.
_CONSTANT_ELEMENTS = 1024


def _light(model: Any, input_shape: tuple[int, ...]) -> Any:
    """``model``'s graph with its input fixed to ``input_shape`` and its weights reduced to their shapes."""
    from onnx import helper

    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [helper.make_tensor_value_info(i.name, i.type.tensor_type.elem_type, list(input_shape))
              for i in graph.input if i.name not in weights]
    constants = [t for t in graph.initializer if math.prod(t.dims) <= _CONSTANT_ELEMENTS]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
               for t in graph.initializer if math.prod(t.dims) > _CONSTANT_ELEMENTS]
    light = helper.make_graph(list(graph.node), graph.name, inputs, list(graph.output), constants)
    return helper.make_model(light, opset_imports=model.opset_import, ir_version=model.ir_version)


def _inferred_sizes(light: Any) -> dict[str, int] | None:
    """Bytes of each node output by ONNX shape inference (with data propagation); None if one stays unknown."""
    from onnx import helper, shape_inference

    inferred = shape_inference.infer_shapes(light, data_prop=True).graph
    known = {v.name: v.type.tensor_type for v in [*inferred.value_info, *inferred.output]}
    sizes = {}
    for name in (name for node in light.graph.node for name in node.output if name):
        tensor = known.get(name)
        if tensor is None or not tensor.HasField("shape") or not all(d.HasField("dim_value") for d in tensor.shape.dim):
            return None
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
        sizes[name] = math.prod(d.dim_value for d in tensor.shape.dim) * itemsize
    return sizes


def _run_sizes(data: bytes, light: Any, probe: np.ndarray) -> dict[str, int]:
    """Bytes of each node output, from ONNX Runtime running the graph ``data`` on ``probe`` with every node
    output returned (typed by ``light``'s shape inference; unoptimised, so each exists)."""
    import onnx
    import onnxruntime as ort
    from onnx import shape_inference

    typed = shape_inference.infer_shapes(light).graph
    known = {v.name: v for v in [*typed.value_info, *typed.output]}
    model = onnx.load_model_from_string(data)
    finals = {o.name for o in model.graph.output}
    for name in (name for node in model.graph.node for name in node.output if name):
        if name not in finals:
            model.graph.output.append(known[name])
    graph = model.SerializeToString()
    del model  # one copy of the weights at a time, besides ``data``
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    del graph
    values = session.run(None, {session.get_inputs()[0].name: probe})
    return {out.name: int(np.asarray(value).nbytes) for out, value in zip(session.get_outputs(), values)}


# protobuf's limit on one message: a bigger graph needs external data, which a served export may not have.
MAX_ONNX_BYTES = 2 << 30


def read_onnx_export(version_dir: Path, manifest: Manifest, root: Path | None = None) -> tuple[str, bytes]:
    """The file name and bytes of the version's exported ONNX graph, checked against the manifest's SHA-256.

    The bytes that are hashed are the bytes ONNX Runtime gets (the file is read once: no swap between the
    check and the load), the file's size is checked before it is read, and a graph whose tensors live in
    external data files is refused: those files are not covered by the recorded SHA-256, and their
    ``location`` is a path the graph names. With ``root`` (the repository's resolved root) the file is
    opened beneath it as the weights are (``artifact.open_version_file``): a symlink swapped in after the
    repository checked the version fails the open instead of leading it out of the root.

    Raises:
        ArtifactError: no export recorded; the file is missing, not a regular file, larger than
            ``MAX_ONNX_BYTES``, or its hash differs; the graph has external data.
        PathOutsideRoot: with ``root``, the file leads out of it.
    """
    record: Any = manifest.exports.get("onnx")
    if not isinstance(record, dict) or not record.get("file") or not record.get("sha256"):
        raise ArtifactError(f"model {manifest.name} version {manifest.version} has no ONNX export; run "
                            f"`segsvc export {manifest.name}:{manifest.version} --format onnx` first")
    name = str(record["file"])
    ref = f"{name!r} of {manifest.name}:{manifest.version}"
    if Path(name).name != name or name in (".", ".."):
        raise ArtifactError(f"the ONNX export {ref} is missing; export it again")
    try:
        f = open_version_file(version_dir / name, root)
    except FileNotFoundError:
        raise ArtifactError(f"the ONNX export {ref} is missing; export it again") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # open_version_file's answer for anything but a regular file
            raise ArtifactError(f"the ONNX export {ref} is not a regular file") from None
        raise ArtifactError(f"the ONNX export {ref} cannot be read ({exc.strerror or type(exc).__name__})") from None
    with f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ArtifactError(f"the ONNX export {ref} is not a regular file")
        if info.st_size > MAX_ONNX_BYTES:
            raise ArtifactError(f"the ONNX export {ref} is {info.st_size} bytes, larger than the limit of "
                                f"{MAX_ONNX_BYTES}")
        data = f.read(MAX_ONNX_BYTES + 1)
    if len(data) > MAX_ONNX_BYTES:
        raise ArtifactError(f"the ONNX export {ref} is larger than the limit of {MAX_ONNX_BYTES} bytes")
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise ArtifactError(f"{name} of {manifest.name}:{manifest.version} does not match the SHA-256 its "
                            f"manifest records; export it again")
    external = external_tensors(data)
    if external:
        raise ArtifactError(f"the ONNX export {ref} keeps {len(external)} tensors in external data files (e.g. "
                            f"{external[:3]}), which its SHA-256 does not cover; export it again as one file")
    return name, data


def external_tensors(data: bytes) -> list[str]:
    """The names of the tensors of an ONNX graph (any subgraph included) stored in external data files."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except DecodeError:  # not an ONNX model: ONNX Runtime says what is wrong with it
        return []
    return [t.name for t in _get_all_tensors(model) if uses_external_data(t)]


def export_geometry(manifest: Manifest) -> Geometry:
    """The padding of an exported version: the contract's, else what the export recorded from the
    module (manifests published before the contract recorded a stride)."""
    spec, record = manifest.inference, manifest.exports.get("onnx") or {}
    if spec.stride is None or spec.min_input_size is None:
        spec = replace(spec, stride=spec.stride or record.get("stride"),
                       min_input_size=spec.min_input_size or record.get("min_input_size"))
    return manifest_geometry(spec)


def providers_for(device: torch.device) -> list[str]:
    """ONNX Runtime execution providers for ``device``.

    Raises:
        InvalidArgument: a CUDA device without ONNX Runtime's CUDA provider.
    """
    import onnxruntime as ort

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise InvalidArgument("the onnxruntime backend on CUDA needs ONNX Runtime's CUDA provider (the "
                              "onnxruntime-gpu wheel); use --device cpu or the torch backend")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on an exported model.

    Args:
        source: the ``.onnx`` file, or its bytes (input ``[N, C, H, W]`` float32, output logits).
        geometry: padding (stride, minimum size), from the manifest.
        device: ``cpu``, or ``cuda`` with the CUDA provider.
        channels: input channels.
        threads: intra-op threads (0: torch's thread count, which the server sets).
        label: what messages call ``source`` (default: its file name, or "the exported graph").

    Example:
        >>> backend = OnnxRuntimeBackend.for_manifest(Path("repo/unet/1"), manifest, torch.device("cpu"))  # doctest: +SKIP
    """

    name = "onnxruntime"

    def __init__(self, source: Path | bytes, geometry: Geometry, device: torch.device, channels: int,
                 threads: int = 0, label: str | None = None) -> None:
        import onnxruntime as ort

        super().__init__(geometry, device, channels)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initialisers are noise to a server log
        # Idle intra-op threads sleep instead of spinning: between runs the server's own torch work (padding,
        # arg-max) would otherwise share the cores with ORT's spinning pool.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        label = label or (source.name if isinstance(source, Path) else "the exported graph")
        try:
            self.session = ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                                providers=providers_for(device))
        except Exception as exc:  # onnxruntime raises its own exception types
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            if isinstance(source, Path):
                reason = reason.replace(str(source), label)
            raise ArtifactError(f"ONNX Runtime cannot load {label}: {reason[:300]}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.threads = options.intra_op_num_threads
        # The graph, until ``measure_memory`` has counted its tensors (the loader does so once, at load).
        self._graph: Path | bytes | None = source
        self._bytes_per_pixel: float | None = None

    @classmethod
    def for_manifest(cls, version_dir: Path, manifest: Manifest, device: torch.device,
                     config: EngineConfig | None = None, root: Path | None = None) -> "OnnxRuntimeBackend":
        """The backend of a version directory whose manifest records an ONNX export (opened beneath ``root``)."""
        name, data = read_onnx_export(version_dir, manifest, root)  # ONNX Runtime gets the bytes that were hashed
        return cls(data, export_geometry(manifest), device, manifest.input.channels,
                   threads=config.threads if config else 0, label=name)

    def run(self, padded: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(padded.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session.run([self.output_name], {self.input_name: x})
        return torch.from_numpy(logits)

    def measure_memory(self, size: int = 128) -> float:
        """Bytes per input pixel of one pass: the node outputs alive at once (``peak_live_tensors``) times
        ``ORT_WORKSPACE_FACTOR``; a generous constant for a graph whose tensors cannot be counted.

        Counted once, at the first call: the graph's bytes are then let go, and later calls return that count.
        """
        if self._bytes_per_pixel is None:
            x = self.probe_input(size)
            graph, self._graph = self._graph, None
            data = graph.read_bytes() if isinstance(graph, Path) else graph
            live = peak_live_tensors(data, x.numpy()) if data is not None else None
            self._bytes_per_pixel = (FALLBACK_BYTES_PER_PIXEL if live is None
                                     else max(live * ORT_WORKSPACE_FACTOR / (x.shape[-2] * x.shape[-1]), 1.0))
        return self._bytes_per_pixel
