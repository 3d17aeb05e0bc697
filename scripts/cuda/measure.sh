#!/usr/bin/env bash
# The device check on a GPU machine: one run, one table (see docs/cuda.md and scripts/cuda/measure.py).
#
#   scripts/cuda/measure.sh [BIN_DIR | ARCHIVE.tar.xz] [measure.py options...]
#
# BIN_DIR (default target/cuda-dist, else the archive target/cuda-dist.tar.xz): opt-gen, opt-wdpo and
# opt-score built by scripts/build-cuda.sh.
# Needs: the NVIDIA driver (libcuda.so.1), the CUDA 13 libraries the binaries link (found on the
# loader's path, next to the binaries, in a CUDA 13 toolkit, or in a cu13 PyTorch's nvidia/*
# packages), and $PYTHON (default python3) with torch (CUDA) and transformers (peft when there).
# The report goes to stdout and, with measure.json, to $OPTUNE_MEASURE_OUT (default: $OUT when
# set, as on the device machine, else runs/cuda-measure).
#
# Examples:
#   scripts/cuda/measure.sh target/cuda-dist.tar.xz                  # the device check, <= 8 min
#   scripts/cuda/measure.sh target/cuda-dist.tar.xz --stages logprobs # correctness rows only
#   PYTHON=venv/bin/python scripts/cuda/measure.sh "$CARGO_TARGET_DIR/release" --dry-run  # no GPU: CPU builds
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
BIN=$ROOT/target/cuda-dist
[[ -x $BIN/opt-gen ]] || BIN=$ROOT/target/cuda-dist.tar.xz
if [[ $# -gt 0 && $1 != -* ]]; then
	BIN=$1
	shift
fi
if [[ -f $BIN && $BIN == *.tar.xz ]]; then
	# The archive build-cuda.sh makes (what travels to a GPU machine): unpack it outside the repo.
	dest=${TMPDIR:-/tmp}/optune-cuda-bin
	rm -rf "$dest" && mkdir -p "$dest"
	"$PYTHON" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BIN" "$dest"
	BIN=$dest
fi
BIN=$(cd "$BIN" && pwd)
RESULTS=${OPTUNE_MEASURE_OUT:-${OUT:-$ROOT/runs/cuda-measure}}
mkdir -p "$RESULTS"

missing() { ldd "$BIN/$1" 2>/dev/null | awk '/not found/ {print $1}'; }

# CUDA libraries: where they may be, first found first used.
candidates=()
while IFS= read -r d; do candidates+=("$d"); done < <("$PYTHON" - <<'EOF' 2>/dev/null || true
import glob, os
try:
    import nvidia
    for root in nvidia.__path__:
        for d in sorted(glob.glob(os.path.join(root, "*", "lib"))):
            print(d)
except ImportError:
    pass
EOF
)
candidates+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 /usr/local/nvidia/lib64
	/usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64)

for tool in opt-gen opt-wdpo opt-score; do
	[[ -x $BIN/$tool ]] || { echo "measure: $BIN/$tool is missing (scripts/build-cuda.sh builds it)" >&2; exit 1; }
done
for lib in $(missing opt-gen) $(missing opt-wdpo) $(missing opt-score); do
	for d in "${candidates[@]}"; do
		if [[ -e $d/$lib ]]; then
			case ":${LD_LIBRARY_PATH:-}:" in
			*":$d:"*) ;;
			*) export LD_LIBRARY_PATH=$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ;;
			esac
			break
		fi
	done
done
{
	echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
	echo "-- ldd $BIN/opt-gen"
	ldd "$BIN/opt-gen"
} | tee "$RESULTS/env.txt"
still=$(missing opt-gen; missing opt-wdpo; missing opt-score)
if [[ -n $still ]]; then
	echo "measure: libraries not found: $(echo $still | tr ' ' '\n' | sort -u | tr '\n' ' ')" >&2
	echo "measure: put them on LD_LIBRARY_PATH (a CUDA 13 toolkit's lib64, or pip's nvidia-cublas," >&2
	echo "         nvidia-curand, nvidia-cuda-nvrtc, nvidia-cuda-runtime wheels' nvidia/cu13/lib)" >&2
	exit 1
fi
"$BIN/opt-gen" --version

export PYTHONUNBUFFERED=1
# Nothing is downloaded (the device machine reaches no network): transformers and peft must not try.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# candle's kernels travel as PTX that the driver compiles on first use and caches on disk: let the
# cache hold all of them so only the first run pays (the warm-up runs of measure.py).
export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-4294967296}
exec "$PYTHON" "$ROOT/scripts/cuda/measure.py" --bin "$BIN" --out "$RESULTS" "$@"
