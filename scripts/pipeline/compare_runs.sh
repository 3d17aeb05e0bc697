#!/usr/bin/env bash
# Compare the outputs of two pipeline runs: every Parquet file and every policy's weights.
#
# Usage: compare_runs.sh DIR_A DIR_B
#
# Every Parquet file under either directory must exist under the other at the same relative
# path with the same contents (columns, rows and values, read through opt-cat as JSON lines, so
# the files' compression and row groups do not matter), and every model.safetensors must be
# byte-identical. Prints one line per difference and `compare_runs: N files, N differ`; the exit
# status is 1 when any differs. opt-cat is taken from $BIN (default: $CARGO_TARGET_DIR/release).
set -uo pipefail

[ $# -eq 2 ] || { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
a=$1 b=$2
bin=${BIN:-${CARGO_TARGET_DIR:-$HOME/.cache/optune-target}/release}

files=$( { (cd "$a" && find . -type f \( -name '*.parquet' -o -name model.safetensors \)); \
           (cd "$b" && find . -type f \( -name '*.parquet' -o -name model.safetensors \)); } | sort -u)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/compare_runs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
total=0 differ=0
for f in $files; do
  total=$((total + 1))
  if [ ! -f "$a/$f" ] || [ ! -f "$b/$f" ]; then
    echo "only in one run: ${f#./}"; differ=$((differ + 1)); continue
  fi
  case $f in
    *.parquet)
      if ! "$bin/opt-cat" "$a/$f" --format jsonl -o "$tmp/a.jsonl" 2>"$tmp/err" \
        || ! "$bin/opt-cat" "$b/$f" --format jsonl -o "$tmp/b.jsonl" 2>"$tmp/err"; then
        echo "unreadable: ${f#./}: $(cat "$tmp/err")"; differ=$((differ + 1))
      elif ! cmp -s "$tmp/a.jsonl" "$tmp/b.jsonl"; then
        echo "contents differ: ${f#./}"; differ=$((differ + 1))
      fi ;;
    *)
      cmp -s "$a/$f" "$b/$f" || { echo "bytes differ: ${f#./}"; differ=$((differ + 1)); } ;;
  esac
done
echo "compare_runs: $total files, $differ differ"
[ "$total" -gt 0 ] && [ "$differ" -eq 0 ]
