#!/usr/bin/env bash
# Install Debian's SLURM (controller, node daemon, client), munge, and slurmdbd with
# MariaDB for accounting (submitit polls sacct); iproute2 and util-linux for the namespace
# nodes. A no-op when everything is present.
source "$(dirname "$0")/common.sh"
need_root
missing=()
for pkg_bin in slurmctld:/usr/sbin/slurmctld slurmd:/usr/sbin/slurmd slurm-client:/usr/bin/sbatch \
               munge:/usr/sbin/munged slurmdbd:/usr/sbin/slurmdbd mariadb-server:/usr/sbin/mariadbd \
               iproute2:/usr/sbin/ip util-linux:/usr/bin/nsenter; do
  [ -x "${pkg_bin#*:}" ] || missing+=("${pkg_bin%%:*}")
done
if [ ${#missing[@]} -eq 0 ]; then
  log "packages present"
  exit 0
fi
log "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
