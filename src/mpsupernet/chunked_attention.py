"""Quantized attention computed a block of query rows at a time, in the forward and the backward pass.

At 1024 px SAM ViT-B has 4096 tokens, and the attention of a global block holds `heads x 4096 x 4096` scores, their
softmax and its fake-quantized copy. Softmax normalises each query's row on its own and the probability quantizer
works element by element, so the rows can be taken a chunk at a time: each chunk computes `Q_c Kᵀ` plus the decomposed
relative-position bias of its rows, the softmax, the LSQ fake quantization of the probabilities and their product with
the values, and the backward pass recomputes and differentiates one chunk at a time. Only the sums over rows couple the
chunks, and they are accumulated exactly:

- the gradients of keys, values and the probability quantizer's step and offset add up over chunks; the step's LSQ
  gradient scale is that of the whole probability tensor (`elements=` of `LsqQuantizer.fake_quantize_arguments`);
- the first calibration of the probability quantizer merges the statistics of every chunk
  ([`TensorStatistics.merge`]), so it sets the step the whole tensor would.

Only the inputs are kept for backward (as `RecomputedFunction` does); no tensor of more than one chunk's scores is made.
"""

import torch

from .quantization import TensorStatistics
from .recompute import autocast_state, detached_leaves, gradients_of

QUERY_SIDE = (0, 3, 4)
"""Which of the operands `(query, key, value, rel_h, rel_w)` a chunk takes rows of (the query side, whose gradient is
written row by row); it takes keys and values whole (their gradients add up over chunks)."""
OPERAND_INPUTS = 11
"""How many of the core's inputs the operands are computed from: queries, keys, values, the two relative-position
tables and the step and offset tables of the query, key and value quantizers. The last two inputs are the
probability quantizer's step and offset tables."""


def query_chunk_rows(batch_heads: int, queries: int, keys: int, max_elements: int) -> int:
    """Query rows per chunk: the fewest chunks whose scores (`batch_heads x rows x keys` elements) hold at most
    `max_elements` each, as equal as they can be (at least one row; all `queries` when they fit).

    Raises:
        `ValueError`: if `max_elements` is not positive.
    """
    if max_elements < 1:
        raise ValueError(f"The attention chunk budget must be at least 1 element, got {max_elements}.")
    max_rows = max(1, min(queries, max_elements // max(1, batch_heads * keys)))
    chunks = -(-queries // max_rows)
    return -(-queries // chunks)


class ChunkedAttentionCore:
    """The act×act part of one call of a `QuantizedSamVisionAttention`, `chunk_rows` query rows at a time.

    It takes what `QuantizedSamVisionAttention.attention_core` takes, `(query, key, value, *core_parameters())`
    (queries, keys and values of shape `(batch * heads, height * width, head_dim)`), and returns the same output; the
    bit-widths are frozen when it is made, so that the backward pass repeats the forward pass even if another subnet
    was activated in between. Attention dropout is not supported (the caller keeps the unchunked path for it).

    Args:
        attention (`QuantizedSamVisionAttention`): the attention whose quantizers, scale and relative positions run.
        height, width (`int`): the token grid; queries and keys are its `height * width` positions.
        chunk_rows (`int`): query rows per chunk (see [`query_chunk_rows`]).
    """

    def __init__(self, attention, height: int, width: int, chunk_rows: int):
        self.attention, self.height, self.width = attention, height, width
        self.chunk_rows = chunk_rows
        self.quantizers = attention.product_quantizers()
        self.bits = [quantizer.active_bits for quantizer in self.quantizers]

    def chunks(self) -> list[slice]:
        tokens = self.height * self.width
        return [slice(start, min(start + self.chunk_rows, tokens)) for start in range(0, tokens, self.chunk_rows)]

    def operands(self, query, key, value, rel_pos_h, rel_pos_w, *quantizer_tables) -> tuple:
        """`(query, key, value, rel_h, rel_w)`: the quantized queries, keys and values, and the two halves of the
        decomposed relative-position bias of every query (`(batch * heads, tokens, height)` and `(..., width)`, or
        `None` without relative positions), as transformers' `get_decomposed_rel_pos` computes them."""
        steps, offsets = quantizer_tables[0::2], quantizer_tables[1::2]
        operands = zip(self.quantizers, (query, key, value), self.bits, steps, offsets)
        query, key, value = (
            quantizer.fake_quantize(tensor, bits, step, offset) for quantizer, tensor, bits, step, offset in operands
        )
        if not self.attention.use_rel_pos:
            return query, key, value, None, None
        attention, height, width = self.attention, self.height, self.width
        grid_query = query.reshape(query.shape[0], height, width, query.shape[-1])
        rel_h = torch.einsum("bhwc,hkc->bhwk", grid_query, attention.get_rel_pos(height, height, rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", grid_query, attention.get_rel_pos(width, width, rel_pos_w))
        return query, key, value, rel_h.flatten(1, 2), rel_w.flatten(1, 2)

    def probabilities(self, query, key, rel_h, rel_w) -> torch.Tensor:
        """The softmax of the scores of the query rows given (`query`, `rel_h`, `rel_w` cut to those rows)."""
        scores = (query * self.attention.scale) @ key.transpose(-2, -1)
        if rel_h is not None:
            bias = rel_h[..., :, None] + rel_w[..., None, :]
            scores = scores + bias.reshape(scores.shape)
        return torch.softmax(scores, dtype=torch.float32, dim=-1).to(query.dtype)

    def rows_output(self, query, key, value, rel_h, rel_w, probs_step, probs_offset, elements: int) -> torch.Tensor:
        """The output of the query rows given: their probabilities, fake-quantized as part of a tensor of `elements`
        elements (the LSQ gradient scale of the whole tensor), times the values."""
        probs = self.probabilities(query, key, rel_h, rel_w)
        quantizer, bits = self.quantizers[3], self.bits[3]
        return quantizer.fake_quantize(probs, bits, probs_step, probs_offset, elements=elements) @ value

    def probability_elements(self, query, key) -> int:
        return query.shape[0] * query.shape[1] * key.shape[1]

    @torch.no_grad()
    def calibrate_probabilities(self, query, key, rel_h, rel_w) -> None:
        """Initialises the probability quantizer's step at its bit-width, if unset, from the statistics of the whole
        probability tensor, merged chunk by chunk."""
        quantizer, bits = self.quantizers[3], self.bits[3]
        if not quantizer.needs_initialization(bits):
            return
        parts = []
        for rows in self.chunks():
            chunk_query, _, _, chunk_h, chunk_w = self.rows_of(rows, query, key, None, rel_h, rel_w)
            parts.append(TensorStatistics.of(self.probabilities(chunk_query, key, chunk_h, chunk_w)))
        quantizer.initialize_from_statistics(TensorStatistics.merge(parts), bits)

    @staticmethod
    def rows_of(rows: slice, *operands) -> list:
        """`operands` with the query side (queries and the relative-position halves) cut to `rows`."""
        return [
            operand[:, rows] if operand is not None and index in QUERY_SIDE else operand
            for index, operand in enumerate(operands)
        ]

    @torch.no_grad()
    def forward(self, *inputs) -> torch.Tensor:
        """The attention output for `(query, key, value, *core_parameters())`, chunk by chunk, without autograd."""
        operands = self.operands(*inputs[:OPERAND_INPUTS])
        query, key, _, rel_h, rel_w = operands
        self.calibrate_probabilities(query, key, rel_h, rel_w)
        elements = self.probability_elements(query, key)
        outputs = [self.rows_output(*self.rows_of(rows, *operands), *inputs[OPERAND_INPUTS:], elements) for rows in self.chunks()]
        return torch.cat(outputs, dim=1)

    def backward(self, leaves: list, grad_output: torch.Tensor) -> list:
        """The gradients of the inputs (`leaves`, detached, requiring grad where needed) given that of the output.

        The operands are recomputed under autograd (a graph of `tokens x head_dim` tensors), then each chunk is
        recomputed and differentiated on its own: the gradients of its query rows are written into the query side's,
        those of the keys, values and probability step and offset are added up.
        """
        operands = self.operands(*leaves[:OPERAND_INPUTS])
        needs_grad = [operand is not None and operand.requires_grad for operand in operands]
        operand_leaves = detached_leaves(operands, needs_grad)
        probs_tables = leaves[OPERAND_INPUTS:]
        elements = self.probability_elements(operands[0], operands[1])
        operand_grads = [
            torch.zeros_like(leaf) if leaf is not None and leaf.requires_grad and index in QUERY_SIDE else None
            for index, leaf in enumerate(operand_leaves)
        ]
        table_grads = [None, None]
        for rows in self.chunks():
            chunk_leaves = detached_leaves(self.rows_of(rows, *operand_leaves), needs_grad)
            output = self.rows_output(*chunk_leaves, *probs_tables, elements)
            chunk_grads = gradients_of(
                output, chunk_leaves + list(probs_tables), grad_output[:, rows].to(output.dtype)
            )
            for index, grad in enumerate(chunk_grads[:5]):
                if grad is None:
                    continue
                if index in QUERY_SIDE:
                    operand_grads[index][:, rows] = grad
                else:
                    operand_grads[index] = grad if operand_grads[index] is None else operand_grads[index].add_(grad)
            for index, grad in enumerate(chunk_grads[5:]):
                if grad is not None:
                    table_grads[index] = grad if table_grads[index] is None else table_grads[index] + grad
            del output, chunk_grads, chunk_leaves
        grads = gradients_of(operands, leaves, operand_grads)
        return grads[:OPERAND_INPUTS] + table_grads


class ChunkedAttention(torch.autograd.Function):
    """A [`ChunkedAttentionCore`] under autograd: keeps only its inputs, recomputes chunk by chunk in backward.

    Call as `ChunkedAttention.apply(core, query, key, value, *core_parameters())`.
    """

    @staticmethod
    def forward(ctx, core: ChunkedAttentionCore, *inputs):
        ctx.core, ctx.autocast = core, autocast_state(inputs[0].device.type)
        ctx.save_for_backward(*inputs)
        return core.forward(*inputs)

    @staticmethod
    def backward(ctx, grad_output):
        leaves = detached_leaves(ctx.saved_tensors, ctx.needs_input_grad[1:])
        device_type, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            grads = ctx.core.backward(leaves, grad_output)
        return None, *grads


__all__ = ["ChunkedAttention", "ChunkedAttentionCore", "query_chunk_rows"]
