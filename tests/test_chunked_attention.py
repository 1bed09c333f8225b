"""The query-chunked quantized attention (`mpsupernet.chunked_attention`) against the whole one it replaces."""

import copy

import pytest
import torch
from conftest import make_tiny_sam
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mpsupernet import SamSupernetConfig, SamSupernetForMaskGeneration, extract_subnet
from mpsupernet.chunked_attention import ChunkedAttention, ChunkedAttentionCore, query_chunk_rows
from mpsupernet.elastic import ElasticSamVisionAttention, QuantizedSamVisionAttention
from mpsupernet.quantization import TensorStatistics
from mpsupernet.testing_utils import make_sam_config

WHOLE = 2**40
"""A chunk budget no test tensor reaches: the products run whole, as before chunking existed."""
BITS = [4, 6, 8, 32]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """`|actual - expected| / |expected|` in the Euclidean norm (float32 rounding alone gives about 1e-7)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def make_attention() -> ElasticSamVisionAttention:
    """The global attention of a 64-wide, 4-head block (8 x 8 tokens), every tensor trainable."""
    config = SamSupernetConfig(**{k: v for k, v in make_sam_config().to_dict().items() if k != "model_type"})
    torch.manual_seed(0)
    attn = ElasticSamVisionAttention(config, 0).train()
    attn.requires_grad_(True)
    with torch.no_grad():
        attn.rel_pos_h.normal_(0, 0.5)
        attn.rel_pos_w.normal_(0, 0.5)
    return attn


def calibrated_attention_inputs(bits: int) -> tuple:
    """`make_attention()` with 3 heads at `bits`, random queries, keys and values of 6 batch-heads x 64 tokens (their
    quantizers calibrated on them, the probabilities' not), and random weights of the output."""
    attn = make_attention()
    attn.set_active(3, bits)
    generator = torch.Generator().manual_seed(bits)
    query, key, value = (t.requires_grad_(True) for t in (torch.randn(3, 6, 64, 16, generator=generator) * 2).unbind(0))
    for quantizer, tensor in zip(attn.product_quantizers(), (query, key, value)):
        quantizer.ensure_initialized(tensor)
    return attn, query, key, value, torch.randn(6, 64, 16, generator=generator)


def core_gradients(attn, function, query, key, value, weights):
    """The output of `function(query, key, value, *core_parameters())` and the gradients of `(output * weights).sum()`
    for queries, keys, values, relative-position tables and every product quantizer's step and offset tables."""
    inputs = (query, key, value, *attn.core_parameters())
    names = ["query", "key", "value", "rel_pos_h", "rel_pos_w"] + [
        f"{kind}.{table}" for kind in ("query", "key", "value", "probs") for table in ("step_size", "offset")
    ]
    named = [(name, tensor) for name, tensor in zip(names, inputs) if tensor is not None]
    output = function(*inputs)
    grads = torch.autograd.grad((output * weights).sum(), [tensor for _, tensor in named], allow_unused=True)
    return output, {name: grad for (name, _), grad in zip(named, grads)}


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 64])
def test_chunked_core_gives_the_output_and_gradients_of_the_whole_core(bits, chunk_rows):
    attn, query, key, value, weights = calibrated_attention_inputs(bits)
    chunked_attn = copy.deepcopy(attn)  # its probability quantizer is calibrated by the chunked pass

    expected, expected_grads = core_gradients(attn, attn.attention_core(8, 8), query, key, value, weights)
    core = ChunkedAttentionCore(chunked_attn, 8, 8, chunk_rows)
    assert len(core.chunks()) == -(-64 // chunk_rows)
    output, grads = core_gradients(
        chunked_attn, lambda *inputs: ChunkedAttention.apply(core, *inputs), query, key, value, weights
    )

    assert relative_error(output, expected) <= 1e-6
    assert grads.keys() == expected_grads.keys()
    for name, expected_grad in expected_grads.items():
        if expected_grad is None:  # float products use no step size, and signed grids no offset
            assert grads[name] is None and (bits == 32 or name.endswith("offset")), name
            continue
        assert relative_error(grads[name], expected_grad) <= 1e-5, name
        if not name.endswith("offset"):
            assert expected_grad.abs().sum() > 0, name
    if bits != 32:
        assert grads["probs.step_size"][attn.probs_quantizer.bit_index(bits)].abs() > 0
        torch.testing.assert_close(
            chunked_attn.probs_quantizer.step_size, attn.probs_quantizer.step_size, rtol=1e-6, atol=0
        )


@pytest.mark.parametrize("bits", [4, 32])
def test_chunked_core_under_bf16_autocast_stays_within_bf16_rounding(bits):
    """Under autocast each chunk's products round to bfloat16: the output and the queries' gradient are the whole
    core's, while the keys' and values' gradients, added up over chunks of bfloat16 products rather than accumulated
    in one, agree within bfloat16's rounding (its epsilon is 7.8e-3; measured: 2.5e-3)."""
    attn, query, key, value, weights = calibrated_attention_inputs(bits)
    core = ChunkedAttentionCore(attn, 8, 8, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = core_gradients(attn, attn.attention_core(8, 8), query, key, value, weights)
        output, grads = core_gradients(
            attn, lambda *inputs: ChunkedAttention.apply(core, *inputs), query, key, value, weights
        )
    assert output.dtype == torch.bfloat16 and relative_error(output, expected) <= 1e-6
    assert relative_error(grads["query"], expected_grads["query"]) <= 1e-5
    for name in ("key", "value", "rel_pos_h"):
        assert relative_error(grads[name], expected_grads[name]) <= 7.8e-3, name


def test_merged_statistics_are_those_of_the_whole_tensor():
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(1000, generator=generator) * 1e-3, torch.randn(37, generator=generator) * 5 + 3])
    parts = [TensorStatistics.of(part) for part in x.split(100)]  # the last part holds 37 elements
    merged, whole = TensorStatistics.merge(parts), TensorStatistics.of(x)
    assert merged.count == whole.count == 1037
    for name in ("mean", "std", "minimum", "maximum"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), rtol=1e-6, atol=0, msg=name)
    single = TensorStatistics.merge([TensorStatistics.of(x[:1]), TensorStatistics.of(x[1:2])])
    torch.testing.assert_close(single.std, x[:2].std())


def test_query_chunk_rows_follow_the_budget():
    # ViT-B's global blocks at 1024 px: at most 341 rows of 12 x 4096 scores in 2^24 elements, so 13 chunks of 316
    # rows (not 12 of 341 and one of 4).
    assert query_chunk_rows(batch_heads=12, queries=4096, keys=4096, max_elements=2**24) == 316
    assert query_chunk_rows(batch_heads=4, queries=4096, keys=4096, max_elements=2**24) == 1024
    assert query_chunk_rows(batch_heads=8, queries=64, keys=64, max_elements=8 * 64 * 10) == 10  # 7 chunks: 6 x 10 + 4
    assert query_chunk_rows(batch_heads=2, queries=64, keys=64, max_elements=2**24) == 64  # at most every row
    assert query_chunk_rows(batch_heads=8, queries=64, keys=64, max_elements=1) == 1  # at least one row
    with pytest.raises(ValueError, match="at least 1 element, got 0"):
        query_chunk_rows(batch_heads=8, queries=64, keys=64, max_elements=0)
    with pytest.raises(ValueError, match="`attention_chunk_elements` must be a positive number of elements, got 0"):
        SamSupernetConfig(attention_chunk_elements=0)


def set_chunk_elements(model: torch.nn.Module, elements: int) -> None:
    for module in model.modules():
        if isinstance(module, QuantizedSamVisionAttention):
            module.chunk_elements = elements


# Two images: a global block's scores are 2 x 4 heads x 64 x 64, a windowed block's 2 x 4 windows x 4 heads x 16 x
# 16. At 5120 elements the global blocks run 7 chunks of 10 rows (the last of 4), the windowed ones 2 of 8.
CHUNKED = 2 * 4 * 64 * 10


def training_gradients(model, inputs: dict, elements: int) -> tuple:
    """The masks of one training forward pass with products chunked at `elements`, and the gradients of every
    trainable tensor."""
    set_chunk_elements(model, elements)
    model.zero_grad(set_to_none=True)
    outputs = model(**inputs, multimask_output=False)
    weights = torch.randn(outputs.pred_masks.shape, generator=torch.Generator().manual_seed(0))
    ((outputs.pred_masks * weights).sum() + outputs.iou_scores.sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs.pred_masks.detach(), grads


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_supernet_training_is_the_same_chunked_or_whole(bits, checkpointing, prompt_inputs):
    supernet = SamSupernetForMaskGeneration.from_sam(make_tiny_sam()).train()
    supernet.set_subnet(supernet.search_space.largest(weight_bits=8, activation_bits=bits))
    if checkpointing:
        supernet.activation_checkpointing_enable()
    with torch.no_grad():
        supernet(**prompt_inputs)  # calibrates the activation steps

    expected_masks, expected = training_gradients(supernet, prompt_inputs, WHOLE)
    masks, grads = training_gradients(supernet, prompt_inputs, CHUNKED)

    assert relative_error(masks, expected_masks) <= 1e-6
    assert grads.keys() == expected.keys()
    wanted = ["attn.qkv.lora_A", "attn.qkv.lora_B", "mlp.lin1.lora_B", "mask_decoder"]
    if bits != 32:
        wanted += [f"attn.{kind}_quantizer.step_size" for kind in ("query", "key", "value", "probs")]
        wanted += ["attn.value_quantizer.offset"]
    assert all(any(part in name for name in expected) for part in wanted)
    for name, grad in grads.items():
        assert relative_error(grad, expected[name]) <= gradient_tolerance(name), name


def gradient_tolerance(name: str) -> float:
    """1e-5, and 1e-4 for the step and offset of the Linears' input quantizers, which are downstream of nothing
    chunked but sum the incoming gradient over a whole activation.

    Those sums (LSQ's step and offset gradients) add terms of both signs that cancel to a small total: float32
    rounding, which differs between summing the keys' gradient over chunks and in one product, reaches 2e-5 of such a
    total, and the whole path's own float32 result is further than that from a float64 run (block 3's qkv input
    offset at A4: 4.6e-4; input steps: about 1.5e-5).
    """
    return 1e-4 if ".input_quantizer." in name else 1e-5


def test_extracted_subnet_runs_the_same_chunked_or_whole(prompt_inputs):
    supernet = SamSupernetForMaskGeneration.from_sam(make_tiny_sam(), attention_chunk_elements=CHUNKED).eval()
    arch = supernet.search_space.largest(weight_bits=6, activation_bits=6)
    supernet.set_subnet(arch)
    with torch.no_grad():
        supernet(**prompt_inputs)  # calibrates through the chunked products
    subnet = extract_subnet(supernet, arch)
    assert subnet.config.attention_chunk_elements == CHUNKED
    with torch.no_grad():
        chunked = subnet(**prompt_inputs).pred_masks
        set_chunk_elements(subnet, WHOLE)
        whole = subnet(**prompt_inputs).pred_masks
    assert relative_error(chunked, whole) <= 1e-6

    subnet.train().requires_grad_(True)
    _, expected = training_gradients(subnet, prompt_inputs, WHOLE)
    _, grads = training_gradients(subnet, prompt_inputs, CHUNKED)
    assert any("probs_quantizer" in name for name in grads) and grads.keys() == expected.keys()
    for name, grad in grads.items():
        assert relative_error(grad, expected[name]) <= gradient_tolerance(name), name


class LargestOutput(TorchDispatchMode):
    """Records the element count of every tensor an op produces (forward and backward), and the ops that ran."""

    def __init__(self):
        super().__init__()
        self.largest, self.ops = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.ops.add(func.overloadpacket.__name__)
        sizes = [tensor.numel() for tensor in tree_leaves(result) if isinstance(tensor, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return result


def test_a_training_step_at_4096_tokens_makes_no_tensor_of_a_quarter_of_the_attention():
    heads, tokens = 4, 64 * 64
    sam = make_tiny_sam(
        image_size=1024, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads, global_attn_indexes=(1,),
        window_size=8,
    )
    supernet = SamSupernetForMaskGeneration.from_sam(sam).train()  # the default chunk budget, 2^24 elements
    supernet.activation_checkpointing_enable()
    supernet.set_subnet(supernet.search_space.largest(weight_bits=8, activation_bits=8))
    inputs = {"pixel_values": torch.randn(1, 3, 1024, 1024), "input_boxes": torch.tensor([[[100.0, 200, 700, 900]]])}
    recorder = LargestOutput()
    with recorder:  # the first step also calibrates every quantizer, the probabilities' chunk by chunk
        outputs = supernet(**inputs, multimask_output=False)
        outputs.pred_masks.square().mean().backward()
    assert {"_softmax", "_softmax_backward_data", "convolution_backward"} <= recorder.ops  # backward was recorded
    assert recorder.largest <= heads * tokens * tokens // 4, recorder.largest / (heads * tokens * tokens)
    assert supernet.sam.vision_encoder.layers[1].attn.probs_quantizer.step_size.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["embedded-sam", "shapes-sam"])
def test_the_shipped_sams_stay_below_the_default_chunk_budget(name):
    """The demo and the quality benchmark (shipped SAMs, batches of at most 8 images) run every attention whole, on
    the code that ran before chunking existed, so their figures reproduce as they were."""
    from mpsupernet.demo import BATCH_SIZE
    from mpsupernet.pretrained import shipped_sam_config

    vision = shipped_sam_config(name).vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    batch_heads = max(BATCH_SIZE, 8) * vision.num_attention_heads
    budget = SamSupernetConfig().attention_chunk_elements
    assert query_chunk_rows(batch_heads, tokens, tokens, budget) == tokens
