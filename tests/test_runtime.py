"""The PyTorch-free runtime: pre/post-processing against transformers, a process without torch, OpenVINO, the Hub."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image
from transformers import SamProcessor

pytest.importorskip("onnxruntime")

from mpsupernet.image_processing import PillowSamImageProcessor  # noqa: E402
from mpsupernet.metrics import mask_iou  # noqa: E402
from mpsupernet.runtime import OnnxSamModel, resize_bilinear  # noqa: E402


def photo(height=90, width=150, seed=0) -> Image.Image:
    """A smooth RGB image of an odd size (so that resizing and padding both matter)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def test_preprocess_matches_the_sam_image_processor(exported_w8a8):
    _, folder, _ = exported_w8a8
    model = OnnxSamModel.from_pretrained(folder)
    processor = SamProcessor(image_processor=PillowSamImageProcessor.from_pretrained(folder))
    images = [photo(), photo(150, 70, seed=1)]
    ours = model.preprocess(images, input_boxes=[[[10, 20, 120, 80]], [[5, 5, 60, 140]]])
    theirs = processor(images, input_boxes=[[[10, 20, 120, 80]], [[5, 5, 60, 140]]], return_tensors="np")
    np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"], atol=1e-5)
    np.testing.assert_array_equal(ours["original_sizes"], theirs["original_sizes"])
    np.testing.assert_array_equal(ours["reshaped_input_sizes"], theirs["reshaped_input_sizes"])
    np.testing.assert_allclose(ours["input_boxes"], theirs["input_boxes"], atol=1e-4)


def _transparent_images():
    rng = np.random.default_rng(4)
    rgba = np.asarray(photo().convert("RGBA")).copy()
    rgba[..., 3] = rng.integers(0, 256, rgba.shape[:2], dtype=np.uint8)
    rgba[:10, :10, 3] = 0  # fully transparent: white, whatever the colour underneath
    palette = Image.fromarray(rgba[..., :3]).quantize(16)
    palette.info["transparency"] = 3
    return {
        "PIL RGBA": Image.fromarray(rgba),
        "numpy RGBA": rgba,
        "PIL LA": Image.fromarray(rgba).convert("LA"),
        "PIL P with transparency": palette,
    }


@pytest.mark.parametrize("kind", ["PIL RGBA", "numpy RGBA", "PIL LA", "PIL P with transparency"])
def test_preprocess_blends_transparency_onto_white_as_the_sam_image_processor(exported_w8a8, kind):
    _, folder, _ = exported_w8a8
    model = OnnxSamModel.from_pretrained(folder)
    processor = SamProcessor(image_processor=PillowSamImageProcessor.from_pretrained(folder))
    image = _transparent_images()[kind]
    ours = model.preprocess(image)["pixel_values"]
    np.testing.assert_allclose(ours, processor(image, return_tensors="np")["pixel_values"], atol=1e-5)
    if kind != "PIL P with transparency":
        mean, std = np.asarray(processor.image_processor.image_mean), np.asarray(processor.image_processor.image_std)
        # the transparent corner (10 of 150 pixels, resized to 128 wide: its first 7 pixels) is white
        np.testing.assert_allclose(ours[0, :, 2, 2], (1.0 - mean) / std, atol=1e-5)


def test_runtime_refuses_non_finite_pixel_values(exported_w8a8):
    model = OnnxSamModel.from_pretrained(exported_w8a8[1])
    pixel_values = model.preprocess(photo())["pixel_values"]
    pixel_values[0, 1, 4, 9] = np.nan
    pixel_values[0, 2, 5, 5] = np.inf
    message = r"^pixel_values hold 2 non-finite values \(NaN or inf\); the quantized encoder would clip them"
    with pytest.raises(ValueError, match=message):
        model(pixel_values=pixel_values, input_boxes=[[[10.0, 10.0, 80.0, 60.0]]])
    with pytest.raises(ValueError, match=message):
        model.get_image_embeddings(pixel_values)


@pytest.mark.parametrize(
    "boxes, problem",
    [
        ([10, 20, 120, 80], "got 4 entries for 2 images"),
        ([[[10, 20, 120, 80]]], "got 1 entry for 2 images"),
        ([[10, 20, 120, 80], [5, 5, 60, 140]], r"an image's entry is of shape \(4,\)"),
        ([[[10, 20, 120]], [[5, 5, 60]]], r"an image's entry is of shape \(1, 3\)"),
        ([[["a", 20, 120, 80]], [[5, 5, 60, 140]]], "an image's entry is not numbers of equal lengths"),
        ("10,20,120,80", "got str '10,20,120,80'"),
    ],
)
def test_preprocess_names_prompts_in_another_layout(exported_w8a8, boxes, problem):
    model = OnnxSamModel.from_pretrained(exported_w8a8[1])
    layout = r"`input_boxes` must hold one entry per image, laid out \[\[\[x1, y1, x2, y2\], \.\.\.\], \.\.\.\] \(as for SamProcessor\)"
    with pytest.raises(ValueError, match=rf"^{layout}, in image pixels; {problem}\.$"):
        model.preprocess([photo(), photo(seed=1)], input_boxes=boxes)
    with pytest.raises(ValueError, match=r"^`input_points` must hold one entry per image, laid out \[\[\[\[x, y\].*an image's entry is of shape \(1, 2\)"):
        model.preprocess(photo(), input_points=[[[40, 30]]])
    inputs = model.preprocess(photo(), input_points=[[[[40, 30], [60, 50]]]])
    assert inputs["input_points"].shape == (1, 1, 2, 2)
    np.testing.assert_allclose(inputs["input_points"][0, 0, 1], [60 * 128 / 150, 50 * 77 / 90], rtol=1e-6)  # 90 x 150 -> 77 x 128


def test_preprocess_names_an_image_it_cannot_read(exported_w8a8, tmp_path):
    model = OnnxSamModel.from_pretrained(exported_w8a8[1])
    allowed = r"^Each image must be a PIL\.Image\.Image or a uint8 numpy array of shape \(height, width\) or \(height, width, 3 or 4\); got "
    path = tmp_path / "image.png"
    photo().save(path)
    for given in (str(path), path):
        with pytest.raises(TypeError, match=rf"{allowed}the path '{re.escape(str(path))}' \(open it with PIL\.Image\.open\)\.$"):
            model.preprocess(given)
    with pytest.raises(TypeError, match=rf"{allowed}a numpy\.ndarray of shape \(90, 150, 3\) and dtype float32\.$"):
        model.preprocess([photo(), np.asarray(photo(), np.float32)])
    with pytest.raises(TypeError, match=rf"{allowed}a builtins\.NoneType\.$"):
        model.preprocess(None)
    with Image.open(path) as image:  # the model cards' way
        opened = model.preprocess(image)["pixel_values"]
    np.testing.assert_array_equal(opened, model.preprocess(np.asarray(photo()))["pixel_values"])


def test_post_process_and_resize_match_transformers(exported_w8a8):
    _, folder, _ = exported_w8a8
    model = OnnxSamModel.from_pretrained(folder)
    processor = PillowSamImageProcessor.from_pretrained(folder)
    logits = np.random.default_rng(0).standard_normal((2, 1, 3, 32, 32)).astype(np.float32)
    original, reshaped = [[90, 150], [150, 70]], [[77, 128], [128, 60]]
    ours = model.post_process_masks(logits, original, reshaped, binarize=False)
    theirs = processor.post_process_masks(torch.from_numpy(logits), original, reshaped, binarize=False)
    for mine, reference in zip(ours, theirs):
        np.testing.assert_allclose(mine, reference.numpy(), atol=1e-5)
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(logits[0]), size=(45, 77), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize_bilinear(logits[0], (45, 77)), upsampled.numpy(), atol=1e-5)


NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # `import torch` raises ImportError from here on
    import numpy as np
    from PIL import Image
    from mpsupernet.runtime import OnnxSamModel

    folder, image_path, output = sys.argv[1:]
    model = OnnxSamModel.from_pretrained(folder)
    inputs = model.preprocess(Image.open(image_path), input_boxes=[[[20, 10, 120, 70]]])
    outputs = model(**inputs)
    masks = model.post_process_masks(outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])
    assert "torch" not in [name for name, module in sys.modules.items() if module is not None and name == "torch"]
    np.savez(output, masks=masks[0], pixel_values=inputs["pixel_values"], boxes=inputs["input_boxes"])
    """
)


def test_a_process_without_torch_gets_masks_at_the_image_size(exported_w8a8, tmp_path):
    subnet, folder, _ = exported_w8a8
    image = photo()
    image.save(tmp_path / "photo.png")
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH_SCRIPT, str(folder), str(tmp_path / "photo.png"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    saved = np.load(tmp_path / "out.npz")
    assert saved["masks"].shape == (1, 3, 90, 150) and saved["masks"].dtype == bool
    # the same masks from the PyTorch subnet with transformers' processor
    processor = SamProcessor(image_processor=PillowSamImageProcessor.from_pretrained(folder))
    inputs = processor(image, input_boxes=[[[20, 10, 120, 70]]], return_tensors="pt")
    with torch.no_grad():
        pred_masks = subnet(pixel_values=inputs["pixel_values"], input_boxes=inputs["input_boxes"]).pred_masks
    reference = processor.post_process_masks(pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    assert 0.02 < saved["masks"].mean() < 0.98
    assert mask_iou(torch.from_numpy(saved["masks"]).float(), reference).mean() >= 0.99


def test_the_runtime_module_imports_no_torch():
    code = "import sys; sys.modules['torch'] = None; import mpsupernet, mpsupernet.runtime; print(sorted(m for m in sys.modules if m.startswith(('transformers', 'torch')) and sys.modules[m] is not None))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_openvino_runs_the_same_files_exactly(exported_w8a8):
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra (`pip install mpsupernet[openvino]`)")
    _, folder, _ = exported_w8a8
    pixel_values = np.random.default_rng(0).standard_normal((1, 3, 128, 128)).astype(np.float32)
    boxes = np.array([[[20, 30, 100, 110]]], dtype=np.float32)
    onnxruntime_outputs = OnnxSamModel.from_pretrained(folder)(pixel_values=pixel_values, input_boxes=boxes)
    openvino_outputs = OnnxSamModel.from_pretrained(folder, runtime="openvino")(pixel_values=pixel_values, input_boxes=boxes)
    embeddings = onnxruntime_outputs.image_embeddings
    assert np.abs(openvino_outputs.image_embeddings - embeddings).mean() <= 0.01 * np.abs(embeddings).mean()
    reference = torch.from_numpy(onnxruntime_outputs.pred_masks) > 0
    assert mask_iou(torch.from_numpy(openvino_outputs.pred_masks), reference).mean() >= 0.99


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_reduced_resolution_tier_runs_the_antialiased_resize_on_every_runtime(embedded_supernet, tmp_path, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is an optional extra (`pip install mpsupernet[openvino]`)")
    from mpsupernet.export.graphs import antialiased_resize_matrix
    from mpsupernet.extraction import extract_subnet

    x = torch.randn(2, 3, 128, 96, generator=torch.Generator().manual_seed(2))
    resized = antialiased_resize_matrix(128, 64) @ x @ antialiased_resize_matrix(96, 48).T
    expected = torch.nn.functional.interpolate(x, size=(64, 48), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(resized, expected, rtol=0, atol=1e-6)
    # A float tier at half the resolution: only the runtime's arithmetic differs from PyTorch's (OpenVINO ignored
    # ONNX's antialias attribute, and was off by about 2).
    arch = embedded_supernet.full_precision_subnet().to_dict()
    arch["resolution"] = 64
    subnet = extract_subnet(embedded_supernet, arch).eval()
    subnet.export_onnx(tmp_path / "low")
    pixel_values = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = subnet.get_image_embeddings(pixel_values).numpy()
    embeddings = OnnxSamModel.from_pretrained(tmp_path / "low", runtime=runtime).get_image_embeddings(pixel_values.numpy())
    assert np.abs(expected).mean() > 0.1
    np.testing.assert_allclose(embeddings, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_num_threads_sets_each_runtimes_thread_count(exported_w8a8, runtime):
    if runtime == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is an optional extra (`pip install mpsupernet[openvino]`)")
    _, folder, _ = exported_w8a8
    model = OnnxSamModel.from_pretrained(folder, runtime=runtime, num_threads=2)
    for graph in (model.vision_encoder, model.prompt_decoder):
        if runtime == "openvino":
            import openvino

            assert graph.model.get_property("INFERENCE_NUM_THREADS") == 2
            assert graph.model.get_property("INFERENCE_PRECISION_HINT") == openvino.Type.f32  # the export's, kept
        else:
            assert graph.session.get_session_options().intra_op_num_threads == 2
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"`num_threads` must be a positive integer .*; got {bad!r}\."):
            OnnxSamModel.from_pretrained(folder, runtime=runtime, num_threads=bad)


def test_loads_an_export_from_a_hub_subfolder(exported_w8a8, local_hub):
    _, folder, _ = exported_w8a8
    api = HfApi()
    repo = api.create_repo("user/onnx-tiers", exist_ok=True).repo_id
    api.upload_folder(repo_id=repo, folder_path=str(folder), path_in_repo="tier-a")
    model = OnnxSamModel.from_pretrained(repo, subfolder="tier-a")
    local = OnnxSamModel.from_pretrained(folder)
    pixel_values = np.random.default_rng(1).standard_normal((1, 3, 128, 128)).astype(np.float32)
    np.testing.assert_array_equal(model.get_image_embeddings(pixel_values), local.get_image_embeddings(pixel_values))
    assert model.config["export"] == json.loads((folder / "config.json").read_text())["export"]


def test_from_pretrained_names_what_is_neither_a_folder_nor_a_hub_repository(local_hub, tmp_path):
    expected = r"; give the folder written by `export_onnx` or a Hub repository holding one\.$"
    with pytest.raises(FileNotFoundError, match=rf"^'no/such/folder' is no folder here, nor a Hub repository id \('namespace/name'\){expected}"):
        OnnxSamModel.from_pretrained("no/such/folder")
    with pytest.raises(FileNotFoundError, match=rf"^'missing' is no folder here, nor a Hub repository that exists or that your token can read \(.*\){expected}"):
        OnnxSamModel.from_pretrained("missing")
    with pytest.raises(FileNotFoundError, match=rf"^'user/missing' is no folder here, and the local cache does not hold it .*`local_files_only`\) \(.*\){expected}"):
        OnnxSamModel.from_pretrained("user/missing", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"^'{re.escape(str(tmp_path / 'gone'))}' is no folder here{expected}"):
        OnnxSamModel.from_pretrained(tmp_path / "gone")


def test_runtime_refuses_bad_input(exported_w8a8, tmp_path):
    _, folder, _ = exported_w8a8
    with pytest.raises(ValueError, match=r"Unknown runtime 'tensorflow'; allowed: \['onnxruntime', 'openvino'\]"):
        OnnxSamModel.from_pretrained(folder, runtime="tensorflow")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no ONNX export"):
        OnnxSamModel.from_pretrained(tmp_path)
    model = OnnxSamModel.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(batch, 3, 128, 128\); got \(1, 3, 64, 64\)"):
        model.get_image_embeddings(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="multimask_output=False is not available"):
        model(pixel_values=np.zeros((1, 3, 128, 128), np.float32), input_boxes=np.zeros((1, 1, 4)), multimask_output=False)


class SteppingClock:
    """A clock whose consecutive start/stop readings are `durations` seconds apart (then it repeats the last)."""

    def __init__(self, durations):
        self.durations, self.now, self.readings = list(durations), 100.0, 0

    def __call__(self) -> float:
        if self.readings % 2:
            self.now += self.durations[min(self.readings // 2, len(self.durations) - 1)]
        else:
            self.now += 1.0  # time outside the timed calls must not count
        self.readings += 1
        return self.now


def test_measure_latency_times_the_encoder_with_the_given_clock(exported_w8a8):
    import datetime

    import onnxruntime as ort

    from mpsupernet.runtime import cpu_model, measure_latency

    _, folder, _ = exported_w8a8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = OnnxSamModel.from_pretrained(folder, session_options=options)
    calls = []
    encoder = model.vision_encoder
    model.vision_encoder = lambda feeds: calls.append(feeds["pixel_values"].shape) or encoder(feeds)
    model.vision_encoder.session = encoder.session
    measurement = measure_latency(model, runs=3, warmup=2, clock=SteppingClock([0.010, 0.030, 0.020]))
    assert calls == [(1, 3, 128, 128)] * 5  # 2 warm-up + 3 timed calls, batch 1
    assert measurement.runs_ms == pytest.approx([10.0, 30.0, 20.0])
    assert measurement.ms_per_image == pytest.approx(20.0)  # the median
    assert (measurement.batch_size, measurement.warmup_runs, measurement.threads) == (1, 2, 1)
    assert measurement.cpu == cpu_model() and measurement.cpu
    assert (measurement.runtime, measurement.runtime_version) == ("onnxruntime", ort.__version__)
    assert measurement.provider == "CPUExecutionProvider"
    measured_at = datetime.datetime.fromisoformat(measurement.date)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - measured_at).total_seconds()) < 3600
    assert "20.0 ms per image (batch 1, median of 3 runs)" in str(measurement)


def test_measure_latency_refuses_bad_settings(exported_w8a8):
    from mpsupernet.runtime import measure_latency

    _, folder, _ = exported_w8a8
    model = OnnxSamModel.from_pretrained(folder)
    with pytest.raises(ValueError, match=r"`runs` must be an integer of at least 1; got 0"):
        measure_latency(model, runs=0)
    with pytest.raises(ValueError, match=r"`warmup` must be an integer of at least 0; got -1"):
        measure_latency(model, warmup=-1)
    with pytest.raises(ValueError, match=r"measures onnxruntime models; got runtime 'openvino'"):
        measure_latency(type("Model", (), {"runtime": "openvino"})())
