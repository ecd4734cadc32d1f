#!/usr/bin/env bash
# Write slurm.conf and slurmdbd.conf: node localhost (this machine, all its cores and all
# but 2 GiB of its memory less what the namespace nodes get) in partition debug, and
# NEPA_SLURM_NODES namespace nodes of one CPU each in partition multi; plus the hosts file
# the namespace nodes see. Rewriting them is harmless; a config we did not write is never
# touched.
source "$(dirname "$0")/common.sh"
need_root
mkdir -p "$SLURM_ETC" "$NEPA_SLURM_STATE"/{log,run,ctld,spool}
owned_or_absent "$SLURM_ETC/slurm.conf"
owned_or_absent "$SLURM_ETC/slurmdbd.conf"

# nproc honours OMP_NUM_THREADS (the test command sets it to 1): count the cores without it.
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
node_mem_mib=2048
mem_mib=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 - NODES * node_mem_mib ))
state=$NEPA_SLURM_STATE
if [ "$NODES" -gt 0 ]; then
  controller="localhost($CONTROLLER_ADDR)"   # the nodes in namespaces reach it on the bridge
  node_lines=""
  hosts="127.0.0.1 localhost
$CONTROLLER_ADDR nepa-controller"
  for i in $(seq "$NODES"); do
    node_lines+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=1 RealMemory=$node_mem_mib State=UNKNOWN
"
    hosts+="
$(node_addr "$i") $(node_name "$i")"
  done
  partition_lines="PartitionName=multi Nodes=node[1-$NODES] MaxTime=INFINITE State=UP"
  echo "$hosts" > "$state/hosts.new" && mv "$state/hosts.new" "$state/hosts"
else
  controller=localhost
  node_lines=""
  partition_lines=""
fi

cat > "$SLURM_ETC/slurm.conf.new" <<CONF
$MARKER
ClusterName=$CLUSTER_NAME
SlurmctldHost=$controller
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: otherwise a requeued job waits minutes before it may start.
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
SlurmdSpoolDir=$state/spool/%n
StateSaveLocation=$state/ctld
ReturnToService=2
SlurmctldTimeout=30
# A node whose slurmd stops answering is DOWN after this (its jobs end NODE_FAIL and, requeueable,
# start again elsewhere); the controller pings every third of it. 15 s, not 30: a node failure test
# waits for it. Still above MessageTimeout (10 s), the longest a loaded machine's ping may take.
SlurmdTimeout=15
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
# The namespace nodes first: slurmctld 22.05 stops with "Duplicated NodeHostName node1" when a
# node line follows NodeName=localhost's.
${node_lines}NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
$partition_lines
CONF
mv "$SLURM_ETC/slurm.conf.new" "$SLURM_ETC/slurm.conf"

umask 077
cat > "$SLURM_ETC/slurmdbd.conf.new" <<CONF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
PidFile=$state/run/slurmdbd.pid
LogFile=$state/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASSWORD
StorageLoc=$DB_NAME
CONF
mv "$SLURM_ETC/slurmdbd.conf.new" "$SLURM_ETC/slurmdbd.conf"
log "configured $CLUSTER_NAME: localhost ($cpus CPUs, $mem_mib MiB) + $NODES namespace node(s) (state in $state)"
