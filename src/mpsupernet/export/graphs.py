"""The graphs that are exported: a subnet's image encoder on the export ops, and SAM's prompt encoder + mask decoder.

The encoder graph computes what `SamSubnetVisionEncoder` computes, rewritten so that every step is an ONNX
quantization pattern and exact in real arithmetic (the facts behind each rewrite: `DEPLOYMENT.md` of the project):

- weights are their stored integer codes, laid out `[in, out]` so that `DequantizeLinear` feeds `MatMul` directly,
  with one scale per output channel (`axis=1`);
- an LSQ+ activation offset is subtracted before quantizing, and added back where it is exact to do so: a
  Linear's bias gains `offset * column sums of its dequantized weight`; a convolution's (patch embedding, neck)
  gains `offset` convolved with its weight over an all-ones input of its zero-padded size, a constant map (per
  channel where the convolution is not padded; per position where it is, since padded taps see 0, not the offset);
  probabilities x values gain `offset * row sums of the quantized probabilities`;
- every activation grid is stored in uint8: signed grids shifted by the integer zero point `2^(b-1)` (same values),
  so that onnxruntime runs Q.K^T as an integer matmul too (it fuses uint8 pairs where it skips int8 x int8);
- the key is quantized after its transpose (per-tensor quantization commutes with it), the head scale multiplies
  `Q.K^T` rather than `Q`, and the relative-position term is computed from the dequantized query, as in PyTorch.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.sam.modeling_sam import SamVisionAttention

from ..architecture import is_float_bits
from ..packing import unpack_codes
from ..quantization import LsqQuantizer, integer_range
from ..subnet_layers import QuantizedConv2d, QuantizedLinear, SamSubnetVisionAttention
from .ops import dequantize, quantize


class ActivationQuantizerGraph(nn.Module):
    """A fixed `LsqQuantizer` as `quantize -> dequantize` of `x - offset`: its output is the quantized value minus
    `offset`, which the consumer adds back (see the module docstring). The identity at a float bit-width."""

    def __init__(self, quantizer: LsqQuantizer):
        super().__init__()
        self.bits = quantizer.active_bits
        self.enabled = quantizer.is_quantizing
        self.q_min, self.q_max = integer_range(self.bits, quantizer.signed) if self.enabled else (0, 0)
        # signed grids are stored shifted into uint8 (exact: the zero point is an integer)
        self.zero_point = -self.q_min
        step = quantizer.step_magnitude(quantizer.step_size[0, 0]) if self.enabled else torch.tensor(1.0)
        self.register_buffer("step", step.detach().clone().float().reshape(()))
        offset = quantizer.offset[0, 0] if self.enabled and quantizer.offset is not None else torch.tensor(0.0)
        self.offset = float(offset.detach())

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The codes of `x - offset` (LSQ's integer codes plus `zero_point`, in uint8)."""
        return quantize(x - self.offset if self.offset != 0.0 else x, self.step, self.q_min, self.q_max, self.zero_point)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return dequantize(codes, self.step, 0, self.zero_point)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.codes(x)) if self.enabled else x


class LinearGraph(nn.Module):
    """A subnet `QuantizedLinear` as `[QDQ(x - offset)] @ DQ(codes [in, out], scales) + folded bias`."""

    def __init__(self, linear: QuantizedLinear):
        super().__init__()
        self.weight_bits, self.activation_bits = linear.weight_bits, linear.activation_bits
        self.input_quantizer = ActivationQuantizerGraph(linear.input_quantizer)
        with torch.no_grad():
            if is_float_bits(linear.weight_bits):
                weight = linear.weight.detach().float().t().contiguous()
                self.register_buffer("weight", weight)
                self.weight_codes = self.weight_scale = None
            else:
                codes = unpack_codes(linear.packed_weight, linear.weight_bits, (linear.out_features, linear.in_features))
                self.register_buffer("weight_codes", codes.t().contiguous())
                self.register_buffer("weight_scale", linear.weight_scale.detach().float().clone())
                self.weight = None
                weight = codes.float().t() * self.weight_scale
            bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(linear.out_features)
            self.register_buffer("bias", bias + self.input_quantizer.offset * weight.sum(dim=0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            weight = dequantize(self.weight_codes, self.weight_scale, 1, 0)
        else:
            weight = self.weight
        return torch.matmul(self.input_quantizer(x), weight) + self.bias


def linear_graph(linear: nn.Module) -> nn.Module:
    """The export form of a subnet Linear: a plain float `nn.Linear` stays as it is."""
    return LinearGraph(linear) if isinstance(linear, QuantizedLinear) else linear


class ConvGraph(nn.Module):
    """A subnet `QuantizedConv2d` as `conv(QDQ(x - offset), DQ(codes [out, in, k, k], scales)) + offset map + bias`.

    Args:
        conv (`QuantizedConv2d`): the subnet's convolution.
        input_size (`int`): the side of its (square) input, which the offset map of a padded convolution needs.
    """

    def __init__(self, conv: QuantizedConv2d, input_size: int):
        super().__init__()
        self.weight_bits, self.activation_bits = conv.weight_bits, conv.activation_bits
        self.stride, self.padding = conv.stride, conv.padding
        self.input_quantizer = ActivationQuantizerGraph(conv.input_quantizer)
        with torch.no_grad():
            if is_float_bits(conv.weight_bits):
                weight = conv.weight.detach().float().clone()
                self.register_buffer("weight", weight)
                self.weight_codes = self.weight_scale = None
            else:
                codes = unpack_codes(conv.packed_weight, conv.weight_bits, conv.weight_shape)
                self.register_buffer("weight_codes", codes)
                self.register_buffer("weight_scale", conv.weight_scale.detach().float().clone())
                self.weight = None
                weight = codes.float() * self.weight_scale.reshape(-1, 1, 1, 1)
            bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(conv.out_features)
            bias = bias.reshape(1, -1, 1, 1)
            offset = self.input_quantizer.offset
            if offset != 0.0:
                side = input_size if self.padding else conv.kernel_size  # without padding every output sees k x k
                ones = torch.full((1, conv.in_features, side, side), offset)
                bias = bias + F.conv2d(ones, weight, stride=self.stride, padding=self.padding)
            self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            weight = dequantize(self.weight_codes, self.weight_scale, 0, 0)
        else:
            weight = self.weight
        return F.conv2d(self.input_quantizer(x), weight, stride=self.stride, padding=self.padding) + self.bias


def conv_graph(conv: nn.Module, input_size: int) -> nn.Module:
    """The export form of a subnet convolution: a plain float `nn.Conv2d` stays as it is."""
    return ConvGraph(conv, input_size) if isinstance(conv, QuantizedConv2d) else copy.deepcopy(conv).float()


class AttentionGraph(nn.Module):
    """The attention of one subnet block, with its act x act products quantized as the subnet quantizes them."""

    # transformers' relative-position code, reused as it is (it reads `rel_pos_h`, `rel_pos_w` and `get_rel_pos`).
    get_rel_pos = SamVisionAttention.get_rel_pos
    get_decomposed_rel_pos = SamVisionAttention.get_decomposed_rel_pos

    def __init__(self, attention: SamSubnetVisionAttention):
        super().__init__()
        self.heads, self.scale, self.use_rel_pos = attention.active_heads, attention.scale, attention.use_rel_pos
        if self.use_rel_pos:
            self.register_buffer("rel_pos_h", attention.rel_pos_h.detach().float().clone())
            self.register_buffer("rel_pos_w", attention.rel_pos_w.detach().float().clone())
        self.qkv, self.proj = linear_graph(attention.qkv), linear_graph(attention.proj)
        self.quantize_products = attention.probs_quantizer.is_quantizing
        self.query_quantizer = ActivationQuantizerGraph(attention.query_quantizer)
        self.key_quantizer = ActivationQuantizerGraph(attention.key_quantizer)
        self.value_quantizer = ActivationQuantizerGraph(attention.value_quantizer)
        self.probs_quantizer = ActivationQuantizerGraph(attention.probs_quantizer)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        batch_size, height, width, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch_size, height * width, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.reshape(3, batch_size * self.heads, height * width, -1).unbind(0)
        query = self.query_quantizer(query)
        key_t = self.key_quantizer(key.transpose(-2, -1))
        value = self.value_quantizer(value)
        logits = torch.matmul(query, key_t) * self.scale
        if self.use_rel_pos:
            bias = self.get_decomposed_rel_pos(query, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
            logits = logits + bias.reshape(batch_size * self.heads, height * width, height * width)
        probs = self.probs_quantizer(torch.softmax(logits, dim=-1))
        output = torch.matmul(probs, value)
        if self.value_quantizer.offset != 0.0:
            output = output + self.value_quantizer.offset * probs.sum(dim=-1, keepdim=True)
        output = output.reshape(batch_size, self.heads, height, width, -1).permute(0, 2, 3, 1, 4)
        return self.proj(output.reshape(batch_size, height, width, -1)), None


def antialiased_resize_matrix(size: int, new_size: int) -> torch.Tensor:
    """The `(new_size, size)` matrix `M` with `M @ x` = `x` resized along its first axis as
    `F.interpolate(..., mode="bilinear", align_corners=False, antialias=True)` resizes each axis (the filter is
    separable), read off by resizing the unit vectors.

    ONNX has the antialiased resize as an attribute of `Resize`, which OpenVINO (2026.4) ignores: a reduced-resolution
    tier then gets embeddings off by about 2 there. Two matrix products with constant matrices compute the same
    resize on every runtime.
    """
    unit_vectors = torch.eye(size).reshape(size, 1, 1, size)
    resized = F.interpolate(unit_vectors, size=(1, new_size), mode="bilinear", align_corners=False, antialias=True)
    return resized[:, 0, 0, :].T.contiguous()


class VisionEncoderGraph(nn.Module):
    """A subnet's image encoder for export: pixel values at the base `image_size` in, image embeddings out.

    As `ResizingSamVisionEncoder`: base-size images are resized to the subnet's resolution (bilinear, antialiased;
    as two products with [`antialiased_resize_matrix`]), the position embedding is the subnet's (interpolated once,
    here, in PyTorch), and the embeddings are resized back to the base grid.
    """

    def __init__(self, subnet: nn.Module):
        super().__init__()
        encoder = subnet.sam.vision_encoder
        self.image_size, self.resolution = encoder.image_size, encoder.resolution
        self.base_grid = encoder.image_size // encoder.patch_size
        self.projection = conv_graph(encoder.patch_embed.projection, encoder.resolution)
        grid = encoder.resolution // encoder.patch_size
        with torch.no_grad():
            pos_embed = encoder.position_embedding(grid).detach().float().clone() if encoder.pos_embed is not None else None
        self.register_buffer("pos_embed", pos_embed)
        resize = antialiased_resize_matrix(self.image_size, self.resolution) if self.resolution != self.image_size else None
        self.register_buffer("resize", resize)
        self.layers = nn.ModuleList()
        for source in encoder.layers:
            layer = copy.deepcopy(source)
            layer.attn = AttentionGraph(source.attn)
            layer.mlp.lin1, layer.mlp.lin2 = linear_graph(source.mlp.lin1), linear_graph(source.mlp.lin2)
            self.layers.append(layer.float())
        self.neck = copy.deepcopy(encoder.neck).float()
        self.neck.conv1 = conv_graph(encoder.neck.conv1, grid)
        self.neck.conv2 = conv_graph(encoder.neck.conv2, grid)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.resize is not None:
            pixel_values = self.resize @ pixel_values @ self.resize.T
        hidden_states = self.projection(pixel_values).permute(0, 2, 3, 1)
        if self.pos_embed is not None:
            hidden_states = hidden_states + self.pos_embed
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        embeddings = self.neck(hidden_states)
        if embeddings.shape[-1] != self.base_grid:
            embeddings = F.interpolate(embeddings, size=(self.base_grid, self.base_grid), mode="bilinear", align_corners=False)
        return embeddings


class PromptEncoderMaskDecoderGraph(nn.Module):
    """SAM's prompt encoder and mask decoder in one graph (the split SAM's ONNX exporters use), in float.

    Inputs (prompts in the base model's input frame, as `SamProcessor` gives them; the exported graph takes one
    image, `batch == 1`):
        image_embeddings (`(batch, channels, grid, grid)` float32): the encoder's output.
        input_points (`(batch, point_batch, num_points, 2)` float32): points, `num_points` may be 0.
        input_labels (`(batch, point_batch, num_points)` int64): 1 foreground, 0 background, -1 "not a point" (the
            pad point transformers appends when no box is given), -10 padding.
        input_boxes (`(batch, point_batch, num_boxes, 4)` float32): `num_boxes` is 0 or 1 (`x1, y1, x2, y2`).
    Outputs: `iou_scores` `(batch, point_batch, 3)` and `pred_masks` `(batch, point_batch, 3, 4 * grid, 4 * grid)`
    (multimask output). `mpsupernet.runtime.OnnxSamModel` builds these inputs from what `SamProcessor` gives.
    """

    def __init__(self, subnet: nn.Module):
        super().__init__()
        sam = copy.deepcopy(subnet.sam).float()
        self.prompt_encoder, self.mask_decoder = sam.prompt_encoder, sam.mask_decoder
        with torch.no_grad():
            self.register_buffer("image_positional_embeddings", sam.get_image_wide_positional_embeddings().clone())
            corner_embeddings = torch.cat([self.prompt_encoder.point_embed[i].weight for i in (2, 3)])
        self.register_buffer("corner_embeddings", corner_embeddings.clone())

    def forward(self, image_embeddings, input_points, input_labels, input_boxes):
        batch_size, point_batch = input_points.shape[:2]
        encoder = self.prompt_encoder
        point_embeddings = encoder._embed_points(input_points, input_labels, pad=False)
        # transformers' `_embed_boxes` writes in place; the same sums, written for any number of boxes (0 or 1).
        corners = (input_boxes + 0.5).reshape(batch_size, point_batch, -1, 2)
        size = (encoder.input_image_size, encoder.input_image_size)
        box_embeddings = encoder.shared_embedding(corners, size).reshape(batch_size, point_batch, -1, 2, encoder.hidden_size)
        box_embeddings = (box_embeddings + self.corner_embeddings).reshape(batch_size, point_batch, -1, encoder.hidden_size)
        sparse_embeddings = torch.cat([point_embeddings, box_embeddings], dim=2)
        dense_embeddings = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            batch_size, -1, encoder.image_embedding_size[0], encoder.image_embedding_size[1]
        )
        masks, iou_scores = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=self.image_positional_embeddings.expand(batch_size, -1, -1, -1),
            sparse_prompt_embeddings=sparse_embeddings,
            dense_prompt_embeddings=dense_embeddings,
            multimask_output=True,
        )
        return iou_scores, masks


class ClassDecoderGraph(nn.Module):
    """The class head of a semantic subnet without prompts, in float: SAM's mask decoder with one mask token per
    class, fed only the learned no-mask embedding (what `SamForSemanticSegmentationMixin.forward` runs).

    Input: `image_embeddings` `(batch, channels, grid, grid)` float32 (the encoder's output).
    Output: `logits` `(batch, num_labels, 4 * grid, 4 * grid)`, the class logits.
    """

    def __init__(self, subnet: nn.Module):
        super().__init__()
        sam = copy.deepcopy(subnet.sam).float()
        self.mask_decoder = sam.mask_decoder
        with torch.no_grad():
            self.register_buffer("image_positional_embeddings", sam.get_image_wide_positional_embeddings().clone())
            self.register_buffer("no_mask_embedding", sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).clone())

    def forward(self, image_embeddings):
        batch_size = image_embeddings.shape[0]
        masks, _ = self.mask_decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=self.image_positional_embeddings.expand(batch_size, -1, -1, -1),
            sparse_prompt_embeddings=None,
            dense_prompt_embeddings=self.no_mask_embedding.expand_as(image_embeddings),
            multimask_output=True,
        )
        return masks[:, 0]
