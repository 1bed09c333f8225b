"""Recomputation in the backward pass: an operation that keeps only its inputs, never its intermediate tensors.

Fake quantization multiplies the tensors autograd keeps: each quantizer keeps its raw input and the operation after
it the quantized copy. The functions here run an operation without autograd in the forward pass, keep its inputs, and
run it again under autograd in the backward pass, where the gradients come out exactly as plain autograd's would.
"""

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


def detached_leaves(tensors, needs_grad) -> list:
    """Detached copies of saved tensors for a recomputation, requiring grad where the caller needs it."""
    return [
        None if tensor is None else tensor.detach().requires_grad_(needs) for tensor, needs in zip(tensors, needs_grad)
    ]


def gradient_edge(tensor: torch.Tensor) -> torch.Tensor | GradientEdge | None:
    """Where `tensor` sits in the autograd graph, without its values: what `gradients_of` needs of an output, so that
    a caller can free a large output before its backward runs. `None` if nothing requires grad; a leaf (which has no
    node of its own to start from) is returned as it is."""
    if not tensor.requires_grad:
        return None
    return tensor if tensor.grad_fn is None else get_gradient_edge(tensor)


def gradients_of(outputs, leaves: list, grad_outputs) -> list:
    """Gradients of `outputs` (given `grad_outputs`) for the `leaves` that require grad, `None` for the others.

    `outputs` is a tensor, a `gradient_edge` or a sequence of them (with as many `grad_outputs`); an output that is
    `None`, requires no grad or has no gradient given is left out.
    """
    if outputs is None or isinstance(outputs, (torch.Tensor, GradientEdge)):
        outputs, grad_outputs = [outputs], [grad_outputs]
    given = [
        (output, grad)
        for output, grad in zip(outputs, grad_outputs)
        if output is not None and grad is not None and (not isinstance(output, torch.Tensor) or output.requires_grad)
    ]
    wanted = [index for index, leaf in enumerate(leaves) if leaf is not None and leaf.requires_grad]
    grads = [None] * len(leaves)
    if wanted and given:
        roots, root_grads = zip(*given)
        found = torch.autograd.grad(roots, [leaves[index] for index in wanted], root_grads, allow_unused=True)
        for index, grad in zip(wanted, found):
            grads[index] = grad
    return grads


def autocast_state(device_type: str) -> tuple:
    """The autocast settings in force, to run a recomputation as the forward pass ran."""
    return device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)


class RecomputedFunction(torch.autograd.Function):
    """`fn(*inputs)` that keeps only `inputs` for the backward pass and recomputes `fn` there under autograd.

    `fn` must be deterministic (no dropout) and return one tensor; it takes tensors (or `None`) only, and every
    tensor it depends on must be among `inputs`, so that its gradient is computed. Used for the quantized attention
    core (`QuantizedSamVisionAttention`), whose queries, keys, values, probabilities and their quantized copies
    would otherwise all stay alive until backward.

    Call as `RecomputedFunction.apply(fn, *inputs)`.
    """

    @staticmethod
    def forward(ctx, fn, *inputs):
        device = next(tensor for tensor in inputs if tensor is not None).device
        ctx.fn, ctx.autocast = fn, autocast_state(device.type)
        ctx.save_for_backward(*inputs)
        return fn(*inputs)

    @staticmethod
    def backward(ctx, grad_output):
        leaves = detached_leaves(ctx.saved_tensors, ctx.needs_input_grad[1:])
        device_type, dtype, enabled = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            output = ctx.fn(*leaves)
        return None, *gradients_of(output, leaves, grad_output.to(output.dtype))


__all__ = ["RecomputedFunction", "autocast_state", "detached_leaves", "gradient_edge", "gradients_of"]
