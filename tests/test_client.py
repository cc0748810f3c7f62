"""Which local files the client commands read (``segsvc segment``, ``segsvc jobs upload``): no server needed."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import grpc
import pytest

from segsvc.client import image_files, named_image_files
from segsvc.errors import InvalidArgument
from segsvc.jobclient import local_images
from tests.rpc_errors import StatusError


def _tree(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_folders_are_walked_recursively_and_named_relative_to_themselves(tmp_path):
    _tree(tmp_path, ["in/b.PNG", "in/a.jpg", "in/notes.txt", "in/sub/c.tif", "in/sub/deeper/d.webp", "e.png"])
    named = named_image_files([tmp_path / "in", tmp_path / "e.png"])
    assert [(p.relative_to(tmp_path).as_posix(), n) for p, n in named] == [
        ("in/a.jpg", PurePosixPath("a.jpg")),
        ("in/b.PNG", PurePosixPath("b.PNG")),
        ("in/sub/c.tif", PurePosixPath("sub/c.tif")),
        ("in/sub/deeper/d.webp", PurePosixPath("sub/deeper/d.webp")),
        ("e.png", PurePosixPath("e.png")),
    ]
    assert image_files([tmp_path / "in", tmp_path / "e.png"]) == [p for p, _ in named]


def test_the_skipped_folder_is_left_out_of_walks_but_not_a_file_named_in_it(tmp_path):
    _tree(tmp_path, ["in/a.png", "in/out/a_mask.png", "in/out/deeper/b_mask.png", "in/outside.png"])
    walked = named_image_files([tmp_path / "in"], skip=tmp_path / "in" / "out")
    assert [n.as_posix() for _, n in walked] == ["a.png", "outside.png"]
    named = named_image_files([tmp_path / "in" / "out" / "a_mask.png"], skip=tmp_path / "in" / "out")
    assert [n.as_posix() for _, n in named] == ["a_mask.png"]


def test_a_missing_path_is_refused_by_name(tmp_path):
    with pytest.raises(InvalidArgument, match="nowhere.png does not exist"):
        named_image_files([tmp_path / "nowhere.png"])


def test_uploads_keep_one_folders_layout_and_need_distinct_names_otherwise(tmp_path):
    _tree(tmp_path, ["scans/a.png", "scans/sub/b.png", "more/sub/a.png"])
    files, root = local_images([tmp_path / "scans"])
    assert root == tmp_path / "scans"
    assert [f.relative_to(root).as_posix() for f in files] == ["a.png", "sub/b.png"]
    # two folders: files are uploaded under their own names, and a/sub/a.png collide
    with pytest.raises(InvalidArgument, match="distinct names"):
        local_images([tmp_path / "scans", tmp_path / "more"])


def test_a_tile_overlap_without_a_tile_size_is_refused_not_dropped():
    """segsvc.v1 carries an overlap only inside TilingOptions, whose tile_size 0 means "no tiling": the client
    cannot send an overlap for the model's own tile size, so it says so instead of silently leaving it out."""
    import numpy as np

    from segsvc.client import SegmentationClient

    with pytest.raises(InvalidArgument, match="tile_overlap needs tile_size"):
        SegmentationClient.build_request(np.zeros((4, 4, 3), np.uint8), model="tiny", tile_overlap=0.5)
    request = SegmentationClient.build_request(np.zeros((4, 4, 3), np.uint8), tile_size=64, tile_overlap=0.5)
    assert (request.options.tiling.tile_size, request.options.tiling.overlap) == (64, 0.5)
    assert not SegmentationClient.build_request(b"png").options.HasField("tiling")


def test_segment_many_refuses_bad_options_before_streaming():
    """Options are the same for every image: a bad one is raised as itself, not as the stream's UNKNOWN
    "Exception iterating requests!" (the request iterator runs on gRPC's thread), and before any call."""
    import numpy as np

    from segsvc.client import SegmentationClient

    with SegmentationClient("127.0.0.1:1", timeout_s=10) as c:  # nothing listens there: no call may be made
        images = [np.zeros((4, 4, 3), np.uint8)] * 2
        with pytest.raises(InvalidArgument, match="tile_overlap needs tile_size"):
            c.segment_many(images, model="tiny", progress=False, tile_overlap=0.5)
        with pytest.raises(InvalidArgument, match="encoding must be one of"):
            c.segment_many(images, model="tiny", progress=False, encoding="bogus")


@pytest.mark.parametrize(("options", "message"), [
    ({"tile_size": -5}, "tile_size must be 0 (no tiling) or from 16 to 16384, got -5"),
    ({"tile_size": 5_000_000_000}, "tile_size must be 0 (no tiling) or from 16 to 16384, got 5000000000"),
    ({"tile_size": 8}, "tile_size must be 0 (no tiling) or from 16 to 16384, got 8"),
    ({"tile_size": 64.5}, "tile_size must be 0 (no tiling) or from 16 to 16384, got 64.5"),
    ({"tile_size": True}, "tile_size must be 0 (no tiling) or from 16 to 16384, got True"),
    ({"tile_size": 64, "tile_overlap": 2.0}, "tile_overlap must be a fraction in [0, 0.75], got 2.0"),
    ({"tile_size": 64, "tile_overlap": float("nan")}, "tile_overlap must be a fraction in [0, 0.75], got nan"),
    ({"tile_size": 64, "tile_overlap": "0.5"}, "tile_overlap must be a fraction in [0, 0.75], got '0.5'"),
    ({"flip_tta": "yes"}, "flip_tta must be True or False (None: the model's default), got 'yes'"),
])
def test_out_of_range_tiling_and_tta_options_are_refused_by_name(options, message):
    """Not protobuf's bare ValueError ("Value out of range") or TypeError: the server's wording, before any call."""
    import numpy as np

    from segsvc.client import SegmentationClient

    with pytest.raises(InvalidArgument) as caught:
        SegmentationClient.build_request(np.zeros((4, 4, 3), np.uint8), model="tiny", **options)
    assert str(caught.value) == message
    with SegmentationClient("127.0.0.1:1", timeout_s=10) as c, pytest.raises(InvalidArgument):
        c.segment(np.zeros((4, 4, 3), np.uint8), model="tiny", **options)


def test_valid_tiling_and_tta_options_reach_the_request():
    import numpy as np

    from segsvc.client import SegmentationClient

    image = np.zeros((4, 4, 3), np.uint8)
    for size in (0, 16, 16384):
        assert SegmentationClient.build_request(image, tile_size=size).options.tiling.tile_size == size
    request = SegmentationClient.build_request(image, tile_size=32, tile_overlap=0.75, flip_tta=False)
    assert request.options.tiling.overlap == 0.75 and request.options.HasField("flip_tta")
    assert not request.options.flip_tta


def test_an_overlay_of_an_array_that_is_not_uint8_is_refused_by_name():
    """LabelMap.overlay blended a 16-bit or float array's values unscaled: a 16-bit photo came out white and a
    [0, 1] float image black, with no error. A path or encoded bytes of a 16-bit image still work (decoded to
    8 bits, as the server decodes them)."""
    import numpy as np

    from segsvc.client import LabelMap, Timings
    from segsvc.inference.codec import encode_png

    result = LabelMap(mask=np.array([[0, 1], [1, 0]], np.uint8), class_names=("a", "b"),
                      palette=np.array([[0, 0, 0], [255, 0, 0]], np.uint8), model="m", version=1, request_id="",
                      timings=Timings(0.0, 0.0, 0.0, 1))
    photo16 = np.full((2, 2, 3), 20000, np.uint16)
    for image in (photo16, np.full((2, 2, 3), 0.3, np.float32)):
        with pytest.raises(InvalidArgument, match=f"overlay images must be uint8 arrays, got {image.dtype}"):
            result.overlay(image)
    blended = result.overlay(encode_png(photo16[:, :, 0]), alpha=0.5)
    assert blended.dtype == np.uint8 and blended[0, 0].tolist() == [39, 39, 39]  # 20000 >> 8 = 78, half of it


@pytest.mark.parametrize(("options", "message"), [
    ({"version": -1}, "version must be a positive integer (None or 0: the default version), got -1"),
    ({"version": 2 ** 32}, "version must be a positive integer (None or 0: the default version), got 4294967296"),
    ({"version": "2"}, "version must be a positive integer (None or 0: the default version), got '2'"),
    ({"version": 1.5}, "version must be a positive integer (None or 0: the default version), got 1.5"),
    ({"model": 7}, "model must be a model name (str), got 7"),
])
def test_a_bad_model_or_version_is_refused_by_name(options, message):
    """Not protobuf's bare ValueError ("Value out of range: -1") or TypeError, before any call, in every call
    that names a model version."""
    import numpy as np

    from segsvc.client import SegmentationClient

    with pytest.raises(InvalidArgument) as caught:
        SegmentationClient.build_request(np.zeros((4, 4, 3), np.uint8), **options)
    assert str(caught.value) == message
    with SegmentationClient("127.0.0.1:1", timeout_s=10) as c:  # nothing listens there: no call may be made
        with pytest.raises(InvalidArgument, match="must be"):
            c.segment_many([np.zeros((4, 4, 3), np.uint8)], progress=False, **options)
        if "version" in options:
            for call in (c.get_model, c.load_model, c.unload_model, c.set_default_version):
                with pytest.raises(InvalidArgument, match="version must be a positive integer"):
                    call("m", options["version"])
            with pytest.raises(InvalidArgument, match="version must be a positive integer"):
                c.submit_job(["a"], version=options["version"])


@pytest.mark.parametrize("timeout_s", ["-5", "0", "nan", "inf"])
def test_a_timeout_that_is_no_positive_number_of_seconds_is_named_before_connecting(tmp_path, monkeypatch, capsys,
                                                                                   timeout_s):
    """--timeout-s -5 or 0 said "no server answered ... within -5 s" (the server may well run), and nan or inf
    reached gRPC, whose deadline then passed at once ("Deadline Exceeded") after the wait to connect."""
    import segsvc.cli_client
    from segsvc.cli import main

    monkeypatch.setattr(segsvc.cli_client, "CONNECT_TIMEOUT_S", 0.5)  # before the fix: the wait for 127.0.0.1:1
    _tree(tmp_path, ["in/a.png"])
    assert main(["segment", str(tmp_path / "in"), "--server", "127.0.0.1:1", "--out", str(tmp_path / "out"),
                 "--timeout-s", timeout_s, "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"segsvc: error: --timeout-s must be a positive number of seconds, "
                                       f"got {float(timeout_s):g}\n")


def test_an_output_folder_that_holds_an_input_folder_is_refused_by_name(tmp_path, capsys):
    """`segsvc segment photos --out photos` left out every image of photos (all lie in --out) and said "no images
    found in photos", which has them; it names the real problem, before connecting."""
    from segsvc.cli import main

    _tree(tmp_path, ["photos/a.png", "photos/sub/b.png"])
    for out in (tmp_path / "photos", tmp_path):
        with pytest.raises(InvalidArgument, match="the output folder .* holds the input folder"):
            named_image_files([tmp_path / "photos"], skip=out)
    assert main(["segment", str(tmp_path / "photos"), "--server", "127.0.0.1:1", "--out", str(tmp_path / "photos"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"the output folder {tmp_path / 'photos'} holds the input folder {tmp_path / 'photos'}" in err, err


# -- one path given alone, names of the wrong type, a closed client, a fetch into a file -------------------------
def _offline_client():  # type: ignore[no-untyped-def]
    """A client of an address where nothing listens: a test that reaches the network fails there."""
    from segsvc.client import SegmentationClient

    return SegmentationClient("127.0.0.1:1", timeout_s=10)


def test_a_job_over_one_server_path_given_as_a_str_names_that_path():
    """client.submit_job("shapes/images/val") sent one path per character ("input 's' matches no image under
    the data root"); a str or a path object is one input, a list holds several."""
    from pathlib import PurePosixPath

    from google.longrunning import operations_pb2

    sent = []
    with _offline_client() as c:
        def job_call(method, request, timeout_s=None):  # type: ignore[no-untyped-def]
            sent.append(list(request.inputs.paths.paths))
            return operations_pb2.Operation(name="jobs/j1")

        c._job_call = job_call  # type: ignore[method-assign]
        c.submit_job("shapes/images/val")
        c.submit_job(PurePosixPath("shapes/images"))
        c.submit_job(["a", PurePosixPath("b/c")])
        with pytest.raises(InvalidArgument, match=r"^inputs holds 3: paths are str or os.PathLike, not int$"):
            c.submit_job(["a", 3])
    assert sent == [["shapes/images/val"], ["shapes/images"], ["a", "b/c"]]


def test_local_files_given_as_one_str_are_that_path(tmp_path):
    """local_images("folder") (client.upload_images, submit_job(upload=...)) and image_files("folder") walked
    a path per character of the name: "f does not exist"."""
    _tree(tmp_path, ["scans/a.png", "scans/b/c.png"])
    files, root = local_images(str(tmp_path / "scans"))
    assert (files, root) == ([tmp_path / "scans/a.png", tmp_path / "scans/b/c.png"], tmp_path / "scans")
    assert local_images(tmp_path / "scans") == (files, root)
    assert image_files(str(tmp_path / "scans")) == files
    assert named_image_files(tmp_path / "scans/a.png") == [(tmp_path / "scans/a.png", PurePosixPath("a.png"))]
    with pytest.raises(InvalidArgument, match="the files to upload is a path or a list of paths"):
        local_images(b"scans")


@pytest.mark.parametrize("make", [lambda np: "street.png", lambda np: Path("street.png"),
                                  lambda np: b"\x89PNG\r\n\x1a\n", lambda np: np.zeros((4, 5), np.uint8),
                                  lambda np: np.zeros((4, 5, 3), np.uint8)],
                         ids=["str", "path", "bytes", "array-2d", "array-3d"])
def test_segment_many_refuses_one_image_given_alone(make):
    """segment_many("street.png") sent an image per character ("cannot read image 's'"), and one H x W x 3
    array went row by row, each row answered as a W x 3 grey image without a word. Refused before any call."""
    import numpy as np

    image = make(np)
    with _offline_client() as c:
        with pytest.raises(InvalidArgument, match=r"^segment_many takes a list of images, got one .*: pass \[image\], "
                                                  r"or call segment\(\) for one image"):
            c.segment_many(image, progress=False)


@pytest.mark.parametrize("method", ["get_model", "load_model", "unload_model", "set_default_version"])
def test_every_call_that_names_a_model_refuses_a_name_that_is_not_a_str(method):
    """c.get_model(5) raised protobuf's "TypeError: bad argument type for built-in operation"; segment() already
    named the argument. Before any call."""
    with _offline_client() as c:
        with pytest.raises(InvalidArgument) as caught:
            getattr(c, method)(5, 1)
    assert str(caught.value) == "model must be a model name (str), got 5"


def test_names_of_training_jobs_datasets_and_jobs_that_are_not_str_are_refused_by_name(tmp_path):
    with _offline_client() as c:
        for call, message in ((lambda: c.submit_training_job("d", base_model=3), "base_model must be a str, got 3"),
                              (lambda: c.submit_training_job(7), "dataset must be a str, got 7"),
                              (lambda: c.get_dataset(1), "name must be a str, got 1"),
                              (lambda: c.job(42), "job name must be a str, got 42"),
                              (lambda: c.upload_dataset(tmp_path, "d", class_names="bg,cat"),
                               "class_names is a list of str, got one str 'bg,cat'")):
            with pytest.raises(InvalidArgument, match=f"^{message}"):
                call()


def test_a_call_on_a_closed_client_says_the_client_is_closed(tmp_path):
    """Every call raised grpc's "ValueError: Cannot invoke RPC on closed channel!"."""
    import numpy as np
    from google.longrunning import operations_pb2

    from segsvc.errors import FailedPrecondition
    from segsvc.jobclient import JobHandle

    _tree(tmp_path, ["in/a.png"])
    c = _offline_client()
    job = JobHandle(c, operations_pb2.Operation(name="jobs/j1"))
    c.close()
    calls = {
        "list_models": lambda: c.list_models(),
        "get_model": lambda: c.get_model("m"),
        "segment": lambda: c.segment(np.zeros((4, 4, 3), np.uint8)),
        "segment_many": lambda: c.segment_many([np.zeros((4, 4, 3), np.uint8)], progress=False),
        "health": lambda: c.health(),
        "wait_for_server": lambda: c.wait_for_server(1.0),
        "job": lambda: c.job("j1"),
        "list_jobs": lambda: list(c.list_jobs()),
        "job.status": lambda: job.status(),
        "job.fetch": lambda: job.fetch(tmp_path / "fetched"),
        "upload_images": lambda: c.upload_images(tmp_path / "in"),
        "list_datasets": lambda: c.list_datasets(),
        "upload_dataset": lambda: c.upload_dataset(tmp_path / "in", "d", class_names=["a", "b"]),
    }
    for name, call in calls.items():
        with pytest.raises(FailedPrecondition) as caught:
            call()
        assert str(caught.value).startswith("this client of 127.0.0.1:1 is closed"), (name, caught.value)


def test_a_fetch_into_a_file_names_the_destination_before_any_call(tmp_path):
    """job.fetch("/an/existing/file") raised NotADirectoryError naming an internal temporary
    (".class_shares.png.f1850dba.part-..."), after the call had begun."""
    from google.longrunning import operations_pb2

    from segsvc.jobclient import JobHandle, TrainingJobHandle

    (tmp_path / "out.png").write_bytes(b"x")
    with _offline_client() as c:
        for handle in (JobHandle, TrainingJobHandle):
            job = handle(c, operations_pb2.Operation(name="jobs/j1"))
            with pytest.raises(InvalidArgument) as caught:
                job.fetch(tmp_path / "out.png")
            assert str(caught.value) == (f"{tmp_path / 'out.png'} is a file, not a folder: fetch into a folder "
                                         "(it is made if missing)")
            with pytest.raises(InvalidArgument, match=f"^{tmp_path / 'out.png' / 'sub'} is below "
                                                      f"{tmp_path / 'out.png'}, which is a file, not a folder"):
                job.fetch(tmp_path / "out.png" / "sub")


def test_jobs_fetch_out_a_file_is_refused_in_the_flag_s_words_before_connecting(tmp_path, capsys):
    from segsvc.cli import main

    (tmp_path / "out.png").write_bytes(b"x")
    assert main(["jobs", "fetch", "j1", "--out", str(tmp_path / "out.png"), "--server", "127.0.0.1:1",
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"segsvc: error: --out {tmp_path / 'out.png'} is a file, not a folder: fetch "
                                       "into a folder (it is made if missing)\n")


class _Stream:
    """A SegmentStream that answers the first ``answer`` requests (labels 2x2 of zeros), then ends with ``end``."""

    def __init__(self, requests, answer: int, end: grpc.RpcError) -> None:  # type: ignore[no-untyped-def]
        self._requests, self._answer, self._end = requests, answer, end

    def __iter__(self):  # type: ignore[no-untyped-def]
        from segsvc.v1 import segmentation_pb2 as pb

        for i, request in enumerate(self._requests):
            if i == self._answer:
                break
            yield pb.SegmentResponse(request_id=request.request_id, class_names=["a"], palette=b"\0\0\0",
                                     labels=pb.LabelMap(encoding=pb.OUTPUT_ENCODING_RAW_UINT8, height=2, width=2,
                                                        data=b"\0" * 4))
        raise self._end

    def cancel(self) -> None:
        pass


@pytest.mark.parametrize("answered", [3, 2])
def test_segment_many_keeps_its_results_when_the_stream_breaks_off_after_every_answer(answered):
    """A stream that ended with DEADLINE_EXCEEDED after the last image's answer raised it, and every result the
    call had was thrown away. Missing answers still raise, saying how many came."""
    import numpy as np

    from segsvc.errors import DeadlineExceeded

    with _offline_client() as c:
        c._stub = type("Stub", (), {"SegmentStream": lambda self, requests, **kw: _Stream(
            requests, answered, StatusError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))})()
        images = [np.zeros((2, 2, 3), np.uint8)] * 3
        if answered == 3:
            results = c.segment_many(images, progress=False)
            assert [r.mask.tolist() for r in results] == [[[0, 0], [0, 0]]] * 3
        else:
            with pytest.raises(DeadlineExceeded, match="^the stream broke off after 2 of 3 images: Deadline Exceeded"):
                c.segment_many(images, progress=False)


def test_a_status_without_a_message_is_named_by_its_code_and_call_never_by_grpc_s_repr():
    """error_from_rpc fell back to str(exc): "NotFound: <_InactiveRpcError of RPC that terminated with: status =
    StatusCode.NOT_FOUND details = "" debug_error_string = ...>"."""
    from segsvc.errors import NotFound
    from segsvc.wire import error_from_rpc

    error = error_from_rpc(StatusError(grpc.StatusCode.NOT_FOUND), "GetOperation")
    assert isinstance(error, NotFound)
    assert str(error) == "GetOperation ended with status NOT_FOUND and no message"
    assert str(error_from_rpc(StatusError(grpc.StatusCode.INTERNAL))) == (
        "INTERNAL: the call ended with status INTERNAL and no message")
