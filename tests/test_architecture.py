"""The shared vocabulary, the config and model bases, and the one-name-per-idea helpers of the supernet."""

import ast
import importlib.util
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import PretrainedConfig

import mpsupernet
import mpsupernet.architecture as architecture
import mpsupernet.configuration_sam_supernet as configuration
import mpsupernet.metrics
from mpsupernet import SamSubnetConfig, SamSupernetConfig, SubnetArchitecture, extract_subnet
from mpsupernet.architecture import FLOAT_BITS, is_float_bits, parameter_kind
from mpsupernet.data import DATASET_SCHEMAS, make_synthetic_segmentation_dataset, to_standard_schema
from mpsupernet.quantization import LsqQuantizer
from mpsupernet.testing_utils import make_sam_config

from conftest import run


def _base_kwargs():
    return {k: v for k, v in make_sam_config().to_dict().items() if k != "model_type"}


def test_architecture_module_stands_alone():
    # Loaded from its file outside the package: any import of ours (relative or absolute) would fail or show up.
    spec = importlib.util.spec_from_file_location("standalone_architecture", architecture.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.SubnetArchitecture is not SubnetArchitecture
    source = Path(architecture.__file__).read_text()
    assert "from ." not in source and "import mpsupernet" not in source
    assert mpsupernet.SubnetArchitecture is SubnetArchitecture
    from mpsupernet import search_space

    assert "SubnetArchitecture" not in search_space.__all__  # one home: mpsupernet.architecture


def test_is_float_bits_is_the_quantizers_rule():
    quantizer = LsqQuantizer([2, 4, 8])
    for bits in (2, 4, 8, 16, FLOAT_BITS):
        quantizer.set_bits(bits)
        assert quantizer.is_quantizing is not is_float_bits(bits)
    assert [bits for bits in (2, 3, 4, 5, 6, 7, 8, 16, 32) if is_float_bits(bits)] == [16, 32]
    x = torch.linspace(-1, 1, 11)
    assert torch.equal(quantizer.fake_quantize(x, 16, quantizer.step_size), x)


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """Top-level packages imported absolutely by a module, and the modules it imports relatively."""
    nodes = list(ast.walk(ast.parse(path.read_text())))
    imported = {alias.name.split(".")[0] for node in nodes if isinstance(node, ast.Import) for alias in node.names}
    from_imports = [node for node in nodes if isinstance(node, ast.ImportFrom)]
    imported |= {node.module.split(".")[0] for node in from_imports if node.level == 0}
    return imported, [node.module for node in from_imports if node.level > 0]


def test_metrics_package_loads_neither_datasets_nor_pil_eagerly():
    # Read, not imported: a fresh interpreter would take most of a minute on a loaded machine.
    package = Path(mpsupernet.metrics.__file__).parent
    assert _imports(package / "__init__.py") == (set(), ["_lazy", "mask", "semantic"])
    assert _imports(package / "mask.py") == ({"torch", "torchmetrics", "transformers"}, [])
    assert _imports(package / "semantic.py") == ({"collections", "numpy"}, [])


def test_supernet_config_checks_run_once_per_construction():
    with mock.patch.object(
        configuration, "validate_progressive_schedule", wraps=configuration.validate_progressive_schedule
    ) as schedule_check:
        SamSupernetConfig(**_base_kwargs())
    assert schedule_check.call_count == 1
    with pytest.raises(ValueError, match=r"`float_bits` is 24; allowed: \[16, 32\]"):
        SamSupernetConfig(**_base_kwargs(), float_bits=24)


def test_subnet_config_checks_run_once_and_keep_transformers_hook():
    with mock.patch.object(
        architecture.SubnetArchitecture, "from_dict", wraps=architecture.SubnetArchitecture.from_dict
    ) as read:
        SamSubnetConfig(**_base_kwargs())
    assert read.call_count == 1
    # transformers' own `@strict` hook is no longer replaced by the architecture check.
    assert SamSubnetConfig.validate_architecture is PretrainedConfig.validate_architecture
    with pytest.raises(ValueError, match=r"`step_size_min` must be positive, got 0.0"):
        SamSubnetConfig(**_base_kwargs(), step_size_min=0.0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lora_rank", 2.5, r"^`lora_rank` is 2\.5, of type float; allowed: an integer of at least 1\.$"),
        (
            "weight_bit_choices",
            [8.0],
            r"^`weight_bit_choices` is \[8\.0\], of type list; allowed: a list of distinct integers from \[2, 3, 4, 5, 6, 7, 8\]\.$",
        ),
        ("lora_mode", 3, r"^`lora_mode` is 3, of type int; allowed: one of \['shared', 'multiplex', 'multipath'\]\.$"),
        ("float_bits", 16.0, r"^`float_bits` is 16\.0, of type float; allowed: one of \[16, 32\]\.$"),
        ("lora_alpha", "16", r"^`lora_alpha` is '16', of type str; allowed: a number\.$"),
        ("importance_reordered", "yes", r"^`importance_reordered` is 'yes', of type str; allowed: True or False\.$"),
        ("step_size_min", 0, r"^`step_size_min` must be positive, got 0\.0\.$"),
    ],
)
def test_a_value_of_the_wrong_type_names_the_field_and_what_is_allowed(field, value, message):
    with pytest.raises(ValueError, match=message):
        SamSupernetConfig(**_base_kwargs(), **{field: value})
    if field != "step_size_min":  # a value range is checked at construction and before saving, a type on assignment too
        config = SamSupernetConfig(**_base_kwargs())
        with pytest.raises(ValueError, match=message):
            setattr(config, field, value)


def test_an_integer_for_a_float_field_is_taken_as_that_float():
    config = SamSupernetConfig(**_base_kwargs(), lora_alpha=16, step_size_min=1)
    assert config.lora_alpha == 16.0 and isinstance(config.lora_alpha, float)
    assert config.step_size_min == 1.0 and isinstance(config.step_size_min, float)
    with pytest.raises(ValueError, match=r"^`bitops` is 1\.5, of type float; allowed: an integer or None\.$"):
        SamSubnetConfig(**_base_kwargs(), bitops=1.5)


def test_edited_config_is_checked_again_on_save(tmp_path):
    config = SamSupernetConfig(**_base_kwargs())
    config.lora_rank = 0
    with pytest.raises(ValueError, match=r"`lora_rank` must be at least 1, got 0"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_using_subnet_restores_the_previous_subnet_even_on_error(tiny_supernet, prompt_inputs):
    before = tiny_supernet.largest_subnet()
    tiny_supernet.set_subnet(before)
    expected = run(tiny_supernet, prompt_inputs)
    smallest = tiny_supernet.smallest_subnet()
    with pytest.raises(RuntimeError, match="inside"):
        with tiny_supernet.using_subnet(smallest.to_dict()) as active:
            assert active == smallest and tiny_supernet.active_subnet == smallest
            raise RuntimeError("inside")
    assert tiny_supernet.active_subnet == before
    torch.testing.assert_close(run(tiny_supernet, prompt_inputs).pred_masks, expected.pred_masks, atol=0, rtol=0)


def test_bitops_report_is_one_name_on_both_models(tiny_supernet, prompt_inputs):
    tiny_supernet.calibrate_quantizers(prompt_inputs["pixel_values"])
    arch = tiny_supernet.smallest_subnet()
    report = tiny_supernet.bitops_report(arch)
    assert not hasattr(tiny_supernet, "bitops")  # one name on both models
    with tiny_supernet.using_subnet(arch):
        assert tiny_supernet.bitops_report().to_dict() == report.to_dict()
    subnet = extract_subnet(tiny_supernet, arch)
    assert subnet.bitops_report().to_dict() == report.to_dict()


def test_extract_subnet_function_takes_what_the_method_takes(tiny_supernet, prompt_inputs):
    tiny_supernet.calibrate_quantizers(prompt_inputs["pixel_values"])
    full_precision = tiny_supernet.bitops_report(tiny_supernet.full_precision_subnet()).total_bitops
    budget = full_precision // 3
    by_method = tiny_supernet.extract_subnet(budget)
    by_function = extract_subnet(tiny_supernet, budget)
    assert by_function.architecture == by_method.architecture
    assert by_function.config.bitops <= budget
    assert extract_subnet(tiny_supernet, "100%").architecture == tiny_supernet.extract_subnet("100%").architecture
    with pytest.raises(TypeError, match=r"or a BitOPs budget \(a number or a str such as .*\), got bool: True"):
        extract_subnet(tiny_supernet, True)


def test_parameter_kind_names_what_the_supernet_adds_to_sam(tiny_sam, tiny_supernet):
    kinds = {name: parameter_kind(name) for name, _ in tiny_supernet.named_parameters()}
    assert all(parameter_kind(name) is None for name in tiny_sam.state_dict())
    added = {name for name, kind in kinds.items() if kind is not None}
    assert added == {name for name in kinds if name.removeprefix("sam.") not in tiny_sam.state_dict()}
    assert {kinds[name] for name in added} == {"adapter", "quantizer"}
    assert all(("lora_" in name) == (kinds[name] == "adapter") for name in added)


def test_one_base_for_the_two_wrappers_and_the_two_configs():
    from mpsupernet.configuration_sam_supernet import SamQuantizedConfigBase
    from mpsupernet.modeling_sam_base import SamQuantizedPreTrainedModel

    assert issubclass(SamSupernetConfig, SamQuantizedConfigBase) and issubclass(SamSubnetConfig, SamQuantizedConfigBase)
    for model_class in (mpsupernet.SamSupernetForMaskGeneration, mpsupernet.SamSubnetForMaskGeneration):
        assert issubclass(model_class, SamQuantizedPreTrainedModel)
        assert "forward" not in vars(model_class) and "get_image_embeddings" not in vars(model_class)


def test_dataset_schema_map_is_shared_with_the_cli(tmp_path, capsys):
    from mpsupernet.choices import DATASET_SCHEMA_NAMES
    from mpsupernet.cli import load_dataset_splits, main

    # The CLI's `--schema` choices come from `mpsupernet.choices`, which imports nothing; the map must name the same.
    assert tuple(DATASET_SCHEMAS) == DATASET_SCHEMA_NAMES
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--schema", "masks", "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "argument --schema: invalid choice: 'masks' (choose from 'standard', 'coco', 'semantic')" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=rf"^Unknown dataset schema 'masks'; allowed: {re.escape(str(list(DATASET_SCHEMAS)))}\.$"):
        load_dataset_splits("synthetic", "masks")
    dataset = make_synthetic_segmentation_dataset(2, image_size=32)
    converted = to_standard_schema(dataset, "standard")
    assert converted.num_rows == 2 and set(converted.column_names) == {"image", "masks", "image_id"}
    allowed = r"\['standard', 'coco', 'semantic'\]"
    with pytest.raises(ValueError, match=rf"Unknown dataset schema 'masks'; allowed: {allowed}"):
        to_standard_schema(dataset, "masks")


def test_embedded_weights_sit_in_the_pretrained_package():
    import mpsupernet.pretrained as pretrained

    package_dir = Path(pretrained.__file__).parent
    assert pretrained.shipped_sam_path().parent == package_dir
    # The globs of setup.py's package_data for `mpsupernet.pretrained` reach every shipped SAM's files.
    shipped = set(pretrained.SHIPPED_SAM_NAMES)
    for pattern, name in (("*/*.safetensors", "model.safetensors"), ("*/*.json", "config.json"), ("*/*.md", "README.md")):
        assert {path.parent.name for path in package_dir.glob(pattern) if path.name == name} == shipped
