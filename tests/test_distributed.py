"""Data-parallel supernet training in two CPU processes (gloo): the replicas must stay identical.

Both paths are checked, `train_supernet` and `SupernetTrainer`. The test launches this very file with torchrun; run
as a script it is the worker. `accelerate launch` starts several CPU processes only through mpirun, so torchrun
(with `ACCELERATE_USE_CPU=1`) stands in for it here; the training code is the one `accelerate launch` runs on GPUs.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def worker(argv=None) -> None:
    from datasets import load_from_disk
    from transformers import TrainingArguments

    from mpsupernet import SamSupernetForMaskGeneration
    from mpsupernet.data import SamSegmentationPreprocessor
    from mpsupernet.training import SupernetTrainer, SupernetTrainingArguments, train_supernet

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--trainer", action="store_true", help="train with SupernetTrainer instead of train_supernet")
    args = parser.parse_args(argv)
    model = SamSupernetForMaskGeneration.from_pretrained(args.model)
    preprocessor = SamSegmentationPreprocessor(model.config, prompts_per_image=2)
    dataset = load_from_disk(args.data)
    common = dict(max_steps=3, learning_rate=3e-3, gradient_accumulation_steps=2)
    if args.trainer:
        arguments = TrainingArguments(
            output_dir=args.output_dir, per_device_train_batch_size=1, use_cpu=True, report_to="none",
            save_strategy="no", logging_steps=1, disable_tqdm=True, **common,
        )  # fmt: skip
        trainer = SupernetTrainer(
            model=model, args=arguments, num_random_subnets=1, train_dataset=dataset.with_transform(preprocessor)
        )
        trainer.train()
        trainer.save_model()
    else:
        arguments = SupernetTrainingArguments(
            output_dir=args.output_dir, per_device_train_batch_size=1, num_random_subnets=1, logging_steps=1,
            warmup_steps=0.05, save_strategy="no", report_to="none", **common,
        )  # fmt: skip
        train_supernet(model, dataset, args=arguments, preprocessor=preprocessor)
    save_file(trainable_state(model), Path(args.output_dir) / f"rank{os.environ['RANK']}.safetensors")


@pytest.mark.parametrize("path", ["accelerate_loop", "trainer"])
def test_two_data_parallel_processes_keep_identical_replicas(tmp_path, path):
    from conftest import make_tiny_sam
    from mpsupernet import SamSupernetForMaskGeneration
    from mpsupernet.data import make_synthetic_segmentation_dataset

    torch.manual_seed(0)
    model = SamSupernetForMaskGeneration.from_sam(make_tiny_sam())
    model.save_pretrained(tmp_path / "model")
    make_synthetic_segmentation_dataset(8, image_size=64, seed=1).save_to_disk(str(tmp_path / "data"))
    output_dir = tmp_path / "trained"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
        "--model", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--output-dir", str(output_dir),
    ] + (["--trainer"] if path == "trainer" else [])  # fmt: skip
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    rank0 = load_file(output_dir / "rank0.safetensors")
    rank1 = load_file(output_dir / "rank1.safetensors")
    initial = trainable_state(model)
    assert rank0.keys() == rank1.keys() == initial.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the data-parallel replicas"
    # The ranks saw different examples: identical replicas mean the gradients were synchronised, not left alone.
    assert any(not torch.equal(rank0[name], initial[name]) for name in rank0 if "lora_B" in name)
    saved = trainable_state(SamSupernetForMaskGeneration.from_pretrained(output_dir))
    torch.testing.assert_close(saved, rank0, rtol=0, atol=0)


if __name__ == "__main__":
    worker()
