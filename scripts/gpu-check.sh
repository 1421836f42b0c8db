#!/usr/bin/env bash
# On a lent GPU machine (no cargo, no network), from the repository root with gpu/gpu_check.xz
# or gpu/pylib.zip carried (made here by scripts/gpu-prepare.sh; the two do not fit in one
# run's 64 MiB together with the tree): the CUDA build of examples/gpu_check runs the
# committed parity cases in f32 on the GPU against diffusers' references, the same cases in
# f16 against its f32 images (PSNR), and a full-size random SDXL 4-step image at 1024²;
# then diffusers on the same card times the same image (4 UNet steps + VAE decode, f16, VAE
# f32) when its packages were carried. Everything goes to $OUT (report.md, gpu-check.json,
# logs).
#
#   scripts/gpu-check.sh                  # on the GPU machine
#   DEVICE=cpu SIZE=256 scripts/gpu-check.sh   # a dry run here: the same steps on the CPU
#                                              # (candle's ops, as the GPU runs them)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-1024}
RUNS=${RUNS:-2}
mkdir -p "$OUT"
status=0
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), device $DEVICE"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} >"$OUT/report.md"

bin=gpu/gpu_check
if [ -n "${SKIP_DMD2:-}" ]; then
    bin=""
elif [ -f gpu/gpu_check.xz ]; then
    xz -d -c gpu/gpu_check.xz >"$OUT/gpu_check" && chmod +x "$OUT/gpu_check" && bin="$OUT/gpu_check"
elif [ ! -x "$bin" ]; then
    bin=target/release/examples/gpu_check # the dry run: built here
fi
# The CUDA libraries the binary links by name (cuBLAS, cuRAND, NVRTC, the runtime) come with
# PyTorch's pip packages there: let the loader find them.
if [ "$DEVICE" = cuda ]; then
    for d in $("${PYTHON:-python3}" -c 'import nvidia; print(" ".join(nvidia.__path__))' 2>/dev/null); do
        for l in $(find "$d" -name 'lib*.so.[0-9]*' -printf '%h\n' | sort -u); do
            LD_LIBRARY_PATH=$l${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        done
    done
    export LD_LIBRARY_PATH
    if [ -n "$bin" ] && [ -x "$bin" ] && ldd "$bin" | grep -q 'not found'; then
        echo -e "\n## missing libraries\n\n$(ldd "$bin" | grep 'not found')" >>"$OUT/report.md"
    fi
fi
env_candle=()
[ "$DEVICE" = cpu ] && env_candle=(DMD2_KERNELS=candle)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo -e "\n## dmd2: not run (no gpu/gpu_check.xz carried)" >>"$OUT/report.md"
elif echo "== $bin --device $DEVICE --size $SIZE --runs $RUNS" \
    && env "${env_candle[@]}" "$bin" --device "$DEVICE" --size "$SIZE" --runs "$RUNS" --out "$OUT" \
    2>&1 | tee "$OUT/dmd2.log"; then
    echo -e "\n## dmd2\n\n$(grep -E '^(parity|full-size|run )' "$OUT/dmd2.log")" >>"$OUT/report.md"
else
    status=1
    echo -e "\n## dmd2: FAILED\n\n$(tail -5 "$OUT/dmd2.log")" >>"$OUT/report.md"
fi

# diffusers on the same device, when its packages came along.
if [ -f gpu/pylib.zip ]; then
    py=${PYTHON:-python3}
    rm -rf "$OUT/pylib"
    "$py" -m zipfile -e gpu/pylib.zip "$OUT/pylib"
    PYTHONPATH="$OUT/pylib" "$py" examples/bench_diffusers.py image --device "$DEVICE" \
        --size "$SIZE" --runs "$RUNS" --dtype "$([ "$DEVICE" = cpu ] && echo f32 || echo f16)" \
        2>&1 | tee "$OUT/diffusers.log"
    echo -e "\n## diffusers\n\n$(grep -E 'median|^torch|Error' "$OUT/diffusers.log" || echo 'no result')" >>"$OUT/report.md"
    rm -rf "$OUT/pylib"
else
    echo -e "\n## diffusers: not run (no gpu/pylib.zip carried)" >>"$OUT/report.md"
fi
cat "$OUT/report.md"
exit $status
