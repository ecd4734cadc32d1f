#!/usr/bin/env bash
# Stop the local cluster (jobs are killed; the accounting database is kept): the daemons by
# their pid files, what still runs in the node namespaces start.sh made, then the namespaces
# and the bridge. Nothing else is touched.
source "$(dirname "$0")/common.sh"
need_root
state=$NEPA_SLURM_STATE
if pid_alive "$state/run/slurmctld.pid"; then scontrol shutdown >/dev/null 2>&1 || true; fi
for pidfile in "$state"/run/slurmd-*.pid "$state/run/slurmd.pid"; do
  [ -e "$pidfile" ] && stop_pidfile "$pidfile"
done
stop_pidfile "$state/run/slurmctld.pid"  # before the nodes' addresses go: nothing may address them after
for path in /run/netns/"$(node_netns '')"*; do  # every node namespace start.sh made, whatever NODES is now
  [ -e "$path" ] || continue
  ns=$(basename "$path")
  for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done  # jobs left behind
  ip netns del "$ns"
done
ip link show "$BRIDGE" >/dev/null 2>&1 && ip link del "$BRIDGE"
stop_pidfile "$state/run/slurmdbd.pid"
if mysqladmin ping >/dev/null 2>&1; then service mariadb stop >/dev/null || true; fi
stop_pidfile /run/munge/munged.pid
log "stopped"
