#!/usr/bin/env bash
# slurm-down.sh - stop the daemons that slurm-up.sh started, and only those:
# it kills the PIDs recorded in $SLURM_CI_RUNDIR/<name>.pid, after checking
# that each PID still is the daemon it was recorded for. Safe to run twice.
# Copied from ../shared/tools/slurm-down.sh; only the pid-file folder differs
# (/run/ript-slurm-ci, as in tests/slurm/slurm-up.sh).
set -uo pipefail

RUNDIR="${SLURM_CI_RUNDIR:-/run/ript-slurm-ci}"
log() { echo "slurm-down: $*" >&2; }

[ -d "$RUNDIR" ] || { log "nothing to stop ($RUNDIR missing)"; exit 0; }

# Cancel jobs still on this private cluster, so that no job step outlives slurmd.
if [ -s "$RUNDIR/slurmctld.pid" ] && scontrol ping 2>/dev/null | grep -q UP; then
    jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null
        for _ in $(seq 1 20); do
            [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
fi

# running PID: the process exists and is not a zombie (PID 1 reaps orphans late)
running() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }

# stop_one NAME: TERM the recorded PID (if it is still NAME), KILL after 20 s
stop_one() {
    local name=$1 f="$RUNDIR/$1.pid" pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if running "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 100); do
            running "$pid" || break
            sleep 0.2
        done
        if running "$pid"; then
            log "$name (pid $pid) ignored TERM, sending KILL"
            kill -KILL "$pid" 2>/dev/null
        fi
        log "stopped $name (pid $pid)"
    else
        log "$name: pid $pid is gone or is not $name any more; not touching it"
    fi
    rm -f "$f"
}

# reverse start order
for d in slurmd slurmctld slurmdbd mariadbd munged; do
    stop_one "$d"
done
rmdir "$RUNDIR" 2>/dev/null || true
