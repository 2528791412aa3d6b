#!/usr/bin/env bash
# Multi-host training on a Cloud TPU pod slice: the same command runs on every worker, and
# jax.distributed.initialize() discovers the coordinator and process ids from the TPU metadata.
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh configs/multistep.py:0.5b gs://bucket/vosr05b \
#     --config.data.sources=/data/train_list.txt --config.mesh.data=1 --config.mesh.fsdp=-1
#
# The repository must already be on every worker at ~/vosr-jax with `make install` done there
# (e.g. `gcloud compute tpus tpu-vm ssh $TPU --worker=all --command='cd ~/vosr-jax && make install'`).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
config=${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [--config.x=y ...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [--config.x=y ...]}
shift 2
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/vosr-jax && .venv/bin/python -m vosr_jax.main --multihost --config=$config --workdir=$workdir$extra"
