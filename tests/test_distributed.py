"""Data-parallel supernet training in two CPU processes: the replicas must stay identical.

Both paths are checked, `train_supernet` and `SupernetTrainer` (and, under DeepSpeed, the CLI's `mpsupernet train`).
The tests launch this very file; run as a script it is the worker. DDP: `accelerate launch` starts several CPU
processes only through mpirun, so torchrun (with `ACCELERATE_USE_CPU=1`) stands in for it; the training code is the
one `accelerate launch` runs on GPUs. DeepSpeed ZeRO-2: `accelerate launch` with the shipped config and
`DS_ACCELERATOR=cpu` (slow: the first run also compiles DeepSpeed's shared-memory op, cached afterwards). FSDP cannot
run on CPUs: a launch with its config must stop with an error naming the engine requested and the one set up.
"""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_from_disk
from safetensors.torch import load_file, save_file


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def worker(argv=None) -> None:
    from transformers import TrainingArguments

    import mpsupernet.training.loop
    from mpsupernet import SamSupernetForMaskGeneration
    from mpsupernet.cli import main
    from mpsupernet.data import SamSegmentationPreprocessor
    from mpsupernet.training import SupernetTrainer, SupernetTrainingArguments, train_supernet

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--path", choices=("accelerate_loop", "trainer", "cli"), default="accelerate_loop")
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--save-steps", type=int, default=None)
    parser.add_argument("--resume-from-checkpoint", default=None)
    args = parser.parse_args(argv)
    common = dict(max_steps=args.max_steps, learning_rate=3e-3, gradient_accumulation_steps=2)
    saving = dict(save_strategy="steps", save_steps=args.save_steps) if args.save_steps else dict(save_strategy="no")
    trained = []
    if args.path == "cli":
        # The CLI builds its own supernet: keep it, to save this process's replica below.
        train = mpsupernet.training.loop.train_supernet
        mpsupernet.training.loop.train_supernet = lambda model, *a, **k: trained.append(model) or train(model, *a, **k)
        command = [
            "train", "--supernet", args.model, "--dataset", args.data, "--output-dir", args.output_dir,
            "--max-steps", str(args.max_steps), "--learning-rate", "3e-3", "--batch-size", "1",
            "--gradient-accumulation-steps", "2", "--num-random-subnets", "1", "--num-validation", "2",
        ] + (["--save-steps", str(args.save_steps)] if args.save_steps else [])  # fmt: skip
        if args.resume_from_checkpoint:
            command += ["--resume-from-checkpoint", args.resume_from_checkpoint]
        assert main(command) == 0
        model = trained[0]
    else:
        model = SamSupernetForMaskGeneration.from_pretrained(args.model)
        preprocessor = SamSegmentationPreprocessor(model.config, prompts_per_image=2)
        dataset = load_from_disk(args.data)
    if args.path == "trainer":
        # A plain TrainingArguments, without use_cpu: SupernetTrainer must still set every process up.
        arguments = TrainingArguments(
            output_dir=args.output_dir, per_device_train_batch_size=1, report_to="none", logging_steps=1,
            disable_tqdm=True, **saving, **common,
        )  # fmt: skip
        trainer = SupernetTrainer(
            model=model, args=arguments, num_random_subnets=1, train_dataset=dataset.with_transform(preprocessor)
        )
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.save_model()
    elif args.path == "accelerate_loop":
        arguments = SupernetTrainingArguments(
            output_dir=args.output_dir, per_device_train_batch_size=1, num_random_subnets=1, logging_steps=1,
            lr_scheduler_type="linear", weight_decay=0.0, report_to="none",
            resume_from_checkpoint=args.resume_from_checkpoint, **saving, **common,
        )  # fmt: skip
        train_supernet(model, dataset, args=arguments, preprocessor=preprocessor)
    save_file(trainable_state(model), Path(args.output_dir) / f"rank{os.environ['RANK']}.safetensors")


def _tiny_supernet_and_data(tmp_path):
    from conftest import make_tiny_sam
    from mpsupernet import SamSupernetForMaskGeneration
    from mpsupernet.data import make_synthetic_segmentation_dataset

    torch.manual_seed(0)
    model = SamSupernetForMaskGeneration.from_sam(make_tiny_sam())
    model.save_pretrained(tmp_path / "model")
    make_synthetic_segmentation_dataset(8, image_size=64, seed=1).save_to_disk(str(tmp_path / "data"))
    return model


def _worker_arguments(tmp_path, output_dir, *extra) -> list[str]:
    return [__file__, "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--output-dir", str(output_dir), *extra]


def _assert_replicas_equal_and_trained(output_dir, initial) -> dict[str, torch.Tensor]:
    """rank 0's trainable parameters, after checking them against rank 1's, the initial ones and the saved model."""
    from mpsupernet import SamSupernetForMaskGeneration

    rank0 = load_file(output_dir / "rank0.safetensors")
    rank1 = load_file(output_dir / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() == initial.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the data-parallel replicas"
    # The ranks saw different examples: identical replicas mean the gradients were synchronised, not left alone.
    assert any(not torch.equal(rank0[name], initial[name]) for name in rank0 if "lora_B" in name)
    saved = trainable_state(SamSupernetForMaskGeneration.from_pretrained(output_dir))
    torch.testing.assert_close(saved, rank0, rtol=0, atol=0)
    return rank0


@pytest.mark.parametrize("path", ["accelerate_loop", "trainer"])
def test_two_data_parallel_processes_keep_identical_replicas(tmp_path, path):
    model = _tiny_supernet_and_data(tmp_path)
    output_dir = tmp_path / "trained"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += _worker_arguments(tmp_path, output_dir, "--path", path)
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    _assert_replicas_equal_and_trained(output_dir, trainable_state(model))


CONFIGS = Path(__file__).parent.parent / "examples" / "accelerate_configs"


def _accelerate_launch(config: str, arguments: list[str], *options, **environment) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    command += ["--num_processes", "2", *options, *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **environment}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["accelerate_loop", "trainer", "cli"])
def test_deepspeed_zero2_on_two_cpu_processes_trains_replicas_and_resumes_exactly(tmp_path, path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (the `deepspeed` extra)")
    model = _tiny_supernet_and_data(tmp_path)
    initial = trainable_state(model)
    runs = {}
    for name, extra in (
        ("uninterrupted", ["--max-steps", "4", "--save-steps", "2"]),
        ("resumed", ["--max-steps", "4", "--resume-from-checkpoint", str(tmp_path / "uninterrupted" / "checkpoint-2")]),
    ):
        arguments = _worker_arguments(tmp_path, tmp_path / name, "--path", path, *extra)
        # The shipped config trains in bf16; transformers refuses bf16 arguments on CPUs without `use_cpu=True`, and
        # a DeepSpeed config whose bf16 differs from the arguments': the Trainer runs without mixed precision here.
        options = ["--mixed_precision", "no"] if path == "trainer" else []
        result = _accelerate_launch("deepspeed_zero2.yaml", arguments, *options, DS_ACCELERATOR="cpu")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        runs[name] = _assert_replicas_equal_and_trained(tmp_path / name, initial)
    # Resuming from the step-2 checkpoint reaches step 4 exactly as the run that was never interrupted.
    torch.testing.assert_close(runs["resumed"], runs["uninterrupted"], rtol=0, atol=0)


@pytest.mark.parametrize("path", ["accelerate_loop", "trainer"])
def test_fsdp_requested_but_not_set_up_is_refused_before_training(tmp_path, monkeypatch, path):
    from accelerate.state import AcceleratorState
    from transformers import TrainingArguments

    from mpsupernet.data import SamSegmentationPreprocessor
    from mpsupernet.training import SupernetTrainer, SupernetTrainingArguments, train_supernet

    model = _tiny_supernet_and_data(tmp_path)
    before = trainable_state(model)
    dataset = load_from_disk(str(tmp_path / "data"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    message = r"^FSDP was requested, but Accelerate set up NO with 1 process\(es\) \(device cpu\): training would not"
    try:
        with pytest.raises(RuntimeError, match=message):
            if path == "trainer":
                arguments = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1)
                preprocessor = SamSegmentationPreprocessor(model.config, prompts_per_image=2)
                SupernetTrainer(model=model, args=arguments, train_dataset=dataset.with_transform(preprocessor))
            else:
                arguments = SupernetTrainingArguments(
                    output_dir=str(tmp_path / "out"), max_steps=1, lr_scheduler_type="linear", weight_decay=0.0,
                    report_to="none",
                )  # fmt: skip
                preprocessor = SamSegmentationPreprocessor(model.config, prompts_per_image=2)
                train_supernet(model, dataset, args=arguments, preprocessor=preprocessor)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    torch.testing.assert_close(trainable_state(model), before, rtol=0, atol=0)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # the Trainer makes the folder


@pytest.mark.slow
@pytest.mark.parametrize("path", ["accelerate_loop", "trainer"])
def test_fsdp_requested_on_cpus_stops_naming_both_engines(tmp_path, path):
    _tiny_supernet_and_data(tmp_path)
    result = _accelerate_launch("fsdp.yaml", _worker_arguments(tmp_path, tmp_path / "trained", "--path", path))
    assert result.returncode != 0
    # DDP on CPUs under this launch (the arguments ask for the CPU); `NO`, one process each, for a bare Accelerator
    assert re.search(r"RuntimeError: FSDP was requested, but Accelerate set up (MULTI_CPU|NO) with [12] process", result.stderr)
    assert not (tmp_path / "trained" / "model.safetensors").exists()


if __name__ == "__main__":
    worker()
