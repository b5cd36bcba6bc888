#!/usr/bin/env bash
# A real one-node Slurm 22.05 "cluster" on localhost, for the Slurm tests (Debian 12, root; no
# systemd or cgroups needed). Fake GPUs: the node offers gpu:${GPU_TYPE}:${NGPU} whose device files
# are symlinks to /dev/null, so the scheduling and accounting of GPUs are real, the GPUs are not.
#
#   tools/local-slurm.sh install   apt packages (+ slurmdbd and MariaDB unless WITH_DBD=0); skipped
#                                  when they are already installed
#   tools/local-slurm.sh config    write /etc/slurm/{slurm,gres,slurmdbd}.conf, fake GPU devices
#   tools/local-slurm.sh start     start munged [mariadbd slurmdbd] slurmctld slurmd (those not
#                                  running yet) and wait until the node is idle
#   tools/local-slurm.sh stop      stop them, by the PIDs in their pid files
#   tools/local-slurm.sh status    0 if every daemon answers and the node is up, else 1 (any user)
#   tools/local-slurm.sh all       install + config + start
#
# Every command is idempotent. WITH_DBD=1 (default): accounting in slurmdbd + MariaDB, so sacct
# works and gres/gpu is recorded as a TRES (sacct -o AllocTRES shows gres/gpu=1). WITH_DBD=0: no
# database; sacct says "Slurm accounting storage is disabled" (Snakemake still works with
# slurm-status-command: squeue). All traffic stays on localhost: slurmctld 6817, slurmd 6818,
# slurmdbd 6819, MariaDB on a unix socket only (--skip-networking).
# Checked with Debian 12's Slurm 22.05.8, munge 0.5.15 and MariaDB 10.11; the comments below give
# the error each non-obvious setting avoids.
set -euo pipefail

WITH_DBD=${WITH_DBD:-1}
NGPU=${NGPU:-2}
GPU_TYPE=${GPU_TYPE:-h200}
PARTITION=${PARTITION:-gpu}
CPU_PARTITION=${CPU_PARTITION:-cpu}  # the same node, for the CPU-partition setting of the profile
FAKEGPU_DIR=/etc/slurm/fakegpu
DB_PASS=${DB_PASS:-slurmpw}

log() { echo "[local-slurm] $*" >&2; }

need_root() {
  [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
}

do_install() {
  need_root
  local bins=(munged slurmctld slurmd sbatch) pkgs=(munge slurmctld slurmd slurm-client)
  if [ "$WITH_DBD" = 1 ]; then bins+=(slurmdbd mariadbd); pkgs+=(slurmdbd mariadb-server); fi
  local missing=0 bin
  for bin in "${bins[@]}"; do
    command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || missing=1
  done
  if [ "$missing" = 0 ]; then
    log "already installed: $(/usr/sbin/slurmctld -V)"
    return 0
  fi
  command -v apt-get >/dev/null || { log "apt-get not found (Debian/Ubuntu only)"; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d: Debian's postinst scripts must not try to start the daemons themselves
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1; fi
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null || {
    [ "$created_policy" = 1 ] && rm -f "$policy"; exit 1; }
  [ "$created_policy" = 1 ] && rm -f "$policy"
  log "installed: $(/usr/sbin/slurmctld -V)"
}

do_config() {
  need_root
  mkdir -p /etc/slurm "$FAKEGPU_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm
  # Fake GPUs: Slurm drops file-less GPUs ("Removing file-less GPU gpu:h200 from final GRES list")
  # and rejects regular files ("... is not a valid character or block device"), so use
  # symlinks to the character device /dev/null.
  local i
  for ((i = 0; i < NGPU; i++)); do ln -sfn /dev/null "$FAKEGPU_DIR/gpu$i"; done

  # Real topology from slurmd -C; memory a little below what slurmd reports.
  local hw cpus sockets cores threads mem
  hw=$(/usr/sbin/slurmd -C | head -1)
  cpus=$(sed -E 's/.* CPUs=([0-9]+).*/\1/' <<<"$hw")
  sockets=$(sed -E 's/.* SocketsPerBoard=([0-9]+).*/\1/' <<<"$hw")
  cores=$(sed -E 's/.* CoresPerSocket=([0-9]+).*/\1/' <<<"$hw")
  threads=$(sed -E 's/.* ThreadsPerCore=([0-9]+).*/\1/' <<<"$hw")
  mem=$(sed -E 's/.* RealMemory=([0-9]+).*/\1/' <<<"$hw")
  mem=$((mem - 512))

  local acct
  if [ "$WITH_DBD" = 1 ]; then
    # job_comment: sacct -o Comment shows the rule and wildcards Snakemake puts in --comment
    acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu,gres/gpu:${GPU_TYPE}
AccountingStoreFlags=job_comment"
  else
    # AccountingStorageTRES=gres/gpu without slurmdbd is fatal:
    # "slurmdbd is required to run with TRES gres/gpu"
    acct="AccountingStorageType=accounting_storage/none"
  fi

  local conf
  conf=$(cat <<EOF
# Written by tools/local-slurm.sh: a one-node test cluster on localhost with fake GPUs.
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ReturnToService=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
SchedulerType=sched/backfill
# schedule pending jobs (e.g. requeued ones once eligible) within seconds, not after up to 60 s
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# finished jobs stay visible to squeue/scontrol for 5 min (Snakemake's squeue status needs this)
MinJobAge=300
# scancel/requeue: SIGTERM, then SIGKILL after 10 s (default 30)
KillWait=10
# a requeued job may start again after cred_expire + 1 s (default 120 s: too slow for tests)
AuthInfo=cred_expire=10
# jobs without --mem get 1000 MB per CPU instead of the whole node
DefMemPerCPU=1000
GresTypes=gpu
$acct
NodeName=localhost CPUs=$cpus Boards=1 SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem Gres=gpu:${GPU_TYPE}:${NGPU} Features=${GPU_TYPE} State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=$CPU_PARTITION Nodes=localhost MaxTime=INFINITE State=UP
EOF
)
  local changed=0
  write_if_changed /etc/slurm/slurm.conf "$conf" || changed=1
  write_if_changed /etc/slurm/gres.conf "AutoDetect=off
Name=gpu Type=${GPU_TYPE} File=${FAKEGPU_DIR}/gpu[0-$((NGPU - 1))]" || changed=1

  if [ "$WITH_DBD" = 1 ]; then
    write_if_changed /etc/slurm/slurmdbd.conf "AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db" || changed=1
    chmod 600 /etc/slurm/slurmdbd.conf
  fi
  if [ "$changed" = 1 ] && { alive /run/slurmctld.pid || alive /run/slurmd.pid; }; then
    log "config changed while the cluster runs: restart it (stop, then start)"
  fi
  log "config written (CPUs=$cpus RealMemory=$mem GPUs=${GPU_TYPE}x${NGPU} accounting=$([ "$WITH_DBD" = 1 ] && echo slurmdbd || echo none))"
}

write_if_changed() { # write_if_changed FILE CONTENT; returns 1 if the file changed
  if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then return 0; fi
  printf '%s\n' "$2" >"$1"
  return 1
}

# (by /proc, not kill -0: that fails for another user's process, and `status` need not be root)
alive() { local pid; pid=$(cat "$1" 2>/dev/null) && [ -n "$pid" ] && [ -d "/proc/$pid" ]; }

wait_for() { # wait_for SECONDS CMD...
  local t=$1; shift
  local end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $end ] && { log "timeout waiting for: $*"; return 1; }
    sleep 0.3
  done
}

node_up() { sinfo -h -N -o %t | grep -qE '^(idle|mix|alloc)'; }

do_start() {
  need_root
  [ -f /etc/slurm/slurm.conf ] || { log "no /etc/slurm/slurm.conf: run '$0 config' first"; exit 1; }
  # the munge key comes from the munge package's postinst; make one if missing
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge
  alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
  wait_for 10 sh -c 'munge -n | unmunge'

  if [ "$WITH_DBD" = 1 ]; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    if ! alive /run/mysqld/mysqld.pid; then
      # no TCP listener at all; slurmdbd reaches it through the default unix socket
      setsid /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mysqld.pid >/var/log/slurm/mariadb.log 2>&1 </dev/null &
    fi
    wait_for 30 mariadb -e 'select 1'
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
                CREATE DATABASE IF NOT EXISTS slurm_acct_db;
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    alive /run/slurmdbd.pid || /usr/sbin/slurmdbd
    wait_for 30 sacctmgr -n show cluster
  fi

  alive /run/slurmctld.pid || /usr/sbin/slurmctld
  wait_for 30 scontrol ping
  # -N localhost: the node name does not depend on the machine's hostname
  alive /run/slurmd.pid || /usr/sbin/slurmd -N localhost
  if ! wait_for 30 node_up; then
    # a node drained by an earlier bad config comes back once the config is right
    scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    wait_for 10 node_up || { sinfo -R; tail -5 /var/log/slurm/slurmctld.log; return 1; }
  fi
  log "up: $(sinfo -h -o '%P %a %D %t %G')"
}

stop_pidfile() { # stop_pidfile NAME PIDFILE
  local f=$2 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    local end=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { log "$1 ($pid) still alive after 30 s"; return 1; }
    log "stopped $1 (pid $pid)"
  fi
}

do_stop() {
  need_root
  local rc=0
  stop_pidfile slurmd /run/slurmd.pid || rc=1
  stop_pidfile slurmctld /run/slurmctld.pid || rc=1
  stop_pidfile slurmdbd /run/slurmdbd.pid || rc=1
  stop_pidfile mariadbd /run/mysqld/mysqld.pid || rc=1
  stop_pidfile munged /run/munge/munged.pid || rc=1
  return $rc
}

do_status() { # by asking each daemon (works for any user, unlike reading root's pid files)
  local ok=0
  timeout 10 sh -c 'munge -n | unmunge' >/dev/null 2>&1 || { log "munged not answering"; ok=1; }
  timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' || { log "slurmctld not answering"; ok=1; }
  if [ "$WITH_DBD" = 1 ]; then
    timeout 10 sacctmgr -n show cluster >/dev/null 2>&1 || { log "slurmdbd not answering"; ok=1; }
  fi
  [ "$ok" = 0 ] || return 1
  node_up || { log "node not up: $(sinfo -h -N -o '%N %t %E' 2>&1)"; return 1; }
  log "up: $(sinfo -h -o '%P %a %D %t %G')"
}

case "${1:-}" in
  install) do_install ;;
  config) do_config ;;
  start) do_start ;;
  stop) do_stop ;;
  status) do_status ;;
  all) do_install; do_config; do_start ;;
  *) echo "usage: $0 {install|config|start|stop|status|all}" >&2; exit 2 ;;
esac
