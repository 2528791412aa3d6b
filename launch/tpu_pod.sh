#!/usr/bin/env bash
# Multi-host training on a Cloud TPU pod slice: the same command runs on every worker, and
# jax.distributed.initialize() discovers the coordinator and process ids from the TPU metadata.
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh configs/multistep.py:0.5b gs://bucket/vosr05b \
#     --config.data.sources=/data/train_list.txt --config.mesh.data=1 --config.mesh.fsdp=-1
#
# Multi-slice (several slices joined over the data-centre network, DCN): create the slices as one
# queued resource with --node-count, named $TPU-0 ... $TPU-(N-1) by --node-prefix, e.g.
#
#   gcloud compute tpus queued-resources create my-qr --zone=$ZONE --accelerator-type=v5p-128 \
#     --runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=$TPU
#   SLICES=2 TPU=$TPU ZONE=$ZONE launch/tpu_pod.sh configs/multistep.py:0.5b gs://bucket/vosr05b \
#     --config.data.sources=/data/train_list.txt --config.mesh.data=1 --config.mesh.fsdp=-1
#
# The command then runs on every worker of every slice, and the TPU runtime tells JAX the slices
# (each device's slice_index). The mesh is config.mesh inside a slice (ICI) times config.dcn_mesh
# across slices (default data=-1: data parallel over DCN, so only the gradient all-reduce crosses
# slices; FSDP stays inside a slice with the flags above). config.batch_size is the global batch of
# all slices together. Check the compile, memory and collectives first, without the pod:
#
#   python -m vosr_jax.aot --config=configs/multistep.py:0.5b --topology=v5p:4x4x4 --slices=2 \
#     --config.mesh.data=1 --config.mesh.fsdp=-1 --per_chip_batch=8
#
# The repository must already be on every worker at ~/vosr-jax with `make install` done there
# (e.g. `gcloud compute tpus tpu-vm ssh $TPU --worker=all --command='cd ~/vosr-jax && make install'`,
# for each slice $TPU-i in multi-slice runs).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name (the --node-prefix of multi-slice runs)}" "${ZONE:?set ZONE}"
config=${1:?usage: launch/tpu_pod.sh CONFIG WORKDIR [--config.x=y ...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG WORKDIR [--config.x=y ...]}
shift 2
extra=$(printf ' %q' "$@")
command="cd ~/vosr-jax && .venv/bin/python -m vosr_jax.main --multihost --config=$config --workdir=$workdir$extra"
slices=${SLICES:-1}
if [[ "$slices" -eq 1 ]]; then
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$command"
else
  pids=()
  for ((i = 0; i < slices; i++)); do
    gcloud compute tpus tpu-vm ssh "$TPU-$i" --zone "$ZONE" --worker=all --command "$command" &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  exit "$status"
fi
