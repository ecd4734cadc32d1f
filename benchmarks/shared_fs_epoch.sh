#!/usr/bin/env bash
# One epoch read from a simulated shared file system by every node of a SLURM job at once
# (docs/performance.md, "Data at cluster scale"): each node mounts benchmarks/latency_fs.py (a FUSE
# view of DATA that waits LATENCY_MS on every metadata operation and counts every operation) at the
# same path, as each node of a cluster mounts the shared file system, then reads the image folder
# and its shards in turn, the sampler's order, WORKERS loader processes.
#
#   sbatch -p multi -N 2 --ntasks-per-node 1 benchmarks/shared_fs_epoch.sh DATA OUT [LATENCY_MS] [WORKERS]
#
# DATA holds folder/ (train/, val/) and shards/ (prepare-data's); OUT gets, per node and kind, the
# epoch's JSON line and the file system's operation counts (start-up and epoch apart). KINDS: the
# order (default "imagefolder shards").
set -euo pipefail
DATA=$1 OUT=$2 LATENCY_MS=${3:-1} WORKERS=${4:-2}
REPO=$(cd "$(dirname "$0")/.." 2>/dev/null && pwd)
[ -f "$REPO/benchmarks/latency_fs.py" ] || REPO=${SLURM_SUBMIT_DIR:-$PWD}
mkdir -p "$OUT"
srun --ntasks-per-node 1 bash -c '
set -euo pipefail
REPO=$1 DATA=$2 OUT=$3 LATENCY_MS=$4 WORKERS=$5
node=$(hostname) mnt=/tmp/nepa_simfs
mkdir -p "$mnt"
phase() {  # phase NAME KIND ARGS...: mount, run, unmount; the counts land in OUT/NODE_KIND_NAME.json
  local name=$1 kind=$2; shift 2
  /usr/bin/python3 "$REPO/benchmarks/latency_fs.py" "$DATA" "$mnt" --latency-ms "$LATENCY_MS" \
    --counts "$OUT/${node}_${kind}_${name}_fs.json" &
  local fs=$!
  for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.1; done
  "$REPO/.venv/bin/python" "$REPO/benchmarks/data_at_scale.py" "$@" > "$OUT/${node}_${kind}_${name}.json"
  umount "$mnt"; wait "$fs"
}
for kind in ${KINDS:-imagefolder shards}; do
  folder=$([ "$kind" = shards ] && echo shards || echo folder)
  phase start "$kind" epoch "$mnt/$folder" --kind "$kind" --index-dir "$OUT/index" --start-only
  phase epoch "$kind" epoch "$mnt/$folder" --kind "$kind" --index-dir "$OUT/index" --workers "$WORKERS"
done
' _ "$REPO" "$DATA" "$OUT" "$LATENCY_MS" "$WORKERS"
