#!/usr/bin/env bash
# Run one pipeline stage, time it and record `stage,seconds,rows,tokens`.
#
# Usage: timed.sh STAGE OUT_FILE [--rows KEYS] [--tokens KEYS] -- COMMAND [ARGS...]
#
# Runs COMMAND, measures its wall time, and reads the one-line summary that
# every optune tool prints last on stderr (`opt-gen: prompts=64 responses=128
# new_tokens=8192 ...`). KEYS is a comma-separated list of summary keys; the
# first one present gives the rows (or tokens) value, and none leaves it
# blank. On success OUT_FILE gets the single CSV line (no header), written to
# a temporary name and renamed, and the stage's stderr is kept in OUT_FILE with
# the extension .log. On failure OUT_FILE is left alone and the command's exit
# status is returned.
#
# The command's stderr still reaches the terminal: when stderr is a terminal
# and util-linux `script` is installed, the command runs under `script` so that
# progress bars keep drawing; otherwise stderr goes through `tee`.
set -euo pipefail

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 4 ] || usage
stage=$1 out=$2
shift 2
rows_keys='' tokens_keys=''
while [ $# -gt 0 ]; do
  case $1 in
    --rows) rows_keys=$2; shift 2 ;;
    --tokens) tokens_keys=$2; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[ $# -ge 1 ] || usage

tool=$(basename "$1")
mkdir -p "$(dirname "$out")"
log="${out%.*}.log"
tmp_log="$log.tmp$$"
trap 'rm -f "$tmp_log" "$out.tmp$$"' EXIT

now() {
  if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME/,/.}"; else date +%s.%N; fi
}

start=$(now)
status=0
# `script` ends its command on SIGINT/SIGTERM/SIGHUP but may still exit 0: a signal to this
# stage is a failure whatever the command's status says.
interrupted=0
trap 'interrupted=1' INT TERM HUP
if [ -t 2 ] && script --version 2>/dev/null | grep -q util-linux; then
  # A pseudo-terminal for the command: indicatif draws its bars only on one.
  printf -v quoted '%q ' "$@"
  SHELL=$BASH script --quiet --return --flush --command "$quoted" "$tmp_log" >&2 || status=$?
else
  { "$@" 2>&1 1>&3 3>&- | tee "$tmp_log" >&2; } 3>&1 || status=$?
fi
end=$(now)
[ "$interrupted" -eq 0 ] || { echo "$stage: interrupted" >&2; exit 130; }
[ "$status" -eq 0 ] || exit "$status"

# The tool's summary: its last `TOOL: key=value` line, once carriage returns
# (progress-bar redraws) and terminal escapes are taken out.
summary=$(tr '\r' '\n' <"$tmp_log" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' | grep "^$tool: " | grep -v "^$tool: error" | tail -n 1 || true)

value() {
  local keys=$1 key
  [ -n "$keys" ] || return 0
  for key in ${keys//,/ }; do
    if [[ " ${summary#*: } " =~ [[:space:]]$key=([^[:space:]]+) ]]; then
      echo "${BASH_REMATCH[1]}"
      return 0
    fi
  done
}

seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
printf '%s,%s,%s,%s\n' "$stage" "$seconds" "$(value "$rows_keys")" "$(value "$tokens_keys")" >"$out.tmp$$"
mv "$tmp_log" "$log"
mv "$out.tmp$$" "$out"
