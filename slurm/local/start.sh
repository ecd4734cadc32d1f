#!/usr/bin/env bash
# Start the single-node cluster: munge, MariaDB + slurmdbd (accounting), slurmctld,
# slurmd. Installs and configures first when needed; daemons already running are left
# alone, so running it twice is harmless. Prints nothing but log lines; ready when it exits.
source "$(dirname "$0")/common.sh"
need_root
here=$(dirname "$0")
"$here/install.sh"
"$here/configure.sh"
state=$NEPA_SLURM_STATE

# munge: authenticates every daemon and client.
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  wait_for munged 10 sh -c 'munge -n | unmunge'
fi

# MariaDB + slurmdbd: accounting, which sacct (and therefore submitit) needs.
if ! mysqladmin ping >/dev/null 2>&1; then
  service mariadb start >/dev/null
  wait_for mariadb 30 mysqladmin ping
fi
mysql -e "CREATE DATABASE IF NOT EXISTS $DB_NAME;
          CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASSWORD';
          GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';"
if ! pid_alive "$state/run/slurmdbd.pid"; then
  /usr/sbin/slurmdbd
  wait_for slurmdbd 30 sacctmgr -n list cluster
fi
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER_NAME" || sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null

if ! pid_alive "$state/run/slurmctld.pid"; then
  /usr/sbin/slurmctld
  wait_for slurmctld 30 scontrol ping
fi
if ! pid_alive "$state/run/slurmd.pid"; then
  # The node is called localhost whatever this machine's hostname is.
  /usr/sbin/slurmd -N localhost
fi
node_up() { sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'; }
wait_for "node localhost" 30 node_up
log "cluster $CLUSTER_NAME is up: $(sinfo -h -o '%P %D %t %c CPUs')"
