#!/usr/bin/env bash
# Build optune's CUDA binaries (opt-gen, opt-wdpo, opt-score with `--features cuda`) on a machine
# with no GPU and no CUDA toolkit, as a user without root. See docs/cuda.md.
#
#   scripts/build-cuda.sh [toolkit|check|build] [extra cargo arguments...]
#
#   toolkit  fetch and unpack the CUDA toolkit from NVIDIA's PyPI wheels, make the libcuda stub; no cargo
#   check    toolkit + `cargo check --release --features cuda` (build scripts still run nvcc on candle's
#            kernels: the long part, reused by a later `build`)
#   build    toolkit + `cargo build --release --features cuda`, then stripped copies of the binaries in
#            $OPTUNE_CUDA_DIST with their dynamic section printed and SOURCE_DIGEST (the sources'
#            digest, scripts/cuda/source_digest.py), and all of them in one
#            $OPTUNE_CUDA_DIST.tar.xz (the default)
#
# Environment (all optional):
#   OPTUNE_CUDA_CACHE       wheels and the unpacked toolkit      (default ${XDG_CACHE_HOME:-~/.cache}/optune-cuda)
#   OPTUNE_CUDA_HOME        use this CUDA toolkit instead of the wheels (must hold bin/nvcc; version 13.0 advised)
#   OPTUNE_CUDA_TARGET_DIR  cargo target dir of the CUDA build     (default ${CARGO_TARGET_DIR:-<repo>/target}/cuda:
#                           never the CPU build's own, whose release binaries it would overwrite)
#   OPTUNE_CUDA_DIST        where `build` puts the stripped binaries (default <repo>/target/cuda-dist)
#   OPTUNE_CUDA_ARCHIVE     0: no $OPTUNE_CUDA_DIST.tar.xz (its xz takes ~3 min of one core)
#   OPTUNE_CUDA_PACKAGES    the packages built                     (default "opt-gen opt-wdpo opt-score")
#   CUDA_COMPUTE_CAP        GPU architecture of candle's kernels   (default 90: H100/H200)
#   CUDAFORGE_THREADS       parallel nvcc jobs for candle's kernels (default: all cores)
#   PYTHON                  the Python whose pip fetches the wheels (default python3)
#
# Why CUDA 13.0 (pinned below): candle's kernels are embedded as PTX and compiled by the driver when
# loaded, and a driver accepts PTX only from a CUDA release no newer than its own; the GPU machines
# this project targets run driver 580 (CUDA 13.0). cudarc 0.19 knows CUDA versions up to 13.4.
set -euo pipefail

MODE=${1:-build}
case "$MODE" in
toolkit | check | build) shift || true ;;
-h | --help)
	sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
	exit 0
	;;
*) MODE=build ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
CACHE=${OPTUNE_CUDA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/optune-cuda}
PACKAGES=${OPTUNE_CUDA_PACKAGES:-opt-gen opt-wdpo opt-score}
TARGET_DIR=${OPTUNE_CUDA_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/cuda}
DIST=${OPTUNE_CUDA_DIST:-$ROOT/target/cuda-dist}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# CUDA 13.0 update 2 as NVIDIA publishes it on PyPI (one version of each component).
CUDA_MAJOR_MINOR=13.0
WHEELS=(
	nvidia-cuda-nvcc==13.0.88    # nvcc, ptxas, fatbinary, nvlink
	nvidia-nvvm==13.0.88         # cicc and libnvvm (nvcc's front end)
	nvidia-cuda-crt==13.0.88     # include/crt
	nvidia-cuda-cccl==13.0.85    # libcu++/CUB/Thrust headers
	nvidia-cuda-runtime==13.0.96 # cuda.h, cuda_runtime.h, libcudart.so.13
	nvidia-cuda-nvrtc==13.0.88   # libnvrtc.so.13
	nvidia-curand==10.4.0.35     # libcurand.so.10
	nvidia-cublas==13.0.2.14     # libcublas.so.13, libcublasLt.so.13 (a 420 MB download)
)

stamp() { date +%s; }
took() { echo "  ($(($(stamp) - $1)) s)"; }
log() { printf '\n== %s\n' "$*"; }

# --- 1. toolkit -------------------------------------------------------------------------------
make_toolkit() {
	local home=$CACHE/cuda-$CUDA_MAJOR_MINOR
	local want
	want=$(printf '%s\n' "${WHEELS[@]%%#*}" | tr -d ' ')
	if [[ -f $home/.optune-complete ]] && [[ "$(cat "$home/.optune-complete")" == "$want" ]]; then
		CUDA_HOME_DIR=$home
		echo "toolkit: $home (cached)"
		return
	fi
	local t0
	t0=$(stamp)
	log "fetching CUDA $CUDA_MAJOR_MINOR wheels into $CACHE/wheels"
	mkdir -p "$CACHE/wheels"
	local specs=()
	for w in "${WHEELS[@]}"; do specs+=("${w%%#*}"); done
	# --no-deps: each wheel is a self-contained part; nothing is installed into any environment.
	# The host's own platform: nvcc runs here (x86-64 Linux, glibc 2.27 or newer).
	"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$CACHE/wheels" "${specs[@]}"
	took "$t0"

	log "unpacking into $home"
	t0=$(stamp)
	rm -rf "$home.tmp"
	mkdir -p "$home.tmp"
	local files=()
	for w in "${specs[@]}"; do
		local name=${w%%==*} version=${w##*==}
		local f
		f=$(ls "$CACHE/wheels/${name//-/_}-$version-"*.whl | head -1)
		files+=("$f")
	done
	"$PYTHON" "$ROOT/scripts/cuda/unpack_wheels.py" "$home.tmp" "${files[@]}"

	# Unversioned names for the linker (-lcublas finds libcublas.so), as a toolkit's lib/ has them.
	local lib=$home.tmp/lib so
	for so in "$lib"/lib*.so.*; do
		local base=${so##*/}
		base=${base%%.so.*}.so
		[[ $base == *-builtins* || $base == *.alt.so ]] && continue
		[[ -e $lib/$base ]] || ln -s "${so##*/}" "$lib/$base"
	done

	# The driver's libcuda.so is not in any wheel: link against a stub (lib/stubs, as in a toolkit).
	mkdir -p "$lib/stubs"
	local rust_bindings=()
	local cudarc
	cudarc=$(cd "$ROOT" && cargo metadata --format-version 1 --features optune-model/cuda 2>/dev/null |
		"$PYTHON" -c 'import json,sys,os
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "cudarc": print(os.path.dirname(p["manifest_path"]))' | head -1) || true
	if [[ -n $cudarc && -f $cudarc/src/driver/sys/mod.rs ]]; then rust_bindings=("$cudarc/src/driver/sys/mod.rs"); fi
	"$PYTHON" "$ROOT/scripts/cuda/gen_libcuda_stub.py" "$lib/stubs/libcuda_stub.c" \
		"$home.tmp/include/cuda.h" "${rust_bindings[@]}"
	${CC:-cc} -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$lib/stubs/libcuda_stub.c"

	"$home.tmp/bin/nvcc" --version | tail -2
	echo "$want" >"$home.tmp/.optune-complete"
	rm -rf "$home"
	mv "$home.tmp" "$home"
	CUDA_HOME_DIR=$home
	took "$t0"
}

if [[ -n ${OPTUNE_CUDA_HOME:-} ]]; then
	CUDA_HOME_DIR=$OPTUNE_CUDA_HOME
	[[ -x $CUDA_HOME_DIR/bin/nvcc ]] || { echo "OPTUNE_CUDA_HOME=$CUDA_HOME_DIR has no bin/nvcc" >&2; exit 1; }
else
	make_toolkit
fi
[[ $MODE == toolkit ]] && exit 0

# --- 2. cargo ---------------------------------------------------------------------------------
export CUDA_HOME=$CUDA_HOME_DIR
export PATH=$CUDA_HOME/bin:$PATH
# cudarc reads the version from here instead of parsing `nvcc --version` (same answer: 13.0).
NVCC_RELEASE=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\),.*/\1 \2/p')
read -r NV_MAJOR NV_MINOR <<<"$NVCC_RELEASE"
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-$((NV_MAJOR * 1000 + NV_MINOR * 10))}
# nvcc 13.0 accepts gcc up to 14; NVCC_CCBIN=<g++-N> picks another host compiler.
export CARGO_TARGET_DIR=$TARGET_DIR
# Look for the CUDA libraries next to the binary first ($ORIGIN), then on the usual paths
# (LD_LIBRARY_PATH, ld.so.cache). The same flags for check and build, so that a build after a
# check reuses the compiled kernels (a RUSTFLAGS change reruns every build script).
export RUSTFLAGS="${RUSTFLAGS:-} -C link-arg=-Wl,-rpath,\$ORIGIN"

pkg_args=()
for p in $PACKAGES; do pkg_args+=(-p "$p"); done

echo "CUDA_HOME=$CUDA_HOME CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
echo "CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
t0=$(stamp)
cd "$ROOT"
if [[ $MODE == check ]]; then
	# --release: the build scripts (nvcc on candle's kernels, the long part) then run in the
	# release profile, whose output a later `build` reuses.
	log "cargo check --release --features cuda ${pkg_args[*]} $*"
	cargo check --release --features cuda "${pkg_args[@]}" "$@"
	took "$t0"
	exit 0
fi
# The sources as the build starts: the device check compares this with the tree it runs in.
digest=$("$PYTHON" "$ROOT/scripts/cuda/source_digest.py" "$ROOT")
log "cargo build --release --features cuda ${pkg_args[*]} $*"
cargo build --release --features cuda "${pkg_args[@]}" "$@"
took "$t0"

# --- 3. stripped copies, their dynamic section, one archive to carry ------------------------------
log "stripped binaries in $DIST"
t0=$(stamp)
mkdir -p "$DIST"
for p in $PACKAGES; do
	cp "$CARGO_TARGET_DIR/release/$p" "$DIST/$p.tmp"
	strip "$DIST/$p.tmp"
	mv "$DIST/$p.tmp" "$DIST/$p"
done
echo "$digest" >"$DIST/SOURCE_DIGEST"
ls -l "$DIST"
for p in $PACKAGES; do
	echo "-- $p"
	readelf -d "$DIST/$p" | grep -E 'NEEDED|RPATH|RUNPATH' | sed 's/^ *//'
done
if [[ ${OPTUNE_CUDA_ARCHIVE:-1} != 0 ]]; then
	# Each binary holds candle's kernels (~33 MB of sm_90a code, ~11 MB of PTX) and is ~78 MB
	# stripped; the three share most of their bytes, which xz finds with a window larger than one
	# binary: ~14 MB for the three. Unpack with `tar -xJf` or Python's tarfile (measure.sh does).
	archive=$DIST.tar.xz
	log "archive $archive"
	tar -cf - -C "$DIST" $PACKAGES SOURCE_DIGEST | xz -T1 --lzma2=preset=6,dict=256MiB >"$archive.tmp"
	mv "$archive.tmp" "$archive"
	ls -l "$archive"
fi
took "$t0"
echo
echo "Run them where the NVIDIA driver (libcuda.so.1, driver 580 / CUDA 13.0 or newer) is installed,"
echo "with libcudart.so.13, libcublas.so.13 (+ libcublasLt.so.13) and libcurand.so.10 next to the"
echo "binaries (RUNPATH \$ORIGIN) or on LD_LIBRARY_PATH: $CUDA_HOME/lib, a CUDA 13 toolkit's lib64,"
echo "or a cu13 PyTorch's site-packages/nvidia/cu13/lib. Never put $CUDA_HOME/lib/stubs on that path."
