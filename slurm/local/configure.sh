#!/usr/bin/env bash
# Write slurm.conf and slurmdbd.conf for one node (this machine, all its cores and all
# but 2 GiB of its memory). Rewriting them is harmless; a config we did not write is
# never touched.
source "$(dirname "$0")/common.sh"
need_root
mkdir -p "$SLURM_ETC" "$NEPA_SLURM_STATE"/{log,run,ctld,spool}
owned_or_absent "$SLURM_ETC/slurm.conf"
owned_or_absent "$SLURM_ETC/slurmdbd.conf"

# nproc honours OMP_NUM_THREADS (the test command sets it to 1): count the cores without it.
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
mem_mib=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048 ))
state=$NEPA_SLURM_STATE

cat > "$SLURM_ETC/slurm.conf.new" <<CONF
$MARKER
ClusterName=$CLUSTER_NAME
SlurmctldHost=localhost
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
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
SlurmdSpoolDir=$state/spool
StateSaveLocation=$state/ctld
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mib State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
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
log "configured $CLUSTER_NAME: 1 node, $cpus CPUs, $mem_mib MiB (state in $state)"
