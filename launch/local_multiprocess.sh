#!/usr/bin/env bash
# Several JAX processes on one machine (CPU), to exercise the multi-host path without a cluster:
# process 0 is the coordinator on 127.0.0.1, every process gets DEVICES_PER_PROCESS virtual CPU
# devices, and they train one model together through jax.distributed (gloo collectives).
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local_multiprocess.sh \
#     configs/multistep.py:tiny /tmp/vosr_mp --config.total_steps=20
set -euo pipefail
config=${1:?usage: launch/local_multiprocess.sh CONFIG WORKDIR [--config.x=y ...]}
workdir=${2:?usage: launch/local_multiprocess.sh CONFIG WORKDIR [--config.x=y ...]}
shift 2
num_processes=${NUM_PROCESSES:-2}
port=${PORT:-$((20000 + RANDOM % 20000))}
python=${PYTHON:-.venv/bin/python}
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-2}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for ((i = 0; i < num_processes; i++)); do
  "$python" -m vosr_jax.main --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" --process_id="$i" \
    "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
exit "$status"
