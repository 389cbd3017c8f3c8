#!/usr/bin/env bash
# The GPU check (issue 28): the CUDA paths no GPU has run yet, on a machine with one CUDA GPU,
# within 10 minutes, one line a check:
#
#   gpu_check <check>: ok|FAILED <figures>
#
#   train_amp           one FT-CADIS epoch of `cadis train` with bf16 autocast (amp)
#   certify_throughput  images/s and draws/s in fp32 and bf16, and bf16's agreement with fp32
#   compile             `cadis certify --compile` on CUDA
#   sweep               a 2-trial `cadis sweep` of sweeps/default.yaml, one GPU a worker
#   peak_memory         torch.cuda.max_memory_allocated of each check, nvidia-smi's device peak
#
#   benchmarks/gpu_check.sh [MODELS]     (MODELS: a `cadis pretrain` folder, models/fashion-mnist)
#
# The checks are benchmarks/gpu_check.py's, each in its own process under its own time limit,
# so a failing one does not stop the next; their logs, outputs and the sweep's MLflow store
# stay in the temporary folder each FAILED line names. $PYTHON picks the interpreter (default
# .venv/bin/python); Fashion-MNIST is read where cadis reads it ($CADIS_DATA or Debian's).
# Without a GPU (no working nvidia-smi, or torch sees no CUDA device) it says so in one line
# and exits 0. Exit status: 0 when every check passed, 1 when any failed.
set -u

# Seconds: the whole run from its start (10 minutes with each check's grace below), asking
# torch whether it sees CUDA, each check's limit (the sweep gets what is left but the last
# check's), and the grace a check that ignores the end of its time has before it is killed.
TOTAL_SECONDS=585
PROBE_SECONDS=30
TRAIN_SECONDS=75
THROUGHPUT_SECONDS=60
COMPILE_SECONDS=210
MEMORY_SECONDS=10
KILL_AFTER_SECONDS=3
# What the probe exits with when torch sees no CUDA device (other codes: torch is broken).
NO_CUDA=3

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODELS=$(realpath -m "${1:-$REPO/models/fashion-mnist}")  # a relative MODELS: from here
cd "$REPO" || exit 1
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no GPU here (no working nvidia-smi); nothing checked"
    exit 0
fi
timeout "$PROBE_SECONDS" "$PY" -c \
    "import sys, torch; sys.exit(0 if torch.cuda.is_available() else $NO_CUDA)" \
    >/dev/null 2>&1
probe=$?
if [ "$probe" -eq "$NO_CUDA" ]; then
    echo "gpu_check: no GPU here (torch.cuda.is_available() is false); nothing checked"
    exit 0
elif [ "$probe" -ne 0 ]; then
    echo "gpu_check setup: FAILED $PY could not import torch to ask for CUDA (exit $probe)"
    exit 1
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/cadis-gpu-check.XXXXXX") || exit 1
DEADLINE=$TOTAL_SECONDS  # bash counts SECONDS from the script's start
# The device-wide memory in use, twice a second, for peak_memory (the sweep's workers are
# processes of their own). The first visible device is the one the checks use.
GPU_ID=${CUDA_VISIBLE_DEVICES:-0}
nvidia-smi --id="${GPU_ID%%,*}" --query-gpu=memory.used,memory.total \
    --format=csv,noheader,nounits -lms 500 >"$WORK/nvidia-smi.csv" 2>/dev/null &
SAMPLER=$!
trap 'kill "$SAMPLER" 2>/dev/null' EXIT
failed=0

# The line that says why a check failed: cadis's own error, else an exception's last line,
# else the log's last line.
reason() {
    local log=$1 line
    line=$(grep -E '^cadis: error:|^[A-Za-z_.]*(Error|Exception|Exit)\b' "$log" | tail -n 1)
    [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
    printf '%s' "${line:0:300}"
}

# run_check NAME LIMIT RESERVE: the check under min(LIMIT, what the run has left less RESERVE,
# the time kept for the checks after it).
run_check() {
    local name=$1 limit=$2 reserve=$3 log="$WORK/$1.log" left rc line
    left=$((DEADLINE - SECONDS - reserve))
    [ "$limit" -le "$left" ] || limit=$left
    if [ "$limit" -le 0 ]; then
        echo "gpu_check $name: FAILED not run: the run's $TOTAL_SECONDS s are spent"
        failed=1
        return
    fi
    # timeout's KILL goes to its whole process group (the sweep's Ray included), timeout too:
    # in a subshell, so that bash's "Killed" notice goes to the log, not between the lines.
    (timeout --kill-after="$KILL_AFTER_SECONDS" "$limit" "$PY" benchmarks/gpu_check.py \
        "$name" --work "$WORK" --models "$MODELS" >"$log" 2>&1; exit $?) 2>>"$log"
    rc=$?
    line=$(grep -m 1 "^gpu_check $name: ok " "$log")
    if [ "$rc" -eq 0 ] && [ -n "$line" ]; then
        echo "$line"
        return
    fi
    failed=1
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "gpu_check $name: FAILED timed out after $limit s (log $log)"
    else
        echo "gpu_check $name: FAILED exit $rc: $(reason "$log") (log $log)"
    fi
}

run_check train_amp "$TRAIN_SECONDS" "$MEMORY_SECONDS"
run_check certify_throughput "$THROUGHPUT_SECONDS" "$MEMORY_SECONDS"
run_check compile "$COMPILE_SECONDS" "$MEMORY_SECONDS"
run_check sweep "$TOTAL_SECONDS" "$MEMORY_SECONDS"
run_check peak_memory "$MEMORY_SECONDS" 0
exit "$failed"
