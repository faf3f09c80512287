"""8-bit weights that safetensors can hold: row-wise affine quantization of 2-D float tensors.

Each row r of a [R, C] weight keeps its own minimum m_r and step s_r = (max_r - m_r) / 255 (both
float16) and becomes uint8 codes q = round((w - m_r) / s_r); w' = q * s_r + m_r. Row-wise because embedding
rows (items, n-grams) differ in scale by orders of magnitude; one scale per tensor would flatten
the rare rows to zero. Stored as three plain tensors per weight (`NAME.q8`, `NAME.scale`,
`NAME.min`), so a bundle stays a safetensors file with no pickled quantized modules.

At load the weights are dequantized to float32: the student's matrices are 32-192 wide, and at
that size torch's dynamic int8 Linear measured slower than float32 here (the activations' own
quantization costs more than the narrower matmul saves), so 8 bits buys a 4x smaller file and
memory footprint on disk, not faster arithmetic.
"""
from __future__ import annotations

import torch

SUFFIXES = (".q8", ".scale", ".min")


def quantizable(name: str, t: torch.Tensor) -> bool:
    """2-D float weights at least 8 wide (narrower rows would cost more in scale/min than they save)."""
    return t.is_floating_point() and t.ndim == 2 and t.shape[1] >= 8


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[R, C] float -> (codes uint8 [R, C], scale float16 [R], min float16 [R]).

    Scale and minimum are float16: for the 32-wide text table, float32 ones would add 25% to the
    codes (8 bytes a row against 32). The codes are computed against the float16-rounded minimum
    and step, so every entry still comes back within half a step."""
    w = w.detach().float()
    lo = w.min(1).values.half().float()
    scale = ((w.max(1).values - lo) / 255).clamp(min=1e-6).half().float()
    codes = ((w - lo[:, None]) / scale[:, None]).round().clamp(0, 255).to(torch.uint8)
    return codes, scale.half(), lo.half()


def dequantize(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[:, None] + lo.float()[:, None]


NARROW = {".i8": torch.int8, ".i16": torch.int16, ".i32": torch.int32}


def narrow_ints(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int64 buffers (item categories, kept text rows, item bags) in the narrowest signed type
    that holds them, as `NAME.i8|.i16|.i32`; everything else unchanged."""
    out = {}
    for name, t in state.items():
        if t.dtype != torch.int64:
            out[name] = t
            continue
        top = int(t.abs().max()) if t.numel() else 0
        suffix = next((s for s, d in NARROW.items() if top <= torch.iinfo(d).max), None)
        out[name + suffix if suffix else name] = t.to(NARROW[suffix]) if suffix else t
    return out


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with every quantizable weight replaced by its three tensors, and int64 buffers
    narrowed (`narrow_ints`)."""
    out = {}
    for name, t in state.items():
        if quantizable(name, t):
            out[name + ".q8"], out[name + ".scale"], out[name + ".min"] = quantize(t)
        else:
            out[name] = t
    return narrow_ints(out)


def dequantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `quantize_state` and `narrow_ints` (a float state dict passes through unchanged)."""
    out = {}
    for name, t in state.items():
        if name.endswith(".q8"):
            base = name[:-3]
            out[base] = dequantize(t, state[base + ".scale"], state[base + ".min"])
        elif name.endswith(tuple(NARROW)) and t.dtype in NARROW.values():
            out[name.rsplit(".", 1)[0]] = t.to(torch.int64)
        elif not name.endswith((".scale", ".min")) or name.rsplit(".", 1)[0] + ".q8" not in state:
            out[name] = t
    return out


def is_quantized(state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(".q8") for k in state)
