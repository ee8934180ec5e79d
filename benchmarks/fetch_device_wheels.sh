#!/usr/bin/env bash
# Wheels for `sluice serve` and `sluice bench serve` on the GPU machine, which has torch, triton, transformers,
# numpy, safetensors and tokenizers but not the server's packages, and no network. Run here (with network),
# from anywhere; the wheels land in .whl/ at the repository root (git-ignored), which travels with the working
# tree to the device, where benchmarks/serve_h100.sh installs them with `pip install --no-index`.
#
#     bash benchmarks/fetch_device_wheels.sh          # download, check that they resolve offline, print the size
#
# Versions are the ones the CPU tests run with. Every dependency comes along, even those the device may already
# have (typing_extensions, idna, certifi ...): an offline install cannot fetch what it finds missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON_VERSION=3.12  # the device's Python
DEST=.whl
# What the server and the benchmark client import beyond the device's packages (and each one's dependencies).
PACKAGES=(
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4 pydantic-core==2.46.4
  msgspec==0.22.0 pyzmq==27.3.0 prometheus_client==0.26.0 httpx==0.28.1 httpcore==1.0.9
)
# The grammar library of structured outputs (W7), fetched without its dependencies: they are torch, triton,
# transformers and numpy, which the device has, and pydantic and typing_extensions, which come with PACKAGES.
GRAMMAR_PACKAGES=(xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2)
# What the GPU tests import beyond that: compressed-tensors checkpoints (tests/gpu/test_quantized_linear_cuda.py
# skips its ct_ formats without it), with its two dependencies the device lacks.
TEST_PACKAGES=(compressed-tensors==0.20.1 loguru==0.7.3 psutil==7.2.2)
PLATFORMS=(--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)

mkdir -p "$DEST"
pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$PYTHON_VERSION" \
  "${PLATFORMS[@]}" -d "$DEST" "${PACKAGES[@]}"
pip download --quiet --disable-pip-version-check --only-binary=:all: --no-deps --python-version "$PYTHON_VERSION" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${GRAMMAR_PACKAGES[@]}" "${TEST_PACKAGES[@]}"

# The offline install the device will do, resolved here into a scratch folder.
check_dir=$(mktemp -d)
trap 'rm -rf "$check_dir"' EXIT
pip install --quiet --disable-pip-version-check --no-index --find-links "$DEST" --only-binary=:all: \
  --python-version "$PYTHON_VERSION" "${PLATFORMS[@]}" --target "$check_dir" "${PACKAGES[@]}"
echo "offline install into a scratch folder: ok ($(ls "$check_dir" | grep -c dist-info) distributions)"

ls -1 "$DEST"
size_bytes=$(du -sb "$DEST" | cut -f1)
echo "total: $(( size_bytes / 1024 / 1024 )) MiB in $(ls -1 "$DEST" | wc -l) files under $DEST/ (carry limit 64 MiB)"
if (( size_bytes > 60 * 1024 * 1024 )); then
  echo "error: $DEST/ is over 60 MiB; remove stale wheels (rm -rf $DEST) and run again" >&2
  exit 1
fi
