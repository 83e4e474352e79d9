#!/usr/bin/env bash
# Headers for the `cudnn` feature: cuDNN 9's C headers and cudnn-frontend's header-only C++ graph
# API, both from their PyPI wheels, unpacked under $CUDNN_PIP (default /opt/cudnn-pip). Only the
# headers are kept: the binary opens libcudnn.so.9 when it starts training (see README).
#
#   bash scripts/fetch_cudnn.sh
#   CARGO_TARGET_DIR=target/cuda bash ../shared/cuda/build.sh --features cudnn --bin qlorad
#
# Where cuDNN's headers are installed already (a cudnn image: /usr/include), `CUDNN_VERSION=`
# fetches the frontend alone; point QLORAD_CUDNN_INCLUDE at them when building.
set -euo pipefail
CUDNN_PIP=${CUDNN_PIP:-/opt/cudnn-pip}
CUDNN_VERSION=${CUDNN_VERSION-9.13.1.26}
FRONTEND_VERSION=${FRONTEND_VERSION:-1.32.0}
PYTHON=${PYTHON:-python3}

if { [ -z "$CUDNN_VERSION" ] || [ -e "$CUDNN_PIP/cudnn/include/cudnn.h" ]; } &&
   [ -e "$CUDNN_PIP/frontend/include/cudnn_frontend.h" ]; then
  echo "$CUDNN_PIP: headers present"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
wheels=("nvidia-cudnn-frontend==$FRONTEND_VERSION")
[ -z "$CUDNN_VERSION" ] || wheels+=("nvidia-cudnn-cu13==$CUDNN_VERSION")
"$PYTHON" -m pip download --quiet --no-deps --dest "$tmp" "${wheels[@]}"
mkdir -p "$CUDNN_PIP/cudnn" "$CUDNN_PIP/frontend"
"$PYTHON" - "$tmp" "$CUDNN_PIP" <<'PY'
import pathlib, sys, zipfile
tmp, dest = map(pathlib.Path, sys.argv[1:])
for wheel in tmp.glob("*.whl"):
    kind = "frontend" if "frontend" in wheel.name else "cudnn"
    prefix = "include/" if kind == "frontend" else "nvidia/cudnn/include/"
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                out = dest / kind / "include" / name[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(z.read(name))
PY
echo "$CUDNN_PIP: cudnn-frontend $FRONTEND_VERSION headers${CUDNN_VERSION:+, cuDNN $CUDNN_VERSION}"
