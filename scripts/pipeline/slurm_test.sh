#!/usr/bin/env bash
# The miniature pipeline through Slurm (`make slurm-test`; CI runs it).
#
# Starts a single-node Slurm cluster on this machine from Debian's packages (munge, slurmctld,
# slurmd, slurm-client; installed with apt-get when missing), with its configuration, state and
# logs in a temporary directory and no systemd, then:
#   1. runs pipelines/tiny.mk's iterations 1-2 locally and unsharded (the reference);
#   2. runs them again with LAUNCHER=slurm SHARDS=2 (make -j2) in the same directory, so that
#      paths recorded in the shards agree;
#   3. checks that every Parquet file holds what the local run's does and every policy's
#      weights are byte-identical (compare_runs.sh), and that at least 4 jobs ran through Slurm,
#      all of them completed with exit code 0 (counted from scontrol's job records).
# Stops the daemons it started, by their pid files' PIDs, and removes the directory (KEEP_RUNS=1
# keeps it). Needs root: slurmd runs jobs as any user, and the packages may have to be installed.
# Ends with `slurm-test: N passed, N failed`.
set -uo pipefail

cd "$(dirname "$0")/../.."
MAKE=${MAKE:-make}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/optune-target}
BIN=${BIN:-$CARGO_TARGET_DIR/release}
PORT=${SLURM_TEST_PORT:-6817}
passed=0 failed=0 pids=()

ok() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); echo "FAILED: $*"; }

if [ "$(id -u)" != 0 ]; then
  echo "slurm-test: needs root (to install Slurm and to run slurmd)" >&2; exit 1
fi
packages="munge slurmctld slurmd slurm-client"
missing=0
for command in munged slurmctld slurmd srun scontrol sinfo; do
  command -v "$command" >/dev/null || missing=1
done
if [ "$missing" = 1 ]; then
  echo "slurm-test: installing $packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends $packages >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends $packages >/dev/null; } \
    || { echo "slurm-test: apt-get install $packages failed" >&2; exit 1; }
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/optune-slurm-test.XXXXXX")
chmod 755 "$dir"
log=$dir/make.log

# Stops each daemon this script started, newest first, and waits for it to exit.
stop_daemons() {
  local i pid
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    pid=$(cat "${pids[$i]}" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { echo "slurm-test: PID $pid ignored SIGTERM; killing it"; kill -9 "$pid"; }
  done
}
finish() {
  stop_daemons
  echo "slurm-test: $passed passed, $failed failed"
  if [ "${KEEP_RUNS:-0}" = 1 ] || [ "$failed" -gt 0 ]; then echo "slurm-test: kept $dir"; else rm -rf "$dir"; fi
}
trap finish EXIT

# munge: our own daemon, socket and key files in $dir (a system munged, if any, is left alone).
mkdir -p "$dir/munge"
cp /etc/munge/munge.key "$dir/munge/munge.key" 2>/dev/null \
  || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 2>/dev/null
chown -R munge:munge "$dir/munge"; chmod 755 "$dir/munge"; chmod 400 "$dir/munge/munge.key"
socket=$dir/munge/munge.socket
runuser -u munge -- munged --socket="$socket" --key-file="$dir/munge/munge.key" \
  --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed" \
  || { fail "starting munged"; cat "$dir/munge/munged.log"; exit 1; }
pids+=("$dir/munge/munged.pid")

# Slurm: one node, this machine.
host=$(hostname -s)
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
export SLURM_CONF=$dir/slurm.conf
memory=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
cat >"$SLURM_CONF" <<CONF
ClusterName=optune-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
MailProg=/bin/true
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Keep finished jobs' records for the count below.
MinJobAge=86400
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=${memory:-1000} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -f "$SLURM_CONF" || { fail "starting slurmctld"; tail -n 20 "$dir/log/slurmctld.log"; exit 1; }
pids+=("$dir/slurmctld.pid")
slurmd -f "$SLURM_CONF" || { fail "starting slurmd"; tail -n 20 "$dir/log/slurmd.log"; exit 1; }
pids+=("$dir/slurmd.pid")
for _ in $(seq 60); do
  sinfo -h -o %t 2>/dev/null | grep -qx idle && break
  sleep 0.5
done
if sinfo -h -o %t 2>/dev/null | grep -qx idle; then ok "single-node Slurm up ($host, port $PORT)"
else fail "the node is not idle: $(sinfo 2>&1)"; tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log"; exit 1; fi

pipeline_make() {
  "$MAKE" --no-print-directory PIPELINE=pipelines/tiny.mk RUNS="$dir/runs" BIN="$BIN" BUILD_TOOLS=0 "$@" >>"$log" 2>&1
}
if ! "$MAKE" --no-print-directory PIPELINE=pipelines/tiny.mk tools >"$log" 2>&1; then
  fail "building the tools"; tail -n 30 "$log"; exit 1
fi

# 1. The reference: local and unsharded.
if pipeline_make iter2; then ok "local unsharded run"
else fail "local run"; tail -n 30 "$log"; exit 1; fi
mv "$dir/runs" "$dir/local"

# 2. Through Slurm, two shards per sharded stage.
if pipeline_make -j2 iter2 LAUNCHER=slurm SHARDS=2; then ok "LAUNCHER=slurm SHARDS=2 run"
else fail "Slurm run"; tail -n 30 "$log"; exit 1; fi

# 3. The same contents, and the jobs Slurm ran.
if scripts/pipeline/compare_runs.sh "$dir/local" "$dir/runs" >"$dir/compare.log" 2>&1; then
  ok "the Slurm run's files equal the local run's ($(tail -n 1 "$dir/compare.log"))"
else fail "the runs differ:"; cat "$dir/compare.log"; fi
jobs=$(scontrol show jobs -o 2>/dev/null | grep -c 'JobName=tiny-' || true)
bad=$(scontrol show jobs -o 2>/dev/null | grep 'JobName=tiny-' | grep -vc 'JobState=COMPLETED .*ExitCode=0:0' || true)
shards=$(scontrol show jobs -o 2>/dev/null | grep -c 'JobName=tiny-[^ ]*-of-2 ' || true)
if [ "$jobs" -ge 4 ] && [ "$bad" -eq 0 ] && [ "$shards" -ge 4 ]; then
  ok "$jobs jobs ran through Slurm ($shards of them shards), all completed with exit code 0"
else fail "Slurm jobs: $jobs in all, $shards shards, $bad not completed with exit code 0"; scontrol show jobs -o | cut -c1-300; fi

[ "$failed" -eq 0 ]
