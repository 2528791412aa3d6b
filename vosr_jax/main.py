r"""Training entry point.

  python -m vosr_jax.main --config=configs/multistep.py:tiny --workdir=/tmp/vosr_tiny \
    --config.data.sources=/data/hq_images --config.total_steps=1000

`--config.a.b=value` overrides any config field (unknown fields are an error). Exit status: 0
done (or stopped by SIGTERM with a checkpoint), 2 a usage or config error (one line, before any
compute; nothing written), 3 a checkpoint could not be written (e.g. disk full: the earlier
checkpoints are intact; rerun the same command to resume). Multi-host:
`--multihost` calls `jax.distributed.initialize()` (auto-detected on TPU pods and SLURM); the
`--coordinator_address/--num_processes/--process_id` flags set it up explicitly (e.g. several local
processes on one machine; see launch/).
"""
import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vosr_jax import checkpoint, cli_utils, train

USAGE_ERROR, CHECKPOINT_NOT_WRITTEN = 2, 3

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:variant].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and samples go here.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize().")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (implies --multihost).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.", lower_bound=0)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if None not in (_NUM_PROCESSES.value, _PROCESS_ID.value) and \
      _PROCESS_ID.value >= _NUM_PROCESSES.value:
    cli_utils.usage_exit(f"--process_id={_PROCESS_ID.value} must be below "
                         f"--num_processes={_NUM_PROCESSES.value}")
  if _COORDINATOR.value is not None:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()
  logging.info("Process %d of %d; %d local of %d devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except checkpoint.CheckpointNotWritten as e:
    logging.error("%s", e)
    return CHECKPOINT_NOT_WRITTEN
  except (ValueError, FileNotFoundError, PermissionError) as e:
    # Config, data and workdir checks (all before any compute); the traceback at --verbosity=1.
    logging.debug("Traceback of the error below:", exc_info=True)
    cli_utils.usage_exit(str(e))
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli_utils.parse_absl_flags)
