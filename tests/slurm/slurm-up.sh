#!/usr/bin/env bash
# slurm-up.sh - bring up a single-node SLURM cluster (Debian 12, slurm-wlm 22.05)
# for CI tests of `snakemake --executor slurm`. Needs root; no systemd needed.
# Adapted from ../shared/tools/slurm-up.sh for ript's tests (tests/test_slurm.py):
# its own pid-file folder, job comments kept in accounting (the SLURM executor
# puts the rule name there), and an optional oversized node with GPU GRES so
# that the unchanged workflow profile (gpu, cpus_per_gpu, mem_mb) can be
# scheduled on a small CPU-only machine.
#
# Idempotent: installs only missing packages, rewrites the config only when it
# changed, starts only daemons that are not already running, and records the
# PID of every daemon it starts in $SLURM_CI_RUNDIR/<name>.pid (slurm-down.sh
# stops exactly those PIDs).
#
# Environment:
#   SLURM_CI_ACCOUNTING  slurmdbd (default): MariaDB + slurmdbd, so `sacct` works
#                        none: no accounting; `sacct` fails, use
#                              `--slurm-status-command squeue` in snakemake
#   SLURM_CI_RUNDIR      where our pid files go (default /run/ript-slurm-ci)
#   SLURM_CI_PARTITION   partition name (default debug)
#   SLURM_CI_CGROUP      no (default): proctrack/linuxproc, no limits enforced
#                        yes: proctrack/cgroup + task/cgroup (cgroup v1 worked
#                             here; --mem is enforced, jobs end OUT_OF_MEMORY)
#   SLURM_CI_GPUS        GPUs the node advertises (default 0). Their device
#                        files are links to /dev/null (slurmd drops file-less
#                        GPUs): SLURM schedules `--gpus=N` jobs and sets
#                        CUDA_VISIBLE_DEVICES, the jobs see no GPU (CI tests
#                        the submission, not CUDA)
#   SLURM_CI_CPUS        CPUs the node advertises (default: nproc)
#   SLURM_CI_MEM_MB      memory the node advertises (default: 90 % of RAM)
#                        Values above the real ones need SlurmdParameters=
#                        config_overrides, which is then set; nothing is
#                        enforced unless SLURM_CI_CGROUP=yes
set -euo pipefail

ACCOUNTING="${SLURM_CI_ACCOUNTING:-slurmdbd}"
RUNDIR="${SLURM_CI_RUNDIR:-/run/ript-slurm-ci}"
PARTITION="${SLURM_CI_PARTITION:-debug}"
CGROUP="${SLURM_CI_CGROUP:-no}"
GPUS="${SLURM_CI_GPUS:-0}"
LOGDIR=/var/log/slurm
DB_PASS=slurmci            # throwaway password of a DB bound to 127.0.0.1 only

log() { echo "slurm-up: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
case "$ACCOUNTING" in slurmdbd|none) ;; *) die "SLURM_CI_ACCOUNTING must be slurmdbd or none" ;; esac
case "$CGROUP" in yes|no) ;; *) die "SLURM_CI_CGROUP must be yes or no" ;; esac
for v in "$GPUS" "${SLURM_CI_CPUS:-1}" "${SLURM_CI_MEM_MB:-1}"; do
    case "$v" in ''|*[!0-9]*) die "SLURM_CI_GPUS/CPUS/MEM_MB must be integers (got '$v')" ;; esac
done
export DEBIAN_FRONTEND=noninteractive

# alive COMM PIDFILE: the pid file names a live (non-zombie) process called COMM
alive() {
    local pid
    [ -s "$2" ] || return 1
    pid=$(cat "$2")
    [ -r "/proc/$pid/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" &&
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}
# wait_for SECONDS CMD...: retry CMD every 0.5 s until it succeeds
wait_for() {
    local end=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.5
    done
}
# start_bg NAME LOGFILE CMD...: start a foreground-mode daemon detached, record its PID
start_bg() {
    local name=$1 logf=$2; shift 2
    setsid "$@" </dev/null >>"$logf" 2>&1 &
    echo $! >"$RUNDIR/$name.pid"
    log "started $name (pid $!)"
}

# ---------------------------------------------------------------- packages
pkgs=(munge slurmctld slurmd slurm-client)
[ "$ACCOUNTING" = slurmdbd ] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    apt-get update -qq
    # --no-install-recommends: 8 packages instead of 43 (slurm-wlm pulls every plugin)
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$RUNDIR" "$LOGDIR" /run/slurm /run/munge /var/spool/slurmctld /var/spool/slurmd
chown slurm:slurm "$LOGDIR" /run/slurm /var/spool/slurmctld
chown munge:munge /run/munge
chmod 755 /run/munge

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 600 /etc/munge/munge.key
if alive munged /run/munge/munged.pid; then
    log "munged already running"
else
    start_bg munged "$LOGDIR/munged.stdout" \
        setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground
    wait_for 15 munge -n || die "munged did not come up (see /var/log/munge/munged.log)"
fi

# ---------------------------------------------------------------- slurm.conf
NODE=$(hostname -s)
REAL_CPUS=$(nproc)
REAL_MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
CPUS="${SLURM_CI_CPUS:-$REAL_CPUS}"
MEM="${SLURM_CI_MEM_MB:-$((REAL_MEM * 90 / 100))}"  # a bit under what slurmd reports, or the node drains
OVERRIDES=""
if [ "$CPUS" -gt "$REAL_CPUS" ] || [ "$MEM" -gt "$REAL_MEM" ]; then
    OVERRIDES="SlurmdParameters=config_overrides"   # else a node bigger than the machine drains
fi
GRES_NODE="" GRES_TYPES=""
if [ "$GPUS" -gt 0 ]; then
    GRES_NODE=" Gres=gpu:${GPUS}"
    GRES_TYPES="GresTypes=gpu
AccountingStorageTRES=gres/gpu"
fi
if [ "$ACCOUNTING" = slurmdbd ]; then
    ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
    ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
if [ "$CGROUP" = yes ]; then
    PROCTRACK=proctrack/cgroup TASK=task/cgroup
else
    PROCTRACK=proctrack/linuxproc TASK=task/none
fi
NEWCONF=$(cat <<EOF
# written by slurm-up.sh
ClusterName=ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=${PROCTRACK}
TaskPlugin=${TASK}
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=300
${OVERRIDES}
${GRES_TYPES}
${ACCT}
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM}${GRES_NODE} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
# Fake GPUs: slurmd drops GPUs without device files and wants character
# devices, so each one is a link to /dev/null (ensured on every start: cheap)
FAKE_GPU_DIR=/etc/slurm/ci-fake-gpus
NEWGRES=""
if [ "$GPUS" -gt 0 ]; then
    mkdir -p "$FAKE_GPU_DIR"
    for i in $(seq 0 $((GPUS - 1))); do ln -sfn /dev/null "$FAKE_GPU_DIR/gpu$i"; done
    NEWGRES="# written by slurm-up.sh
NodeName=${NODE} Name=gpu Count=${GPUS} File=${FAKE_GPU_DIR}/gpu[0-$((GPUS - 1))]"
fi
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$NEWCONF" ] ||
    { [ -n "$NEWGRES" ] && [ "$(cat /etc/slurm/gres.conf 2>/dev/null)" != "$NEWGRES" ]; }; then
    if alive slurmctld /run/slurm/slurmctld.pid || alive slurmd /run/slurm/slurmd.pid; then
        die "slurm.conf would change while SLURM is running; run slurm-down.sh first"
    fi
    printf '%s\n' "$NEWCONF" >/etc/slurm/slurm.conf
    if [ "$CGROUP" = yes ]; then
        printf '# written by slurm-up.sh\nCgroupPlugin=autodetect\nConstrainCores=yes\nConstrainRAMSpace=yes\n' \
            >/etc/slurm/cgroup.conf
    elif grep -qs 'written by slurm-up.sh' /etc/slurm/cgroup.conf; then
        rm -f /etc/slurm/cgroup.conf
    fi
    if [ -n "$NEWGRES" ]; then
        printf '%s\n' "$NEWGRES" >/etc/slurm/gres.conf
    elif grep -qs 'written by slurm-up.sh' /etc/slurm/gres.conf; then
        rm -f /etc/slurm/gres.conf
    fi
    log "wrote /etc/slurm/slurm.conf (node $NODE, $CPUS CPUs, ${MEM} MB, $GPUS GPUs)"
fi

# ---------------------------------------------------------------- accounting
if [ "$ACCOUNTING" = slurmdbd ]; then
    if mariadb-admin ping >/dev/null 2>&1; then
        log "mariadb already running"
    else
        mkdir -p /run/mysqld && chown mysql:root /run/mysqld
        if [ ! -d /var/lib/mysql/mysql ]; then
            mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
        fi
        start_bg mariadbd "$LOGDIR/mariadb.log" \
            /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid
        wait_for 60 mariadb-admin ping || die "mariadb did not come up (see $LOGDIR/mariadb.log)"
    fi
    mariadb <<EOF
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
    cat >/etc/slurm/slurmdbd.conf <<EOF
# written by slurm-up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
PidFile=/run/slurm/slurmdbd.pid
LogFile=${LOGDIR}/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
EOF
    chown slurm:slurm /etc/slurm/slurmdbd.conf
    chmod 600 /etc/slurm/slurmdbd.conf
    if alive slurmdbd /run/slurm/slurmdbd.pid; then
        log "slurmdbd already running"
    else
        start_bg slurmdbd "$LOGDIR/slurmdbd.stdout" /usr/sbin/slurmdbd -D
        wait_for 30 sacctmgr -n list cluster || die "slurmdbd did not come up (see $LOGDIR/slurmdbd.log)"
    fi
fi

# ---------------------------------------------------------------- slurmctld + slurmd
if alive slurmctld /run/slurm/slurmctld.pid; then
    log "slurmctld already running"
else
    start_bg slurmctld "$LOGDIR/slurmctld.stdout" /usr/sbin/slurmctld -D
    wait_for 30 sh -c 'scontrol ping | grep -q UP' || die "slurmctld did not come up (see $LOGDIR/slurmctld.log)"
fi
if alive slurmd /run/slurm/slurmd.pid; then
    log "slurmd already running"
else
    start_bg slurmd "$LOGDIR/slurmd.stdout" /usr/sbin/slurmd -D
fi

node_ready() { sinfo -h -n "$NODE" -o %T | grep -Eq '^(idle|mixed|allocated)$'; }
if ! wait_for 30 node_ready; then
    # e.g. left DOWN/DRAINED by an earlier run: resume it once
    scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
    wait_for 30 node_ready || die "node $NODE not ready: $(sinfo -h -n "$NODE" -o '%T %E')"
fi
if [ "$ACCOUNTING" = slurmdbd ]; then
    # slurmctld registers cluster "ci" in slurmdbd by itself; make sure sacct answers
    wait_for 30 sacct -n -X -o JobID || die "sacct does not answer"
fi
log "cluster up: $(sinfo -h -o '%P %a %D %T %N' | tr '\n' ' ')"
