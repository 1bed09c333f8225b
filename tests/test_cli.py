"""The `mpsupernet` command: convert, extract, push, and its errors."""

import http.server
import inspect
import json
import re
import threading

import pytest
import huggingface_hub
import torch
from huggingface_hub import HfApi, ModelCard

from conftest import TEST_SAM
from local_hub import free_port
from mpsupernet import SamSubnetForMaskGeneration, SamSupernetForMaskGeneration
from mpsupernet.cli import main
from mpsupernet.demo import run_demo
from mpsupernet.modeling_sam_supernet import load_supernet
from mpsupernet.pretrained import load_sam
from mpsupernet.search import ParetoEntry, ParetoFront


@pytest.fixture(scope="module")
def calibrated_supernet_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("supernet")
    supernet = SamSupernetForMaskGeneration.from_sam(load_sam(TEST_SAM))
    supernet.calibrate_quantizers(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)))
    supernet.save_pretrained(folder)
    return folder


def test_convert_writes_a_loadable_supernet(tmp_path):
    assert main(["convert", "--sam", "embedded-sam", "--output-dir", str(tmp_path), "--lora-mode", "shared"]) == 0
    supernet = SamSupernetForMaskGeneration.from_pretrained(tmp_path)
    assert supernet.config.lora_mode == "shared" and supernet.config.importance_reordered


def test_extract_writes_subnet_and_card(calibrated_supernet_dir, tmp_path, capsys):
    output = tmp_path / "tier"
    assert main(["extract", "--supernet", str(calibrated_supernet_dir), "--budget", "10%", "--output-dir", str(output)]) == 0
    summary = json.loads(capsys.readouterr().out)
    subnet = SamSubnetForMaskGeneration.from_pretrained(output)
    assert summary["bitops"] == subnet.config.bitops <= 0.10 * summary["full_precision_bitops"]
    assert f"({subnet.config.bitops})" in (output / "README.md").read_text()


@pytest.mark.parametrize(
    "budget, message",
    [("abc", "abc"), ("0", "0"), ("-5", "-5"), ("0.05%", "the smallest reachable BitOPs is")],
)
def test_extract_rejects_bad_budgets_and_writes_nothing(calibrated_supernet_dir, tmp_path, capsys, budget, message):
    output = tmp_path / "tier"
    code = main(["extract", "--supernet", str(calibrated_supernet_dir), "--budget", budget, "--output-dir", str(output)])
    assert code == 2
    error = capsys.readouterr().err
    assert "mpsupernet extract: error:" in error and message in error
    assert not output.exists()


def test_extract_under_a_latency_budget(calibrated_supernet_dir, tmp_path, capsys):
    from test_latency import fake_latency_model

    supernet = SamSupernetForMaskGeneration.from_pretrained(calibrated_supernet_dir)
    model = fake_latency_model(supernet, constant=1.0, kept_blocks=10.0)  # injected: 1 ms + 10 ms per kept block
    model.save_pretrained(tmp_path / "lm")
    extract = ["extract", "--supernet", str(calibrated_supernet_dir), "--latency-model", str(tmp_path / "lm")]
    assert main([*extract, "--max-latency-ms", "52", "--output-dir", str(tmp_path / "tier")]) == 0
    subnet = SamSubnetForMaskGeneration.from_pretrained(tmp_path / "tier")
    assert model.predict(subnet.architecture) <= 52 and subnet.architecture.depth == 5
    assert main([*extract, "--max-latency-ms", "0", "--output-dir", str(tmp_path / "none")]) == 2
    assert "`max_latency_ms` must be a positive number of milliseconds, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_push_publishes_tiers_to_the_hub(calibrated_supernet_dir, tmp_path, local_hub):
    for name, budget in (("s", "5%"), ("m", "10%")):
        assert main(
            ["extract", "--supernet", str(calibrated_supernet_dir), "--budget", budget, "--output-dir", str(tmp_path / name)]
        ) == 0
    code = main(
        ["push", "--repo-id", "local-user/cli-tiers", "--tier", f"s={tmp_path / 's'}", "--tier", f"m={tmp_path / 'm'}",
         "--mean-iou", "s=0.5", "--dataset-name", "synthetic"]
    )
    assert code == 0
    files = set(HfApi().list_repo_files("local-user/cli-tiers"))
    assert {"tiers.json", "s/model.safetensors", "m/model.safetensors", "m/README.md"} <= files


@pytest.mark.parametrize(
    "argv, option, path",
    [
        (["extract", "--supernet", "outputs/x/y", "--budget", "5%", "--output-dir", "{tmp}/o"], "--supernet", "outputs/x/y"),
        (["extract", "--supernet", "no-such-org/supernet", "--budget", "5%", "--output-dir", "{tmp}/o"], "--supernet",
         "no-such-org/supernet"),
        (["extract", "--supernet", "embedded-sam", "--pareto-front", "{tmp}/front.json", "--budget", "5%", "--output-dir",
          "{tmp}/o"], "--pareto-front", "{tmp}/front.json"),
        (["search", "--supernet", "embedded-sam", "--dataset", "./no/such/data", "--output-dir", "{tmp}/o"], "--dataset",
         "./no/such/data"),
        (["convert", "--sam", "./no-such-sam", "--output-dir", "{tmp}/o"], "--sam", "./no-such-sam"),
        (["push", "--repo-id", "local-user/never", "--tier", "s={tmp}/no-tier"], "--tier", "{tmp}/no-tier"),
        (["export", "--subnet", "{tmp}/no-subnet", "--output-dir", "{tmp}/o"], "--subnet", "{tmp}/no-subnet"),
    ],
)
def test_mistyped_paths_give_one_line_naming_them_and_exit_2(argv, option, path, tmp_path, capsys, local_hub):
    argv = [item.replace("{tmp}", str(tmp_path)) for item in argv]
    path = path.replace("{tmp}", str(tmp_path))
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.count("error:") == 1  # (progress bars may precede it)
    assert error.strip().splitlines()[-1].startswith(f"mpsupernet {argv[0]}: error: {option} {path!r} is no folder")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["convert", "--sam"], ["train", "--supernet"]])
def test_a_mistyped_shipped_sam_name_is_told_the_shipped_names(argv, tmp_path, capsys, local_hub):
    assert main([*argv, "shape-sam", "--output-dir", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"mpsupernet {argv[0]}: error: {argv[1]} 'shape-sam' is no folder or file here")
    assert error.endswith(". The SAMs shipped in the package: embedded-sam, shapes-sam.")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "pair, message",
    [
        (["--tier", "s"], "argument --tier: 's' is not NAME=FOLDER"),
        (["--tier", "=folder"], "argument --tier: '=folder' is not NAME=FOLDER"),
        (["--tier", "s=x", "--mean-iou", "s=abc"], "argument --mean-iou: 's=abc': 'abc' is not a number"),
        (["--tier", "s=x", "--mean-iou", "s"], "argument --mean-iou: 's' is not NAME=NUMBER"),
    ],
)
def test_push_names_a_malformed_pair_and_exits_2(tmp_path, capsys, pair, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["push", "--repo-id", "local-user/never", *pair])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"mpsupernet push: error: {message}"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["export", "--subnet", "s", "--output-dir", "o", "--target", "tensorrt"], "argument --target: invalid choice: 'tensorrt' (choose from 'onnxruntime', 'openvino')"),
        (["push", "--repo-id", "u/r", "--tier", "s=x", "--weight-container", "int2"], "argument --weight-container: invalid choice: 'int2' (choose from 'int8', 'int4')"),
        (["search", "--supernet", "s", "--output-dir", "o", "--schema", "voc"], "argument --schema: invalid choice: 'voc' (choose from 'standard', 'coco', 'semantic')"),
    ],
)
def test_options_with_named_values_refuse_others_and_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"mpsupernet {argv[0]}: error: {message}"


def test_push_refuses_a_tier_named_twice(calibrated_supernet_dir, tmp_path, capsys):
    tier = tmp_path / "tier"
    assert main(["extract", "--supernet", str(calibrated_supernet_dir), "--budget", "5%", "--output-dir", str(tier)]) == 0
    capsys.readouterr()
    assert main(["push", "--repo-id", "local-user/never", "--tier", f"s={tier}", "--tier", f"s={tier}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "mpsupernet push: error: --tier names ['s'] more than once; give each name once."
    )


class _FailingHub(http.server.BaseHTTPRequestHandler):
    """A Hub that answers 500 to every request."""

    def _fail(self):
        self.send_response(500)
        self.send_header("Content-Length", "19")
        self.end_headers()
        self.wfile.write(b"internal hub error!")

    do_GET = do_HEAD = do_POST = do_PUT = _fail

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_answering_500():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FailingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("hub", ["answers 500", "unreachable"])
def test_push_to_a_failing_hub_exits_1_with_one_line(calibrated_supernet_dir, tmp_path, capsys, monkeypatch, hub_answering_500, hub):
    tier = tmp_path / "tier"
    assert main(["extract", "--supernet", str(calibrated_supernet_dir), "--budget", "5%", "--output-dir", str(tier)]) == 0
    endpoint = hub_answering_500 if hub == "answers 500" else f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    capsys.readouterr()
    argv = ["push", "--repo-id", "local-user/down", "--tier", f"s={tier}", "--no-onnx", "--dataset-name", "synthetic"]
    assert main(argv) == 1
    error = capsys.readouterr().err
    cause = r"HfHubHTTPError: Server error '500 Internal Server Error'" if hub == "answers 500" else r"ConnectError: "
    last = error.strip().splitlines()[-1]
    assert re.fullmatch(rf"mpsupernet push: error: could not push to the Hub repository 'local-user/down': {cause}.*", last)
    assert "Traceback" not in error and "mpsupernet push: error:" not in error.replace(last, "")


def test_extract_and_push_cards_state_the_recorded_base_model_and_data(calibrated_supernet_dir, tmp_path, local_hub):
    supernet = SamSupernetForMaskGeneration.from_pretrained(calibrated_supernet_dir)
    assert supernet.config.base_model_name_or_path == TEST_SAM
    arch = supernet.smallest_subnet()
    bitops = supernet.bitops_report(arch).total_bitops
    ParetoFront(
        [ParetoEntry(arch.to_dict(), bitops, 0.42)], metadata={"dataset": {"name": "org/val-shapes", "size": 4}}
    ).save(tmp_path / "front.json")
    output = tmp_path / "tier"
    argv = ["extract", "--supernet", str(calibrated_supernet_dir), "--pareto-front", str(tmp_path / "front.json")]
    assert main([*argv, "--budget", str(bitops), "--output-dir", str(output)]) == 0
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == TEST_SAM and card.data.datasets == ["org/val-shapes"]
    assert card.data.eval_results[0].dataset_name == "org/val-shapes" and card.data.eval_results[0].metric_value == 0.42
    push = ["push", "--repo-id", "local-user/cli-provenance", "--tier", f"xs={output}", "--mean-iou", "xs=0.4"]
    assert main(push) == 2  # a mean IoU, but no dataset recorded or given: refused rather than guessed
    assert main([*push, "--dataset-name", "org/val-shapes"]) == 0
    root = ModelCard.load("local-user/cli-provenance")
    assert root.data.base_model == TEST_SAM and "facebook/sam-vit-base" not in root.text


def test_convert_reads_the_shipped_sams_by_name(tmp_path):
    assert main(["convert", "--sam", "shapes-sam", "--output-dir", str(tmp_path)]) == 0
    supernet = SamSupernetForMaskGeneration.from_pretrained(tmp_path)
    assert supernet.config.base_model_name_or_path == "shapes-sam"
    assert supernet.config.vision_config.hidden_size == load_sam("shapes-sam").config.vision_config.hidden_size


def test_a_saved_supernet_named_like_a_shipped_sam_is_read_from_its_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("shapes-sam", "embedded-sam"):
        assert main(["convert", "--sam", "shapes-sam", "--lora-rank", "2", "--output-dir", name]) == 0
        assert load_supernet(name).config.lora_rank == 2, name
    # Without such a folder the name stands for the shipped SAM (a new supernet, the default rank).
    monkeypatch.chdir(tmp_path / "embedded-sam")
    assert load_supernet("shapes-sam").config.lora_rank == 8


def test_convert_reads_a_sam_folder_named_like_a_shipped_sam(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_sam("shapes-sam").save_pretrained("embedded-sam")
    assert main(["convert", "--sam", "embedded-sam", "--output-dir", "supernet"]) == 0
    supernet = SamSupernetForMaskGeneration.from_pretrained("supernet")
    assert supernet.config.vision_config.hidden_size == load_sam("shapes-sam").config.vision_config.hidden_size


def test_demo_help_states_run_demos_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    stated = dict(re.findall(r"--([a-z-]+) \S+ [^(]*\(default: ([^)]+)\)", help_text))
    defaults = inspect.signature(run_demo).parameters
    assert set(stated) == {"output-dir", "train-steps", "population-size", "generations", "seed"}
    for option, default in stated.items():
        assert default == str(defaults[option.replace("-", "_")].default), option
    from mpsupernet.demo_semantic import run_semantic_demo

    semantic = dict(re.findall(r"--([a-z-]+) \S+ [^(]*\(default: [^)]+\) \(semantic: ([^)]+)\)", help_text))
    semantic_defaults = inspect.signature(run_semantic_demo).parameters
    assert set(semantic) == {"output-dir", "train-steps", "population-size", "generations"}
    for option, default in semantic.items():
        assert default == str(semantic_defaults[option.replace("-", "_")].default), option


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--train-steps", "0", "`train_steps` must be a positive integer, got 0."),
        ("--train-steps", "-5", "`train_steps` must be a positive integer, got -5."),
        ("--population-size", "1", "`population_size` must be an integer of at least 2, got 1."),
        ("--generations", "-1", "`generations` must be a non-negative integer, got -1."),
        ("--seed", "-1", "`seed` must be a non-negative integer, got -1."),
    ],
)
def test_demo_refuses_bad_settings_before_any_work(tmp_path, capsys, option, value, message):
    output_dir = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(output_dir), option, value]) == 2
    assert capsys.readouterr().err.strip() == f"mpsupernet demo: error: {message}"
    assert not output_dir.exists()


def test_run_demo_refuses_empty_synthetic_splits(tmp_path):
    with pytest.raises(ValueError, match=r"^`num_validation` must be a positive integer, got 0\.$"):
        run_demo(output_dir=str(tmp_path / "demo"), num_validation=0)
    assert not (tmp_path / "demo").exists()


def test_the_embedded_supernet_of_a_seed_does_not_depend_on_the_global_generator():
    torch.manual_seed(123)
    first = load_supernet("embedded-sam", seed=3).state_dict()
    torch.manual_seed(456)
    second = load_supernet("embedded-sam", seed=3).state_dict()
    assert all(torch.equal(tensor, second[name]) for name, tensor in first.items())


def test_extract_writes_a_front_mean_iou_only_for_the_weights_it_was_searched_on(
    calibrated_supernet_dir, tmp_path, capsys
):
    from mpsupernet.checkpoints import state_dict_sha256

    supernet = SamSupernetForMaskGeneration.from_pretrained(calibrated_supernet_dir)
    arch = supernet.smallest_subnet()
    bitops = supernet.bitops_report(arch).total_bitops
    these_weights = state_dict_sha256(supernet)
    with torch.no_grad():  # the weights before some more training: one adapter elsewhere
        supernet.sam.vision_encoder.layers[0].mlp.lin1.lora_B.add_(1e-3)
    other_weights = state_dict_sha256(supernet)
    assert other_weights != these_weights
    for weights, expected in ((these_weights, 0.42), (other_weights, None)):
        metadata = {"dataset": {"name": "org/val-shapes", "size": 4}, "supernet_weights_sha256": weights}
        ParetoFront([ParetoEntry(arch.to_dict(), bitops, 0.42)], metadata=metadata).save(tmp_path / "front.json")
        output = tmp_path / f"tier-{expected}"
        argv = ["extract", "--supernet", str(calibrated_supernet_dir), "--pareto-front", str(tmp_path / "front.json")]
        assert main([*argv, "--budget", str(bitops), "--output-dir", str(output)]) == 0
        card = ModelCard.load(output / "README.md")
        if expected is None:
            assert not card.data.eval_results
            assert "was searched on other weights than" in capsys.readouterr().err
        else:
            assert card.data.eval_results[0].metric_value == expected
