"""The distributed engine a run asked for, checked against the one Accelerate set up.

`accelerate launch --config_file fsdp.yaml` on a machine without GPUs does not refuse FSDP: Accelerate 1.16 sets up
every process alone (`DistributedType.NO`), or DDP on CPUs (`MULTI_CPU`) under torchrun. Training would then run
unsharded, or as unsynchronised copies that collide when they save. Both training paths stop instead.
"""

from accelerate import Accelerator
from accelerate.utils import DistributedType
from accelerate.utils.environment import parse_flag_from_env
from transformers import TrainingArguments

# The variables `accelerate launch` sets from a config's `distributed_type`.
_ENGINE_FLAGS = {DistributedType.FSDP: "ACCELERATE_USE_FSDP", DistributedType.DEEPSPEED: "ACCELERATE_USE_DEEPSPEED"}


def requested_engine(args: TrainingArguments | None = None) -> DistributedType | None:
    """FSDP or DeepSpeed if the run asks for it, else `None` (DDP or a single process: nothing to check).

    Asked for by `accelerate launch` with such a config (it sets `ACCELERATE_USE_FSDP` or `ACCELERATE_USE_DEEPSPEED`
    in every process), or by the `fsdp` / `deepspeed` fields of the `TrainingArguments` given to the Trainer.
    """
    for engine, flag in _ENGINE_FLAGS.items():
        if parse_flag_from_env(flag):
            return engine
    if args is not None and args.fsdp:
        return DistributedType.FSDP
    if args is not None and args.deepspeed:
        return DistributedType.DEEPSPEED
    return None


def check_engine(accelerator: Accelerator, args: TrainingArguments | None = None) -> None:
    """Refuses a run whose requested engine (see [`requested_engine`]) is not the one `accelerator` set up.

    Raises:
        `RuntimeError`: naming the engine requested and the one set up (with its number of processes), in every
        process, before anything is trained.
    """
    requested = requested_engine(args)
    found = accelerator.distributed_type
    if requested is None or found == requested:
        return
    raise RuntimeError(
        f"{requested.value} was requested, but Accelerate set up {found.value} with {accelerator.num_processes} "
        f"process(es) (device {accelerator.device}): training would not run as configured. FSDP needs GPUs (Accelerate "
        "ignores it on CPUs). Launch with a config for the engine this machine runs: DDP "
        "(examples/accelerate_configs/multi_gpu_ddp.yaml; on CPUs torchrun with ACCELERATE_USE_CPU=1) or DeepSpeed."
    )
