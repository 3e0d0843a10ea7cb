#!/bin/bash
# One torchrun worker (started by `torchrun --no-python slurm/worker.sh CMD...`).
#
# Why this wrapper exists: torchrun reports a worker's failure with its own exit code 1, so the
# trainer's requeue code (checkpoint.requeue_exit_code) would be lost on the way to the batch
# script. This wrapper runs CMD, forwards the signals that ask for a preemption save (torchrun
# forwards them to its workers, i.e. to us), and writes CMD's exit code to
# $FRAMER_EXIT_DIR/rank$RANK.code, which slurm/train_dit.sh reads after srun returns.
set -u

: "${FRAMER_EXIT_DIR:?FRAMER_EXIT_DIR is not set (slurm/train_dit.sh sets it)}"
: "${RANK:?RANK is not set: start this under torchrun}"
if [ "$#" -eq 0 ]; then
    echo "usage: worker.sh COMMAND [ARGS...]" >&2
    exit 2
fi

"$@" &
child=$!

# shellcheck disable=SC2317,SC2329  # only called from the traps below (0.10 and 0.11 name it differently)
forward() {
    kill -s "$1" "$child" 2>/dev/null || true
}
for sig in TERM INT HUP USR1 USR2; do
    # shellcheck disable=SC2064  # expand $sig now: one handler per signal
    trap "forward $sig" "$sig"
done

# `wait` returns early (status > 128) whenever a trapped signal arrives; keep waiting until the
# trainer itself has exited, then ask once more for its real status.
while :; do
    wait "$child"
    rc=$?
    if kill -0 "$child" 2>/dev/null; then
        continue
    fi
    if [ "$rc" -gt 128 ]; then
        wait "$child" 2>/dev/null
        again=$?
        if [ "$again" -ne 127 ]; then
            rc=$again
        fi
    fi
    break
done

mkdir -p "$FRAMER_EXIT_DIR"
echo "$rc" >"$FRAMER_EXIT_DIR/rank$RANK.code"
exit "$rc"
