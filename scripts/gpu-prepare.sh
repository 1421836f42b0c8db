#!/usr/bin/env bash
# Here, before a GPU run: build what scripts/gpu-check.sh runs on the GPU machine (which has
# no cargo and no network) into gpu/ (git-ignored, carried with the run):
#   gpu/gpu_check.xz   examples/gpu_check built with --features cuda for one GPU architecture
#   gpu/pylib.zip      diffusers and the packages it imports, unpacked from their wheels, without
#                      diffusers' pipeline subpackages (the benchmark builds the UNet and VAE
#                      only) and without numpy and Pillow (PyTorch installs have them; carry
#                      them with WITH_NUMPY=1)
# The tracked tree and what one run carries must stay under 64 MiB together: the tree takes
# ~55 MiB, so the two files go in two runs of scripts/gpu-check.sh on the same warm machine
# (carry one, then the other; it runs whatever it finds).
#
#   PATH=$CUDA_ROOT/bin:$PATH CUDA_ROOT=... scripts/gpu-prepare.sh   # CUDA_COMPUTE_CAP: 90 (H100)
#   SKIP_BUILD=1 scripts/gpu-prepare.sh                               # gpu/pylib.zip only
#
# A CUDA toolkit from PyPI serves (see the README's Building section).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CUDA_COMPUTE_CAP:=90}"
export CUDA_COMPUTE_CAP
mkdir -p gpu
if [ -z "${SKIP_BUILD:-}" ]; then
    command -v nvcc >/dev/null || { echo "error: nvcc not on PATH (set CUDA_ROOT and PATH)" >&2; exit 2; }
    target=${CARGO_TARGET_DIR:-target}
    # candle links the CUDA libraries by name (cudarc's dynamic-linking): a toolkit from PyPI
    # has only their versioned names and no libcuda.so (the driver's, absent on a machine
    # without a GPU). Link against unversioned names for the toolkit's libraries and a stub
    # libcuda.so.1 with the driver symbols cudarc uses; at run time the loader finds the
    # driver and the toolkit's libraries (scripts/gpu-check.sh sets LD_LIBRARY_PATH).
    cargo build --release --features cuda --lib
    links=$(mktemp -d)
    for name in cublas cublasLt curand nvrtc cudart; do
        found=$(find "${CUDA_ROOT:-/usr/local/cuda}"/lib* -maxdepth 1 -name "lib$name.so.[0-9]*" | sort | head -1)
        [ -n "$found" ] && ln -s "$found" "$links/lib$name.so"
    done
    nm "$target"/release/deps/libcudarc-*.rlib 2>/dev/null \
        | awk '$1 == "U" && $2 ~ /^cu[A-Z]/ { print "void " $2 "(void) {}" }' | sort -u >"$links/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$links/cuda_stub.c"
    cargo rustc --release --features cuda --example gpu_check -- -L "native=$links"
    rm -rf "$links"
    xz -T0 -9 -c "$target"/release/examples/gpu_check >gpu/gpu_check.xz
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --only-binary=:all: --python-version 3.11 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform any -d "$tmp/wheels" diffusers==0.42.1
mkdir "$tmp/pylib"
for w in "$tmp"/wheels/*.whl; do
    case "$(basename "$w")" in
        hf_xet-*) continue ;; # huggingface_hub's optional fast downloads
        numpy-* | pillow-*) [ -n "${WITH_NUMPY:-}" ] || continue ;;
    esac
    python3 -m zipfile -e "$w" "$tmp/pylib"
done
find "$tmp/pylib/diffusers/pipelines" "$tmp/pylib/diffusers/modular_pipelines" \
    -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
rm -f gpu/pylib.zip
(cd "$tmp/pylib" && python3 -m zipfile -c "$OLDPWD/gpu/pylib.zip" .)
du -sh gpu/* | sed 's/^/  /'
tree=$(git ls-files -z | xargs -0 cat | wc -c)
for f in gpu/*; do
    size=$(stat -c %s "$f")
    echo "tracked tree $((tree >> 20)) MiB + $f $((size >> 20)) MiB = $(((tree + size) >> 20)) MiB (limit 64)"
done
