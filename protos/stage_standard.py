"""Stage the standard protos that segsvc's API imports, from the installed googleapis-common-protos.

protoc needs ``google/longrunning/operations.proto`` (and what it imports) on
its include path. The package ships those files beside its generated modules,
except that the long-running operations file is stored as
``operations_proto.proto`` while its descriptor is registered under
``google/longrunning/operations.proto``. This script copies the package's own
files, unchanged (licence headers included), into ``OUT/google/...`` under
their registered names, so nothing is retyped or committed.

Usage: python protos/stage_standard.py OUT_DIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import google.api
import google.longrunning
import google.rpc

# (package, file in the package, name protoc imports it by)
FILES = [
    (google.longrunning, "operations_proto.proto", "google/longrunning/operations.proto"),
    (google.rpc, "status.proto", "google/rpc/status.proto"),
    (google.rpc, "error_details.proto", "google/rpc/error_details.proto"),
    (google.api, "annotations.proto", "google/api/annotations.proto"),
    (google.api, "http.proto", "google/api/http.proto"),
    (google.api, "client.proto", "google/api/client.proto"),
    (google.api, "launch_stage.proto", "google/api/launch_stage.proto"),
    (google.api, "field_behavior.proto", "google/api/field_behavior.proto"),
]


def main(out: Path) -> None:
    for package, name, target in FILES:
        source = Path(list(package.__path__)[0]) / name
        if not source.is_file():
            raise SystemExit(f"stage_standard: {source} is missing; reinstall googleapis-common-protos")
        dest = out / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
