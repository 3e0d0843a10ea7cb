#!/bin/bash
# FRAMER multi-node training on SLURM: one srun task per node, each starting torchrun (c10d
# rendezvous hosted on the first node) with GPUS_PER_NODE workers. Preemption-safe: before the
# time limit SLURM sends the preemption signal to every process of the step; the trainer saves
# collectively and exits with the requeue code; this script then requeues the job, which resumes
# with `--resume auto` (also on a different node count). See docs/launch.md.
#
#   mkdir -p logs
#   CONFIG=configs/sd35m_framer.toml sbatch slurm/train_dit.sh [section.key=value ...]
#   CONFIG=... BACKEND=deepspeed DS_CONFIG=ds_configs/zero3.json sbatch --nodes=8 slurm/train_dit.sh
#
# Every #SBATCH line can be overridden on the sbatch command line (--nodes, --partition, ...).
# --signal: USR1 goes to every process of the job step (not the batch shell: no "B:") 300 s
# before the time limit. SLURM may send it up to 60 s earlier than asked; the margin must cover
# one training step + the collective checkpoint save + exit. If you change the signal here, set
# PREEMPT_SIGNAL to match.
# CPU or small clusters: `sbatch --gpus-per-node=0 ...` (no GPU gres: one CPU worker per node; the
# srun task gets every CPU SLURM allocated on its node). See docs/launch.md.
#
#SBATCH --job-name=framer-dit
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
trap 'echo "train_dit.sh: command failed at line $LINENO" >&2' ERR

# ---- settings (environment variables; sbatch exports the submitting shell's environment) ----
CONFIG=${CONFIG:-}                          # run config (required)
BACKEND=${BACKEND:-fsdp2}                   # fsdp2 | deepspeed
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}   # SLURM runs a copy of this script: find the repo
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-}             # workers per node (default: what SLURM allocated)
PREEMPT_SIGNAL=${PREEMPT_SIGNAL:-USR1}      # must match --signal above (USR1 | USR2)
REQUEUE_EXIT_CODE=${REQUEUE_EXIT_CODE:-75}  # checkpoint.requeue_exit_code (set it here, not as an override)
SAVE_GRACE_S=${SAVE_GRACE_S:-280}           # how long torchrun waits for workers after a signal
RDZV_PORT=${RDZV_PORT:-29400}
LOG_DIR=${LOG_DIR:-$REPO_DIR/logs}
MAX_RESTARTS=${MAX_RESTARTS:-50}            # stop requeueing after this many restarts

die() { echo "train_dit.sh: error: $*" >&2; exit 2; }
# SLURM counts a requeue (its own or scontrol's) at once: the job's Restarts is then above this
# run's SLURM_RESTART_COUNT. A cancelled job keeps its count.
slurm_requeued() {
    local count
    count=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | tr ' ' '\n' | sed -n 's/^Restarts=//p' | head -n 1)
    [ -n "$count" ] && [ "$count" -gt "$restart" ]
}

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job (submit with sbatch)"
[ -n "$CONFIG" ] || die "CONFIG is not set (e.g. CONFIG=configs/sd35m_framer.toml sbatch slurm/train_dit.sh)"
cd "$REPO_DIR" || die "REPO_DIR $REPO_DIR does not exist"
[ -f framer_dist/train.py ] || die "REPO_DIR $REPO_DIR has no framer_dist/train.py (submit from the repo root or set REPO_DIR)"
[ -f "$CONFIG" ] || die "config file not found: $CONFIG"
for arg in "$@"; do
    case "$arg" in
        checkpoint.preempt_signal=* | checkpoint.requeue_exit_code=*)
            die "'$arg': set PREEMPT_SIGNAL / REQUEUE_EXIT_CODE instead (the script must know them)" ;;
    esac
done
case "$GPUS_PER_NODE" in
    "" | [1-9] | [1-9][0-9]) ;;
    *) die "GPUS_PER_NODE must be a number of workers per node (1-99), got '$GPUS_PER_NODE'" ;;
esac
case "$PREEMPT_SIGNAL" in
    USR1 | USR2) ;;
    *) die "PREEMPT_SIGNAL must be USR1 or USR2, got '$PREEMPT_SIGNAL'" ;;
esac
case "$BACKEND" in
    fsdp2) backend_args=(--backend fsdp2) ;;
    deepspeed)
        [ -f "$DS_CONFIG" ] || die "DeepSpeed config not found: DS_CONFIG=$DS_CONFIG"
        backend_args=(--ds "$DS_CONFIG")
        ;;
    *) die "BACKEND must be fsdp2 or deepspeed, got '$BACKEND'" ;;
esac

# ---- where things go: one folder per job, one sub-folder per (re)start ----
restart=${SLURM_RESTART_COUNT:-0}
job_log_dir="$LOG_DIR/${SLURM_JOB_NAME:-framer}-$SLURM_JOB_ID/restart$restart"
export FRAMER_EXIT_DIR="$job_log_dir/exit"     # worker exit codes (slurm/worker.sh)
mkdir -p "$FRAMER_EXIT_DIR"
rm -f "$FRAMER_EXIT_DIR"/rank*.code

nnodes=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}
hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST is not set}")
head_node=${hosts%%$'\n'*}
[ -n "$head_node" ] || die "could not resolve the first node of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
# Every node reaches torchrun's c10d store by this name; a node name that does not resolve (a
# cluster that addresses its nodes by NodeAddr only) would hang the rendezvous: use the address.
rdzv_host=$head_node
if ! getent hosts "$head_node" >/dev/null 2>&1; then
    rdzv_host=$(scontrol show node "$head_node" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n 1)
    [ -n "$rdzv_host" ] || die "the first node's name '$head_node' does not resolve and scontrol shows no NodeAddr for it"
fi

# Workers per node: one per allocated GPU; none allocated (--gpus-per-node=0, a CPU partition): one
# CPU worker per node.
if [ -z "$GPUS_PER_NODE" ]; then
    GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-0}
    [ "$GPUS_PER_NODE" -gt 0 ] || GPUS_PER_NODE=1
fi
# srun does not inherit --cpus-per-task from sbatch on recent SLURM, and without it the whole node's
# torchrun (and all its workers) could be pinned to one core: give the one task per node every CPU
# SLURM allocated there (--exclusive: the whole node), or what --cpus-per-task asked for.
cpus_per_task=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
cpu_args=()
if [ -n "$cpus_per_task" ]; then
    cpu_args=(--cpus-per-task="$cpus_per_task")
fi

# ---- NCCL / network (see docs/launch.md; export yours before sbatch to override) ----
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
omp_default=$(( ${cpus_per_task:-8} / GPUS_PER_NODE ))   # the node's CPUs shared by its workers
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( omp_default > 0 ? omp_default : 1 ))}
# InfiniBand / RoCE clusters usually also need some of (values are cluster-specific):
#   NCCL_IB_HCA=mlx5  NCCL_SOCKET_IFNAME=ib0 (or ^lo,docker)  NCCL_IB_GID_INDEX=3 (RoCE v2)

echo "[train_dit] job $SLURM_JOB_ID restart $restart: $nnodes node(s) x $GPUS_PER_NODE worker(s)" \
    "(${SLURM_GPUS_ON_NODE:-no} GPU(s) allocated per node, ${cpus_per_task:-?} CPU(s) per node," \
    "OMP_NUM_THREADS=$OMP_NUM_THREADS), backend $BACKEND, rendezvous $rdzv_host:$RDZV_PORT," \
    "logs $job_log_dir"

# Per node: torchrun forwards the preemption signal and SIGTERM to its workers and then waits up
# to SAVE_GRACE_S for their collective save before killing them.
# SLURM replaces %n with the node index in the output file name.
srun --nodes="$nnodes" --ntasks-per-node=1 "${cpu_args[@]}" --kill-on-bad-exit=1 \
    --output="$job_log_dir/node%n.log" \
    "$PYTHON" -m torch.distributed.run \
    --nnodes="$nnodes" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$rdzv_host:$RDZV_PORT" \
    --rdzv-id="$SLURM_JOB_ID-$restart" --max-restarts=0 \
    --signals-to-handle="SIGTERM,SIGINT,SIGHUP,SIG$PREEMPT_SIGNAL" \
    --shutdown-timeout="$SAVE_GRACE_S" \
    --no-python "$REPO_DIR/slurm/worker.sh" \
    "$PYTHON" "$REPO_DIR/framer_dist/train.py" \
    --config "$CONFIG" "${backend_args[@]}" --resume auto \
    "checkpoint.preempt_signal=SIG$PREEMPT_SIGNAL" \
    "checkpoint.requeue_exit_code=$REQUEUE_EXIT_CODE" \
    "$@" &
srun_pid=$!

# SIGTERM reaches this shell on scancel, and also when SLURM itself requeues the job (scontrol
# requeue, preemption with PreemptMode=REQUEUE): remember it, and tell the two apart afterwards (the
# trainer still saves: SLURM signals the step's processes directly).
cancelled=0
trap 'cancelled=1' TERM INT
while :; do
    rc=0
    wait "$srun_pid" || rc=$?
    if kill -0 "$srun_pid" 2>/dev/null; then
        continue
    fi
    if [ "$rc" -gt 128 ]; then
        again=0
        wait "$srun_pid" 2>/dev/null || again=$?
        if [ "$again" -ne 127 ]; then
            rc=$again
        fi
    fi
    break
done

requeue=0
for f in "$FRAMER_EXIT_DIR"/rank*.code; do
    [ -e "$f" ] || continue
    if [ "$(cat "$f")" = "$REQUEUE_EXIT_CODE" ]; then
        requeue=1
    fi
done

if [ "$cancelled" = 1 ]; then
    saved="checkpoint saved"
    [ "$requeue" = 1 ] || saved="stopped before the trainers saved (the newest checkpoint stands)"
    if slurm_requeued; then
        echo "[train_dit] $saved; SLURM requeued the job (scontrol requeue or preemption):" \
            "its next run resumes from the newest checkpoint"
    else
        echo "[train_dit] $saved; job was cancelled, not requeueing"
    fi
    exit 0
fi
if [ "$requeue" = 1 ]; then
    if [ "$restart" -ge "$MAX_RESTARTS" ]; then
        echo "[train_dit] checkpoint saved; restart limit MAX_RESTARTS=$MAX_RESTARTS reached" >&2
        exit 1
    fi
    echo "[train_dit] checkpoint saved after preemption signal: scontrol requeue $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
if [ "$rc" -ne 0 ]; then
    echo "[train_dit] training failed (srun exit code $rc); see $job_log_dir/node*.log" >&2
fi
exit "$rc"
