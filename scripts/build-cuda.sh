#!/usr/bin/env bash
# Builds the CUDA `dus` and the `gpu_check` example on a machine without a GPU, reproducibly:
#
#   scripts/build-cuda.sh            → .gpu/dus.xz and .gpu/gpu_check.xz (ignored folder, ready to carry)
#
# The toolkit is CUDA 13.0 from PyPI wheels, installed into .cuda/ (ignored). Facts behind each step are in
# ../shared/notes/cuda.md: nvcc 13.0 to match the GPU machines' driver 580; the wheels lack the unversioned
# .so names the linker wants (symlinks) and libcuda.so, which ships with the driver (a stub with the
# driver's soname, for linking only; never put it on LD_LIBRARY_PATH where the program runs).
# CUDA_COMPUTE_CAP=90 builds for Hopper (H100/H200). A cold build takes ~15-20 min on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOOLKIT=${TOOLKIT:-$ROOT/.cuda}
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$ROOT/target-cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$TOOLKIT/venv/bin/python" ]; then
    python3 -m venv "$TOOLKIT/venv"
    "$TOOLKIT/venv/bin/pip" install -q \
        "cuda-toolkit[nvcc,crt,nvvm,cudart,cublas,curand,nvrtc,cccl]==13.0.2"
fi
# NCCL for training on several GPUs (cudarc links libnccl.so): 2.28.9, the NCCL of torch 2.11's wheels.
if ! ls "$TOOLKIT"/venv/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2 > /dev/null 2>&1; then
    "$TOOLKIT/venv/bin/pip" install -q "nvidia-nccl-cu13==2.28.9"
fi
NCCL_LIB=$(echo "$TOOLKIT"/venv/lib/python3*/site-packages/nvidia/nccl/lib)
[ -e "$NCCL_LIB/libnccl.so" ] || ln -s libnccl.so.2 "$NCCL_LIB/libnccl.so"
CUDA_HOME=$(echo "$TOOLKIT"/venv/lib/python3*/site-packages/nvidia/cu13)
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "no nvcc under $CUDA_HOME" >&2; exit 1; }

# Unversioned names for the linker.
for lib in cublas cublasLt cudart nvrtc curand; do
    if [ ! -e "$CUDA_HOME/lib/lib$lib.so" ]; then
        target=$(cd "$CUDA_HOME/lib" && ls "lib$lib.so."* | sort | head -n 1)
        ln -s "$target" "$CUDA_HOME/lib/lib$lib.so"
    fi
done

# A link-only libcuda stub: every driver entry point named in cuda.h, each returning an error.
STUBS=$CUDA_HOME/lib/stubs
if [ ! -e "$STUBS/libcuda.so" ]; then
    mkdir -p "$STUBS"
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDA_HOME/include/cuda.h" | sort -u |
        awk '{ printf "int %s(void) { return 100; }\n", $1 }' > "$STUBS/cuda_stub.c"
    cc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$STUBS/libcuda.so.1" "$STUBS/cuda_stub.c"
    ln -sf libcuda.so.1 "$STUBS/libcuda.so"
fi

export CUDA_HOME CUDA_PATH=$CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
export LIBRARY_PATH=$CUDA_HOME/lib:$NCCL_LIB:$STUBS${LIBRARY_PATH:+:$LIBRARY_PATH}
cd "$ROOT"
cargo build --release -p dusflow --features cuda --bin dus --example gpu_check

mkdir -p "$ROOT/.gpu"
for bin in "$CARGO_TARGET_DIR/release/dus" "$CARGO_TARGET_DIR/release/examples/gpu_check"; do
    # Without debug info (the release profile keeps it): the device tool carries 64 MiB in all.
    strip --strip-debug -o "$ROOT/.gpu/$(basename "$bin")" "$bin"
    xz -T0 -6 -f "$ROOT/.gpu/$(basename "$bin")"
done
ls -la "$ROOT/.gpu"
