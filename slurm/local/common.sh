# Shared settings for the local SLURM cluster scripts (sourced, not run).
# Everything the daemons write lives under $NEPA_SLURM_STATE; the configs live where
# Debian's slurm-wlm looks for them (/etc/slurm), marked as ours so that a real
# cluster's configuration is never overwritten.
#
# The cluster: node `localhost` (this machine, partition `debug`, the default) and
# NEPA_SLURM_NODES more nodes node1..nodeN (partition `multi`), each a network namespace
# of its own on a private bridge (10.77.0.0/24, no route out): its own address, hostname
# and /etc/hosts, one slurmd each. Multi-node jobs (gloo across nodes, node failure) run
# there.
set -euo pipefail

NEPA_SLURM_STATE=${NEPA_SLURM_STATE:-/var/tmp/nepa-slurm}
CLUSTER_NAME=${NEPA_SLURM_CLUSTER:-nepa}
SLURM_ETC=/etc/slurm
MARKER="# written by nepa-scale slurm/local/configure.sh"
DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASSWORD=${NEPA_SLURM_DB_PASSWORD:-nepa-local}
NODES=${NEPA_SLURM_NODES:-3}              # namespace nodes besides localhost (0: none); 3: a 2-node
                                         # job whose node dies restarts on the other two
NET=10.77.0                              # the bridge's /24; nothing routes in or out of it
BRIDGE=nepa-br0
CONTROLLER_ADDR=$NET.1                   # the bridge's address: how the nodes reach slurmctld
node_name() { echo "node$1"; }
node_netns() { echo "nepa-node$1"; }
node_addr() { echo "$NET.$((10 + $1))"; }

log() { echo "[slurm/local] $*" >&2; }
die() { echo "[slurm/local] error: $*" >&2; exit 1; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (the daemons and /etc/slurm need it)"; }

# pid_alive PIDFILE: true when the file names a running process.
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# wait_for DESCRIPTION SECONDS COMMAND...: poll until COMMAND succeeds.
wait_for() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "$what did not come up within ${seconds}s (logs: $NEPA_SLURM_STATE/log)"
    sleep 0.2
  done
}

# stop_pidfile PIDFILE: end the process it names (SIGTERM, then SIGKILL after 5 s); wait until gone.
stop_pidfile() {
  if pid_alive "$1"; then
    local pid; pid=$(cat "$1"); kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}

# owned_or_absent FILE: refuse to touch a config this project did not write.
owned_or_absent() {
  [ ! -e "$1" ] || grep -qF "$MARKER" "$1" || die "$1 exists and was not written by nepa-scale; refusing to overwrite it"
}
