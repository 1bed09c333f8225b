"""`SupernetTrainingArguments`: the `TrainingArguments` of supernet training, read by both training paths."""

from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

from .step import QUANTIZER_LR_SCALE, check_distillation


@dataclass
class SupernetTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the options of sandwich-rule supernet training.

    `SupernetTrainer` and `train_supernet` read the same object, so an option means the same in both. Two
    `TrainingArguments` defaults change for this model: `remove_unused_columns=False` (the preprocessing transform
    needs the raw columns, and `ground_truth_masks` is no forward argument) and `ddp_find_unused_parameters=True`
    (each subnet leaves some trained parameters unused). And `use_cpu` is set on a machine without an accelerator
    (CUDA, XPU or MPS): it changes nothing there but how Accelerate is set up, which DeepSpeed on several CPU
    processes needs.

    Args:
        num_random_subnets (`int`, *optional*, defaults to 2): random subnets per step, besides the largest and the
            smallest.
        sandwich_seed (`int`, *optional*): seed of the random subnets; defaults to `seed`.
        distillation (`str`, *optional*, defaults to `"largest"`): the distillation teacher, `"largest"`,
            `"full_precision"` or `None` (see `supernet_training_step`).
        distillation_kind (`str`, *optional*, defaults to `"kl"`): `"kl"` or `"mse"`.
        distillation_weight (`float`, *optional*, defaults to 1.0): weight of the distillation loss.
        multimask_output (`bool`, *optional*, defaults to `False`): train and evaluate with three masks per prompt.
        quantizer_lr_scale (`float`, *optional*, defaults to `QUANTIZER_LR_SCALE`): the quantizers' step sizes and
            offsets learn at `learning_rate` times this (see `quantizer_parameter_groups`).
        fixed_architecture (`dict`, *optional*): an architecture (`SubnetArchitecture.to_dict()`) to train alone at
            every step instead of the sandwich: a model dedicated to one budget, or a standalone fine-tune of a
            subnet (see `FixedArchitectureSampler`). It has no largest subnet to distil from: `distillation` must
            then be `None` or `"full_precision"`.
        kwargs: every `TrainingArguments` field.

    Raises:
        `ValueError`: for a `num_random_subnets` that is not a non-negative integer, an unknown distillation teacher
        or kind, a negative `quantizer_lr_scale`, `fixed_architecture` with `distillation="largest"`, or
        `torch_compile=True` without `fixed_architecture` (it recompiles for every sampled subnet).
    """

    num_random_subnets: int = field(default=2, metadata={"help": "Random subnets per step."})
    sandwich_seed: int | None = field(default=None, metadata={"help": "Seed of the random subnets; defaults to seed."})
    distillation: str | None = field(default="largest", metadata={"help": "'largest', 'full_precision' or None."})
    distillation_kind: str = field(default="kl", metadata={"help": "'kl' or 'mse'."})
    distillation_weight: float = field(default=1.0, metadata={"help": "Weight of the distillation loss."})
    multimask_output: bool = field(default=False, metadata={"help": "Three masks per prompt."})
    quantizer_lr_scale: float = field(
        default=QUANTIZER_LR_SCALE, metadata={"help": "The quantizers' learning rate over `learning_rate`."}
    )
    fixed_architecture: dict | None = field(
        default=None, metadata={"help": "An architecture dict to train alone at every step instead of the sandwich."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the raw columns for the transform."})
    ddp_find_unused_parameters: bool | None = field(
        default=True, metadata={"help": "Each subnet leaves some trained parameters unused."}
    )

    def __post_init__(self):
        if not self.use_cpu and not _has_accelerator():
            # Without it, TrainingArguments sets Accelerate up as one process under a DeepSpeed launch on CPUs
            # (Accelerate 1.16), and the Accelerator built after it configures DeepSpeed for one process of many.
            self.use_cpu = True
        super().__post_init__()
        if not isinstance(self.num_random_subnets, int) or isinstance(self.num_random_subnets, bool):
            raise ValueError(f"`num_random_subnets` must be a non-negative integer, got {self.num_random_subnets!r}.")
        if self.num_random_subnets < 0:
            raise ValueError(f"`num_random_subnets` must be a non-negative integer, got {self.num_random_subnets!r}.")
        check_distillation(self.distillation, self.distillation_kind)
        if self.fixed_architecture is not None and self.distillation == "largest":
            raise ValueError(
                "`fixed_architecture` trains one architecture alone, so there is no largest subnet to distil from; "
                "set `distillation` to None or 'full_precision'."
            )
        if self.torch_compile and self.fixed_architecture is None:
            raise ValueError(
                "`torch_compile=True` is refused: every training step samples other subnets, so torch.compile "
                "recompiles the supernet again and again (its recompile limit is reached; a step ran about 100x "
                "slower than eager). Train eagerly, and compile an extracted subnet (a fixed architecture) instead."
            )
        if not self.quantizer_lr_scale >= 0:
            raise ValueError(f"`quantizer_lr_scale` must be non-negative, got {self.quantizer_lr_scale!r}.")

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **supernet_options) -> "SupernetTrainingArguments":
        """`args` (any `TrainingArguments`) with the supernet options, as a new `SupernetTrainingArguments`.

        Every field of `args` is copied as it is, `remove_unused_columns` and `ddp_find_unused_parameters` included;
        `supernet_options` (the fields of `SUPERNET_OPTIONS`) override those of `args`, if it has them.

        Raises:
            `TypeError`: naming an option that is not a supernet option.
        """
        unknown = sorted(set(supernet_options) - set(SUPERNET_OPTIONS))
        if unknown:
            raise TypeError(f"Unknown supernet training option(s) {unknown}; allowed: {list(SUPERNET_OPTIONS)}.")
        if isinstance(args, cls) and not supernet_options:
            return args
        values = {item.name: getattr(args, item.name) for item in fields(args) if item.init}
        return cls(**{**values, **supernet_options})


def _has_accelerator() -> bool:
    """Whether torch sees a device other than the CPU (CUDA, XPU or MPS) that `TrainingArguments` would choose."""
    return torch.cuda.is_available() or torch.xpu.is_available() or torch.backends.mps.is_available()


SUPERNET_OPTIONS = tuple(
    item.name for item in fields(SupernetTrainingArguments) if item.name not in TrainingArguments.__dataclass_fields__
)
"""The fields `SupernetTrainingArguments` adds to `TrainingArguments`."""
