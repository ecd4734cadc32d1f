#!/usr/bin/env bash
# Start the local cluster: munge, MariaDB + slurmdbd (accounting), slurmctld, slurmd for
# node localhost, and NEPA_SLURM_NODES (default 3) nodes in network namespaces of their
# own, one slurmd each (common.sh: the layout). Installs and configures first when needed;
# daemons already running are left alone, so running it twice is harmless, unless they run
# another configuration than configure.sh wrote (another node count, other timeouts): then
# slurmctld and the slurmds start again with it (running jobs live on). Prints nothing but
# log lines; ready when it exits (every node idle).
source "$(dirname "$0")/common.sh"
need_root
here=$(dirname "$0")
"$here/install.sh"
"$here/configure.sh"
state=$NEPA_SLURM_STATE

# The namespace nodes' network first, before any daemon may address a node: a bridge with the
# controller's address, and per node a namespace with one veth into the bridge, its address, no
# default route. Nothing is ever sent to these addresses while they do not exist here.
if [ "$NODES" -gt 0 ]; then
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$CONTROLLER_ADDR/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  for i in $(seq "$NODES"); do
    ns=$(node_netns "$i")
    [ -e "/run/netns/$ns" ] || ip netns add "$ns"
    if ! ip link show "nepa-veth$i" >/dev/null 2>&1; then
      ip link add "nepa-veth$i" type veth peer name eth0 netns "$ns"
      ip link set "nepa-veth$i" master "$BRIDGE" up
      ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
    fi
  done
fi

# Daemons started with another slurm.conf (this file records the one they run) start again: stop them
# here (`scontrol shutdown` ends slurmctld and every slurmd; job steps live on, and the daemons take
# them up again), and they start below.
running_conf="$state/run/slurm.conf.running"
if pid_alive "$state/run/slurmctld.pid" && ! cmp -s "$SLURM_ETC/slurm.conf" "$running_conf"; then
  log "slurm.conf changed: restarting slurmctld and the slurmds with it"
  scontrol shutdown >/dev/null 2>&1 || true
  for pidfile in "$state/run/slurmctld.pid" "$state"/run/slurmd-*.pid "$state/run/slurmd.pid"; do
    [ -e "$pidfile" ] && stop_pidfile "$pidfile"
  done
fi

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
  cp "$SLURM_ETC/slurm.conf" "$running_conf"
  /usr/sbin/slurmctld
  wait_for slurmctld 30 scontrol ping
fi
if ! pid_alive "$state/run/slurmd-localhost.pid" && ! pid_alive "$state/run/slurmd.pid"; then
  # The node is called localhost whatever this machine's hostname is.
  /usr/sbin/slurmd -N localhost
fi

if [ "$NODES" -gt 0 ]; then
  for i in $(seq "$NODES"); do
    ns=$(node_netns "$i") name=$(node_name "$i")
    if ! pid_alive "$state/run/slurmd-$name.pid"; then
      # Not `ip netns exec`: it remounts /sys, and slurmd then cannot find its cgroups. A UTS
      # namespace gives the node its hostname (gloo binds to what the hostname resolves to), a
      # mount namespace its own /etc/hosts; every job of the node inherits both.
      nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private -- \
        sh -c "mount --bind '$state/hosts' /etc/hosts && hostname $name && exec /usr/sbin/slurmd -N $name"
    fi
  done
fi
nodes_up() { [ "$(sinfo -h -N -o %t | grep -cE '^(idle|mix|alloc)')" -ge $((NODES + 1)) ]; }
wait_for "$((NODES + 1)) nodes" 30 nodes_up
log "cluster $CLUSTER_NAME is up: $(sinfo -h -o '%P %D %t %c' | tr '\n' ';' | sed 's/;$//')"
