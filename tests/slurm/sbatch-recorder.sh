#!/bin/sh
# sbatch-recorder.sh - stands in for `sbatch` (tests/test_slurm.py links it as `sbatch` into a
# folder put first on PATH): appends each command line, and a batch script read from stdin
# (`sbatch ... /dev/stdin`), to $RIPT_CI_SBATCH_LOG, then runs the real sbatch,
# $RIPT_CI_SBATCH, with the same arguments and script. The test reads what a user of the
# node could see of the submission (command lines are public through `ps`).
set -eu
printf 'sbatch %s\n' "$*" >>"$RIPT_CI_SBATCH_LOG"
last=""
for last in "$@"; do :; done
if [ "$last" = /dev/stdin ]; then
    script=$(cat)
    printf '%s\n' "$script" >>"$RIPT_CI_SBATCH_LOG"
    printf '%s\n' "$script" | exec "$RIPT_CI_SBATCH" "$@"
fi
exec "$RIPT_CI_SBATCH" "$@"
