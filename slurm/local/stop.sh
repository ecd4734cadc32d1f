#!/usr/bin/env bash
# Stop the single-node cluster (jobs are killed; the accounting database is kept).
source "$(dirname "$0")/common.sh"
need_root
state=$NEPA_SLURM_STATE
stop_pidfile() {
  if pid_alive "$1"; then
    local pid; pid=$(cat "$1"); kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}
if pid_alive "$state/run/slurmctld.pid"; then scontrol shutdown >/dev/null 2>&1 || true; fi
stop_pidfile "$state/run/slurmd.pid"
stop_pidfile "$state/run/slurmctld.pid"
stop_pidfile "$state/run/slurmdbd.pid"
if mysqladmin ping >/dev/null 2>&1; then service mariadb stop >/dev/null || true; fi
stop_pidfile /run/munge/munged.pid
log "stopped"
