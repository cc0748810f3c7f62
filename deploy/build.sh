#!/bin/sh
# The build steps of the segsvc images, shared by deploy/Dockerfile and tests/deploy (which runs
# them outside Docker, since no image can be built there).
#
#   deploy/build.sh wheel OUT_DIR            generated gRPC code (protoc) and the segsvc wheel, built
#                                            from the source tree in the current directory (a scratch
#                                            copy: the tree itself is never written)
#   deploy/build.sh venv VENV VARIANT        a virtualenv without pip, with torch and torchvision from
#                                            the PyTorch index of VARIANT (cu130 or cpu, the VARIANTS below;
#                                            none: skip them); any other is refused
#   deploy/build.sh install VENV ROLE DIST   ROLE serve: deploy/requirements/serve.txt, then the wheel
#                                            from DIST without its dependencies (no training packages);
#                                            ROLE train: the wheel with all its dependencies and Ray
#   deploy/build.sh check VENV ROLE          import smoke test; serve: the server loads from the wheel,
#                                            with its generated code, and loads neither albumentations
#                                            nor matplotlib
#
# Environment: PYTHON (default python3) runs venv and pip. SEGSVC_BUILD_SITE=DIR lets the new
# virtualenv see the packages already installed in the site-packages folder DIR instead of
# installing any (tests/deploy uses the project's .venv: offline, seconds).
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}
case $PYTHON in */*) PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON") ;; esac  # steps change directory
TORCH_INDEX=https://download.pytorch.org/whl
VARIANTS="cu130 cpu"  # TORCH_VARIANT of deploy/Dockerfile; another needs the pinned torch on its PyTorch index

die() { echo "build.sh: $*" >&2; exit 2; }

pip_into() {  # pip_into VENV ARGS...: the outer pip installs into VENV, which has no pip of its own
    venv=$1; shift
    "$PYTHON" -m pip --python "$venv/bin/python" install --no-cache-dir --disable-pip-version-check "$@"
}

the_wheel() {
    set -- "$1"/segsvc-*.whl
    [ $# -eq 1 ] && [ -f "$1" ] || die "expected exactly one segsvc wheel in $(dirname "$1")"
    echo "$1"
}

cmd_wheel() {
    [ $# -eq 1 ] || die "usage: build.sh wheel OUT_DIR"
    mkdir -p "$1"
    out=$(cd "$1" && pwd)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    mkdir "$work/src"
    # Sources only: generated code, caches and build leftovers of the tree stay behind.
    tar -cf - --exclude=__pycache__ --exclude='*.pyc' \
        pyproject.toml README.md protos segsvc training | tar -xf - -C "$work/src"
    rm -rf "$work/src/segsvc/v1" "$work/src/segsvc/server/oip_pb" && mkdir "$work/src/segsvc/v1"
    "$PYTHON" protos/stage_standard.py "$work/std-protos"
    (cd "$work/src" && "$PYTHON" -m grpc_tools.protoc -Iprotos -I"$work/std-protos" \
        --python_out=. --pyi_out=. --grpc_python_out=. protos/segsvc/v1/*.proto)
    touch "$work/src/segsvc/v1/__init__.py"
    (cd "$work/src" && "$PYTHON" protos/generate_oip.py .)  # the Open Inference Protocol: segsvc/server/oip_pb
    "$PYTHON" -m pip wheel --no-deps --no-build-isolation --no-cache-dir --disable-pip-version-check \
        -q -w "$out" "$work/src"
    wheel=$(the_wheel "$out")
    "$PYTHON" - "$wheel" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["segsvc/v1/__init__.py", "segsvc/v1/segmentation_pb2.py", "segsvc/v1/segmentation_pb2_grpc.py",
        "segsvc/v1/jobs_pb2.py", "segsvc/v1/jobs_pb2_grpc.py", "segsvc/server/app.py", "segsvc/health.py",
        "segsvc/server/oip_pb/grpc_service_pb2.py", "segsvc/server/oip_pb/grpc_service_pb2_grpc.py"]
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"build.sh: {sys.argv[1]} lacks {missing}")
EOF
    echo "build.sh: built $wheel"
}

cmd_venv() {
    [ $# -eq 2 ] || die "usage: build.sh venv VENV cu130|cpu|none"
    venv=$1 variant=$2
    known=no
    for v in $VARIANTS none; do [ "$variant" = "$v" ] && known=yes; done
    [ $known = yes ] || die "unknown TORCH_VARIANT '$variant': this image builds $(echo "$VARIANTS" | sed 's/ /, /g')" \
        "or none (no torch); another CUDA build needs an entry in VARIANTS of deploy/build.sh"
    "$PYTHON" -m venv --without-pip "$venv"
    if [ -n "${SEGSVC_BUILD_SITE:-}" ]; then
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        # A path line only: the .pth files of DIR (such as an editable segsvc) are not processed.
        echo "$SEGSVC_BUILD_SITE" >"$site/_segsvc_build_site.pth"
    fi
    if [ "$variant" != none ]; then
        # Only the PyTorch index of the variant: its torch is the CUDA (or CPU) build, never PyPI's.
        pip_into "$venv" --index-url "$TORCH_INDEX/$variant" -r "$HERE/requirements/torch.txt"
    fi
}

cmd_install() {
    [ $# -eq 3 ] || die "usage: build.sh install VENV serve|train DIST"
    venv=$1 role=$2
    wheel=$(the_wheel "$3")
    if [ -n "${SEGSVC_BUILD_SITE:-}" ]; then
        pip_into "$venv" -q --no-deps --no-index "$wheel"
        return
    fi
    case $role in
        serve)
            pip_into "$venv" -r "$HERE/requirements/serve.txt"
            pip_into "$venv" --no-deps "$wheel" ;;
        train)
            pip_into "$venv" "$wheel[ray]" ;;
        *) die "unknown role '$role': serve or train" ;;
    esac
}

cmd_check() {
    [ $# -eq 2 ] || die "usage: build.sh check VENV serve|train"
    venv=$(cd "$1" && pwd) role=$2
    case $role in
        serve) modules="segsvc.server.app segsvc.health segsvc.cli" ;;
        train) modules="segsvc.server.app training.train" ;;
        *) die "unknown role '$role': serve or train" ;;
    esac
    # From / and isolated (-I): nothing of a source tree can shadow the installed wheel.
    (cd / && NO_ALBUMENTATIONS_UPDATE=1 "$venv/bin/python" -I - "$role" $modules <<'EOF'
import importlib, sys
from pathlib import Path

role, modules = sys.argv[1], sys.argv[2:]
for name in modules:
    importlib.import_module(name)
import segsvc
import segsvc.v1.segmentation_pb2

where = Path(segsvc.__file__).resolve()
if not where.is_relative_to(Path(sys.prefix).resolve()):
    sys.exit(f"build.sh check: segsvc came from {where}, not from the wheel in {sys.prefix}")
if role == "serve":
    loaded = sorted(m for m in ("albumentations", "matplotlib", "training") if m in sys.modules)
    if loaded:
        sys.exit(f"build.sh check: the server loaded training-side modules: {', '.join(loaded)}")
print(f"build.sh check ({role}): segsvc {segsvc.__version__} from {where.parent}, "
      f"torch {sys.modules['torch'].__version__}")
EOF
    )
    "$venv/bin/segsvc" health --help >/dev/null
}

[ $# -ge 1 ] || die "usage: build.sh wheel|venv|install|check ..."
step=$1; shift
case $step in
    wheel) cmd_wheel "$@" ;;
    venv) cmd_venv "$@" ;;
    install) cmd_install "$@" ;;
    check) cmd_check "$@" ;;
    *) die "unknown step '$step': wheel, venv, install or check" ;;
esac
