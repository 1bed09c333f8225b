"""Packing signed integer codes of 2 to 8 bits into a byte stream, so that stored weights shrink with their bits.

Layout: each code is offset to an unsigned value (`code - q_min`, in `[0, 2^bits - 1]`) and its `bits` bits are laid
end to end, least significant bit first, code after code; byte `k` holds bits `8k` to `8k + 7` of that stream, least
significant first, and the last byte is padded with zeros. `n` codes of `bits` bits take `ceil(n * bits / 8)` bytes:
a quarter of int8's bytes at 2 bits, 3/8 at 3 bits. The layout does not depend on the tensor's shape, which the
reader supplies (a subnet derives it from its configuration).
"""

import math

import torch

from .quantization import integer_range

PACKABLE_BITS = range(2, 9)


def _check_bits(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"Codes of {bits!r} bits cannot be packed; allowed bit-widths: {list(PACKABLE_BITS)}.")


def packed_size(num_codes: int, bits: int) -> int:
    """The number of bytes that `num_codes` codes of `bits` bits take once packed."""
    _check_bits(bits)
    return math.ceil(num_codes * bits / 8)


def _bits_of(values: torch.Tensor, width: int) -> torch.Tensor:
    """The `width` lowest bits of each (non-negative) value, least significant first: shape `(*values.shape, width)`."""
    shifts = torch.arange(width, dtype=values.dtype, device=values.device)
    return (values.unsqueeze(-1) >> shifts) & 1


def _from_bits(bits: torch.Tensor) -> torch.Tensor:
    """The integers whose bits, least significant first, run along the last dimension of `bits` (int32)."""
    weights = 2 ** torch.arange(bits.shape[-1], dtype=torch.int32, device=bits.device)
    return (bits.to(torch.int32) * weights).sum(dim=-1, dtype=torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs signed integer codes of `bits` bits into a 1-D `uint8` tensor of `packed_size(codes.numel(), bits)` bytes.

    Args:
        codes (`torch.Tensor`): integer codes of any shape, each in `[-2^(bits-1), 2^(bits-1) - 1]`; they are read
            in row-major order.
        bits (`int`): the bit-width, 2 to 8.
    """
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"Only integer codes can be packed, got a tensor of {codes.dtype}.")
    q_min, q_max = integer_range(bits, signed=True)
    if codes.numel() and (int(codes.min()) < q_min or int(codes.max()) > q_max):
        low, high = int(codes.min()), int(codes.max())
        raise ValueError(f"Codes range over [{low}, {high}], outside the {bits}-bit range [{q_min}, {q_max}].")
    unsigned = (codes.reshape(-1).to(torch.int16) - q_min).to(torch.uint8)
    stream = _bits_of(unsigned, bits).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, packed_size(codes.numel(), bits) * 8 - stream.numel()))
    return _from_bits(stream.reshape(-1, 8)).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Reads back the `int8` codes that [`pack_codes`] packed, with the given shape.

    Args:
        packed (`torch.Tensor`): the 1-D `uint8` byte stream.
        bits (`int`): the bit-width the codes were packed at.
        shape (`tuple[int]`): the shape of the codes.
    """
    num_codes = math.prod(shape)
    expected = packed_size(num_codes, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"{num_codes} codes of {bits} bits need a 1-D uint8 tensor of {expected} bytes; got {packed.dtype} of "
            f"shape {tuple(packed.shape)}."
        )
    stream = _bits_of(packed, 8).reshape(-1)[: num_codes * bits]
    q_min, _ = integer_range(bits, signed=True)
    return (_from_bits(stream.reshape(num_codes, bits)) + q_min).to(torch.int8).reshape(shape)
