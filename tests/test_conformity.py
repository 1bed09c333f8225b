"""What a transformers user expects of mpsupernet (issue 12): names, processors, cards, peft, dtypes, logging and the
command line. The README's and the cards' snippets are run in `test_documentation.py`; the Trainer's items are in
`test_training.py`, the root card's in `test_hub.py`, the CLI's paths in `test_cli.py`."""

import copy
import logging
import os
import re
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import SamProcessor, pipeline

import mpsupernet
from mpsupernet.bitops import format_budget, parse_budget
from mpsupernet.image_processing import SamQuantizedImageProcessorPil, non_maximum_suppression, rle_to_mask
from mpsupernet.hub import MISSING_PACKAGE_ERROR, load_subnet, render_subnet_card, save_tiers, select_tier
from mpsupernet.subnet_layers import QuantizedConv2d, QuantizedLinear

from conftest import make_tiny_sam


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300, **kwargs
    )


@pytest.fixture(scope="module")
def supernet():
    model = mpsupernet.SamSupernetForMaskGeneration.from_sam(make_tiny_sam()).eval()
    model.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    return model


@pytest.fixture(scope="module")
def tier_folders(supernet, tmp_path_factory):
    """A tiers folder: `low` at a reduced resolution, `full` a uniform full-size W8A8 subnet."""
    space = supernet.search_space
    tiers = {
        "low": mpsupernet.extract_subnet(supernet, space.smallest()),
        "full": mpsupernet.extract_subnet(supernet, space.largest(8, 8)),
    }
    folder = tmp_path_factory.mktemp("tiers") / "repo"
    save_tiers(
        tiers, folder, base_model="embedded-sam", dataset_name="synthetic", mean_ious={"low": 0.4, "full": 0.6},
        export_onnx=False,
    )
    return folder, tiers


# --- item 1: the documented names ----------------------------------------------------------------------------------
def test_documented_names_are_exported_and_import_mpsupernet_stays_light():
    for name in (
        "load_subnet", "push_tiers", "save_tiers", "SupernetTrainer", "SupernetTrainingArguments", "train_supernet",
        "run_search",
    ):
        assert name in mpsupernet.__all__ and callable(getattr(mpsupernet, name))
    assert mpsupernet.SupernetTrainer is mpsupernet.training.SupernetTrainer
    assert mpsupernet.SupernetTrainingArguments is mpsupernet.training.SupernetTrainingArguments
    process = run_python(
        """
        import sys
        import mpsupernet
        print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
        """
    )
    assert process.stdout.strip() == "[]", process.stderr


@pytest.mark.parametrize("order", ["mpsupernet first", "transformers first"])
def test_auto_classes_load_a_tier_after_a_bare_import_mpsupernet(tier_folders, order):
    folder, _ = tier_folders
    imports = ["import mpsupernet", "from transformers import AutoModel"]
    if order == "transformers first":
        imports.reverse()
    process = run_python(
        "\n".join(imports)
        + f"\nmodel = AutoModel.from_pretrained({str(folder / 'low')!r})\nprint(type(model).__name__, model.config.bitops)"
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["SamSubnetForMaskGeneration", str(tier_folders[1]["low"].config.bitops)]


# --- item 2: the card's budget selects its tier --------------------------------------------------------------------
DEMO_XS_BITOPS = 4_174_381_056
"""The demo's tier xs in the README's results (4.174 GBitOPs), which the old card snippet printed as "4G"."""


@pytest.mark.parametrize("bitops", [4_105_623_552, 4_106_000_000, DEMO_XS_BITOPS])
def test_card_budget_is_rounded_up_and_selects_its_tier(bitops):
    budget = format_budget(bitops)
    assert 0 <= parse_budget(budget) - bitops < 10**6
    assert Decimal(budget[:-1]) * 10**9 == parse_budget(budget)
    manifest = {
        "full_precision_bitops": 221_459_251_200,
        "tiers": {
            "xxs": {"bitops": 3_990_000_000, "mean_iou": 0.30},
            "xs": {"bitops": bitops, "mean_iou": 0.43},
            "s": {"bitops": 9_752_000_000, "mean_iou": 0.50},
        },
    }
    assert select_tier(manifest, budget) == "xs"
    # What the card printed before: rounded to whole GBitOPs, it never reaches this tier.
    assert select_tier(manifest, f"{bitops / 1e9:.0f}G") == "xxs"


def test_format_budget_of_the_demo_tier_and_bad_values():
    assert format_budget(DEMO_XS_BITOPS) == "4.175G" and format_budget(DEMO_XS_BITOPS, decimals=6) == "4.174382G"
    assert format_budget(4_000_000_000) == "4.000G"
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="`bitops` must be a positive integer"):
            format_budget(bad)
    with pytest.raises(ValueError, match="`decimals` must be an integer from 0 to 9, got 10"):
        format_budget(5, decimals=10)


def test_tier_card_budget_snippet_loads_that_tier(tier_folders):
    folder, tiers = tier_folders
    for name, subnet in tiers.items():
        text = (folder / name / "README.md").read_text()
        budget = re.search(r'max_bitops="([^"]+)"', text)[1]
        assert budget == format_budget(subnet.config.bitops)
        assert load_subnet(folder, max_bitops=budget).config.bitops == subnet.config.bitops


# --- item 3: the image processor travels with every model ------------------------------------------------------------
def test_every_save_writes_the_processor_at_the_models_size(supernet, tier_folders, tmp_path):
    supernet.save_pretrained(tmp_path / "supernet")
    folder, _ = tier_folders
    for path in (tmp_path / "supernet", folder / "low", folder / "full"):
        processor = SamProcessor.from_pretrained(path)
        image_processor = processor.image_processor
        assert image_processor.size["longest_edge"] == 128
        assert (image_processor.pad_size["height"], image_processor.pad_size["width"]) == (128, 128)
        assert image_processor.mask_size["longest_edge"] == 4 * (128 // 16) == 32
        image = Image.fromarray(np.full((96, 160, 3), 128, dtype=np.uint8))
        assert processor(image, return_tensors="pt")["pixel_values"].shape == (1, 3, 128, 128)


def _box_iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_mask_generation_pipeline_on_a_saved_tier_runs_without_torchvision(tier_folders):
    folder, _ = tier_folders
    generator = pipeline("mask-generation", model=str(folder / "low"))
    assert isinstance(generator.model, mpsupernet.SamSubnetForMaskGeneration)
    assert isinstance(generator.image_processor, SamQuantizedImageProcessorPil)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 160, 3), dtype=np.uint8))
    # The pipeline's own steps before the suppression: every candidate mask, run-length encoded, with its box.
    candidates, scores, boxes = [], [], []
    for batch in generator.preprocess(image, points_per_batch=8, points_per_crop=4):
        output = generator.forward(batch, pred_iou_thresh=0.0, stability_score_thresh=0.0)
        candidates.extend(output["masks"])
        scores.extend(output["iou_scores"].tolist())
        boxes.extend(output["boxes"].tolist())
    assert len(candidates) == 4 * 4 * 3  # a 4 x 4 point grid, three masks per point
    for mask in candidates:
        assert mask["size"] == [96, 160] and sum(mask["counts"]) == 96 * 160
    # The whole pipeline, its last step (non-maximum suppression across masks) included.
    result = generator(
        image, points_per_batch=8, points_per_crop=4, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        output_bboxes_mask=True, output_rle_mask=True,
    )
    kept = []
    for rle, score in zip(result["rle_mask"], result["scores"].tolist()):
        kept.append(next(i for i, c in enumerate(candidates) if c == rle and scores[i] == score and i not in kept))
    assert result["scores"].tolist() == [scores[i] for i in kept] == sorted(result["scores"].tolist(), reverse=True)
    for mask, rle in zip(result["masks"], result["rle_mask"]):
        assert mask.shape == (96, 160) and mask.sum() == sum(rle["counts"][1::2])
    # Greedy suppression, checked from its definition: no two kept boxes overlap above 0.7, and every dropped box
    # overlaps a kept box that scores at least as high above 0.7.
    assert all(_box_iou(boxes[a], boxes[b]) <= 0.7 for a in kept for b in kept if a != b)
    for dropped in set(range(len(candidates))) - set(kept):
        assert any(_box_iou(boxes[dropped], boxes[k]) > 0.7 and scores[k] >= scores[dropped] for k in kept)


# --- item 4: without mpsupernet --------------------------------------------------------------------------------------
def test_cards_say_first_how_to_run_the_tier_and_what_to_sam_model_allows(tier_folders):
    folder, tiers = tier_folders
    for card in (folder / "README.md", folder / "low" / "README.md", folder / "full" / "README.md"):
        body = card.read_text().split("---", 2)[2]
        first_section = body.split("\n## ", 1)[0]
        assert "`pip install mpsupernet`" in first_section and MISSING_PACKAGE_ERROR in first_section
        assert "**ONNX:**" not in body  # no vision_encoder.onnx in these folders
    low = (folder / "low" / "README.md").read_text()
    assert "This tier is not uniform: Resolution is not uniform" in low
    quantized_inputs = sum(
        1
        for module in tiers["full"].modules()
        if isinstance(module, (QuantizedLinear, QuantizedConv2d)) and module.activation_bits < 16
    )
    assert quantized_inputs >= 16  # at least 4 blocks x (qkv, proj, lin1, lin2) at 8 bits
    assert f"This tier qualifies; its {quantized_inputs} quantized activation layers then run in float." in (
        folder / "full" / "README.md"
    ).read_text()


def test_onnx_paragraph_appears_only_with_an_onnx_file(tier_folders, tmp_path):
    _, tiers = tier_folders
    card = render_subnet_card(
        tiers["low"], base_model="embedded-sam", dataset_name="synthetic", repo_id="me/tiers", subfolder="low",
        has_onnx=True,
    )
    assert 'OnnxSamModel.from_pretrained("me/tiers", subfolder="low")' in card.text
    assert "runs with onnxruntime\n  alone" in card.text


def test_without_mpsupernet_the_documented_error_is_the_one_raised(tier_folders):
    folder, _ = tier_folders
    process = run_python(
        f"""
        import re, sys
        sys.modules["mpsupernet"] = None  # `import mpsupernet` raises ImportError, as where it is not installed
        try:
            import mpsupernet
        except ImportError:
            pass
        else:
            raise SystemExit("mpsupernet imported")
        from transformers import AutoModel, SamModel

        card = open({str(folder / "low" / "README.md")!r}).read()
        documented = re.search(r"stops with ``(.+?)``", card, re.S)[1]
        try:
            AutoModel.from_pretrained({str(folder / "low")!r})
        except Exception as error:
            raised = f"{{type(error).__name__}}: {{error}}"
        print(raised.startswith(documented), "pip install mpsupernet" in card)
        _, info = SamModel.from_pretrained({str(folder / "full")!r}, output_loading_info=True)
        print("vision_encoder.layers.0.attn.qkv.weight" in info["missing_keys"])
        """
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["True", "True", "True"]


# --- item 7: peft ---------------------------------------------------------------------------------------------------
DECODER_ATTENTION = r".*mask_decoder\.transformer\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


def test_peft_wraps_a_supernet_and_trains_lora_on_its_decoder(supernet, prompt_inputs):
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(supernet)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=DECODER_ATTENTION))
    trainable = [name for name, parameter in wrapped.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_" in name and "mask_decoder" in name for name in trainable)
    model.set_subnet(model.smallest_subnet())
    wrapped(**prompt_inputs).pred_masks.square().mean().backward()
    lora_b = [parameter for name, parameter in wrapped.named_parameters() if "lora_B" in name and parameter.requires_grad]
    assert len(lora_b) == 4 and all(parameter.grad.abs().sum() > 0 for parameter in lora_b)


def test_peft_lora_on_a_subnet_decoder_merges_back_into_a_subnet(supernet, prompt_inputs):
    peft = pytest.importorskip("peft")
    subnet = supernet.extract_subnet("30%").eval()
    wrapped = peft.get_peft_model(subnet, peft.LoraConfig(r=4, target_modules=DECODER_ATTENTION))
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # lora_B starts at zero; a trained adapter changes the output
        adapted = wrapped(**prompt_inputs).pred_masks
        merged = wrapped.merge_and_unload()
        assert type(merged) is mpsupernet.SamSubnetForMaskGeneration
        torch.testing.assert_close(merged(**prompt_inputs).pred_masks, adapted, atol=1e-4, rtol=0)


def test_peft_refuses_a_subnets_quantized_encoder_linears_by_name(supernet):
    peft = pytest.importorskip("peft")
    subnet = supernet.extract_subnet("30%")
    config = peft.LoraConfig(r=4, target_modules=r".*vision_encoder\.layers\.\d+\.attn\.qkv")
    with pytest.raises(ValueError, match=r"(?s)Target module QuantizedLinear\(.*\) is not supported"):
        peft.get_peft_model(subnet, config)


def test_input_embeddings_hook_makes_inputs_require_grad(supernet, prompt_inputs):
    subnet = supernet.extract_subnet("30%")
    assert subnet.get_input_embeddings() is subnet.sam.vision_encoder.patch_embed.projection
    subnet.requires_grad_(False)
    subnet.enable_input_require_grads()
    assert subnet(**prompt_inputs).pred_masks.requires_grad


# --- item 8: half-precision inference of a reduced-resolution tier on the CPU ----------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_resolution_tier_runs_in_half_precision(supernet, tier_folders, prompt_inputs, tmp_path, dtype):
    folder, tiers = tier_folders
    assert tiers["low"].architecture.resolution < 128
    # A float subnet at the lowest resolution: only the resize and the float arithmetic differ from float32.
    arch = supernet.full_precision_subnet().to_dict()
    arch["resolution"] = min(supernet.config.resolution_choices)
    mpsupernet.extract_subnet(supernet, arch).save_pretrained(tmp_path / "float-low")
    half_inputs = {key: value.to(dtype) if value.is_floating_point() else value for key, value in prompt_inputs.items()}
    for path in (folder / "low", tmp_path / "float-low"):
        model = mpsupernet.SamSubnetForMaskGeneration.from_pretrained(path, dtype=dtype)
        assert model.dtype == dtype
        with torch.no_grad():
            output = model(**half_inputs).pred_masks
            expected = mpsupernet.SamSubnetForMaskGeneration.from_pretrained(path)(**prompt_inputs).pred_masks
        assert output.dtype == dtype and output.shape == expected.shape and torch.isfinite(output).all()
    correlation = torch.corrcoef(torch.stack([output.float().flatten(), expected.flatten()]))[0, 1]
    assert correlation > 0.97, correlation


# --- item 9: logging under transformers' verbosity -------------------------------------------------------------------
def test_transformers_verbosity_shows_mpsupernet_info_lines(tier_folders, caplog):
    folder, _ = tier_folders
    with caplog.at_level(logging.INFO):
        load_subnet(folder, max_bitops="100%")
    assert not [record for record in caplog.records if record.name.startswith("mpsupernet")]
    transformers.logging.set_verbosity_info()
    try:
        with caplog.at_level(logging.INFO):
            load_subnet(folder, max_bitops="100%")
    finally:
        transformers.logging.set_verbosity_warning()
    messages = [record.getMessage() for record in caplog.records if record.name == "mpsupernet.hub.load"]
    assert messages == [f"Loading tier 'full' ({tier_folders[1]['full'].config.bitops / 1e9:.3f} GBitOPs) from {str(folder)!r}"]


# --- item 10: the command line -----------------------------------------------------------------------------------------
def test_help_and_version_answer_without_torch_or_transformers():
    process = run_python(
        """
        import runpy, sys
        for argv in (["--help"], ["extract", "--help"], ["export", "--help"], ["--version"]):
            sys.argv = ["mpsupernet", *argv]
            try:
                runpy.run_module("mpsupernet", run_name="__main__")
            except SystemExit as exit:
                assert exit.code == 0, exit.code
        print("heavy:", sorted(name for name in ("torch", "transformers") if name in sys.modules))
        """
    )
    assert process.returncode == 0, process.stderr
    assert "usage: mpsupernet" in process.stdout and "--pareto-front" in process.stdout
    assert "--target {onnxruntime,openvino}" in process.stdout and "--weight-container {int8,int4}" in process.stdout
    assert f"mpsupernet {mpsupernet.__version__}" in process.stdout
    assert process.stdout.strip().endswith("heavy: []")
    script = Path(sys.executable).with_name("mpsupernet")
    assert subprocess.run([script, "--version"], capture_output=True, text=True).stdout.strip() == (
        f"mpsupernet {mpsupernet.__version__}"
    )


def test_importing_transformers_after_mpsupernet_works_without_torch():
    process = run_python(
        """
        import sys
        sys.modules["torch"] = None  # as where torch is not installed (an ONNX-only deployment)
        import importlib.util
        importlib.util.find_spec = lambda name, *args, _find=importlib.util.find_spec: (
            None if name == "torch" else _find(name, *args)
        )
        import mpsupernet
        import transformers
        print("transformers", transformers.__version__ is not None)
        """
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["transformers", "True"]


def test_non_maximum_suppression_keeps_what_a_hand_computation_keeps():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # 0: area 100
            [1.0, 0.0, 11.0, 10.0],  # 1: IoU with 0 is 90 / 110 = 0.818
            [0.0, 0.0, 10.0, 8.0],  # 2: IoU with 0 is 80 / 100 = 0.8, with 1 is 72 / 108 = 0.667
            [20.0, 20.0, 30.0, 30.0],  # 3: overlaps nothing
            [20.0, 20.0, 30.0, 30.0],  # 4: the same box as 3, the same score: the first one given is kept
            [3.0, 0.0, 13.0, 10.0],  # 5: IoU with 0 is 70 / 130 = 0.538, with 1 is 80 / 120 = 0.667
        ]
    )
    scores = torch.tensor([0.7, 0.9, 0.8, 0.5, 0.5, 0.6])
    # By score: 1 (kept; removes 0 at 0.818), 2 (0.667 with 1: kept), 0 (removed), 5 (0.667 with 1, 56 / 124 =
    # 0.452 with 2: kept), 3 (kept; removes 4 at IoU 1), 4 (removed).
    kept = non_maximum_suppression(boxes, scores, iou_threshold=0.7)
    assert kept.tolist() == [1, 2, 5, 3]
    assert non_maximum_suppression(boxes, scores, iou_threshold=0.5).tolist() == [1, 3]
    assert non_maximum_suppression(boxes, scores, iou_threshold=0.9).tolist() == [1, 2, 0, 5, 3]
    assert non_maximum_suppression(boxes[:0], scores[:0], 0.7).tolist() == []
    try:
        from torchvision.ops import batched_nms
    except Exception:  # torchvision does not import next to the project's torch (`torchvision::nms does not exist`)
        return
    for threshold in (0.5, 0.7, 0.9):
        expected = batched_nms(boxes, scores, torch.zeros(len(boxes)), threshold)
        assert non_maximum_suppression(boxes, scores, threshold).tolist() == expected.tolist()


def test_rle_to_mask_reads_the_encoding_the_pipeline_writes():
    from transformers.models.sam.image_processing_pil_sam import _mask_to_rle

    masks = torch.from_numpy(np.random.default_rng(3).random((2, 7, 5)) > 0.5)
    for mask, rle in zip(masks, _mask_to_rle(masks)):
        np.testing.assert_array_equal(rle_to_mask(rle), mask.numpy())
