"""Weight-only quantization of linear layers: int8 per output channel (symmetric) and int4 in
groups of input channels (asymmetric min-max), as in gpt-fast and GPTQ-style checkpoints.

`quantize_weights(model, spec)` replaces the model's nn.Linear layers by QuantLinear modules that
hold packed integers plus scales and compute in the activations' dtype. On the CPU, int8 uses
PyTorch's fused `_weight_int8pack_mm`; elsewhere int8 multiplies by the integer weights cast to
the activations' dtype and scales each output channel afterwards (the form gpt-fast hands to
torch.compile), and int4 is dequantized for each call (memory shrinks; speed is that of a
dequantize plus a dense matmul).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .packing import pack_bits, unpack_bits
from .quantizers import minmax_decode, minmax_encode, minmax_params
from .spec import WeightSpec, parse_weights


# Rows of a weight at most this many (decode steps) go through PyTorch's fused CPU kernels; a
# prefill's many rows are faster through one dequantize and a dense matmul.
FUSED_MAX_ROWS = 4


def unpack_cpu_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Codes [N, K] (uint8) from the layout of `_convert_weight_to_int4pack_for_cpu`: blocks of
    `block` output rows (cpu_int4_block: 64 with AVX-512, 32 with AVX2), each k-major, with row j in
    the low and row j + block/2 in the high nibble of byte j; a last, shorter block pairs rows 2j
    (low) and 2j + 1 (high). Tested against the converter."""
    block = cpu_int4_block()
    flat = packed.reshape(-1)
    full = n // block
    head = flat[:full * block // 2 * k].view(full, k, block // 2)  # [blocks, K, block/2]
    rows = torch.cat([head & 15, head >> 4], dim=2).permute(0, 2, 1).reshape(full * block, k)  # [block * blocks, K]
    tail = n - full * block
    if tail:
        t = flat[full * block // 2 * k:].view(k, tail // 2)  # [K, tail/2]
        rows = torch.cat([rows, torch.stack([t & 15, t >> 4], dim=2).reshape(k, tail).T])
    return rows


def cpu_int4_block() -> int:
    """The rows per block of this CPU's `_convert_weight_to_int4pack_for_cpu` (its layout follows
    the kernel PyTorch dispatches to): found by packing a probe whose rows 16i..16i+15 hold the
    code i, so that the first byte pairs row 0 with row block/2, whose code is block/32."""
    probe = (torch.arange(64, dtype=torch.int32) // 16)[:, None].expand(64, 64).contiguous()
    return 32 * (int(torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).reshape(-1)[0]) >> 4)


def _cpu_int4_kernel(w: torch.Tensor, group: int) -> bool:
    """Whether PyTorch's CPU int4 matmul takes this weight [N, K] and group."""
    return (w.device.type == "cpu" and group in (32, 64, 128, 256) and w.shape[0] % 16 == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


class QuantLinear(nn.Module):
    """y = x W^T + b with W [N, K] stored as int8 [N, K] + scale [N], or as int4, two codes a
    byte [N, K/2], + scale and min [N, K/group]. On the CPU, where its kernel takes the shape, int4
    is stored in the layout of `_weight_int4pack_mm_for_cpu` instead (same bytes; scale and
    zero = min + 8 * scale as [K/group, N, 2]). `splits` (from FusedLinear) keeps forward_split."""

    def __init__(self, linear: nn.Linear, spec: WeightSpec):
        super().__init__()
        w = linear.weight.detach()  # [N, K]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group = spec.bits, spec.group
        self.splits = list(getattr(linear, "splits", [self.out_features]))
        dtype = w.dtype
        if self.bits == 8:
            scale = w.float().abs().amax(-1).clamp(min=1e-12) / 127  # [N]
            q = (w.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale.to(dtype))
        else:
            if self.in_features % self.group:
                raise UserError(f"int4 group {self.group} does not divide a layer's {self.in_features} input "
                                f"features; choose an even divisor of {self.in_features}")
            wg = w.float().view(self.out_features, -1, self.group)  # [N, K/G, G]
            scale, mn = minmax_params(wg, -1, 4)  # [N, K/G, 1]
            codes = minmax_encode(wg, scale, mn, 4).view(self.out_features, self.in_features)
            self.cpu_kernel = _cpu_int4_kernel(w, self.group)
            if self.cpu_kernel:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)  # [N, K/2]
                self.register_buffer("qweight", packed)
                zero = mn + 8 * scale  # the kernel computes (q - 8) * scale + zero
                self.register_buffer("scale_zero", torch.stack([scale[..., 0].T, zero[..., 0].T], -1).to(dtype))
            else:
                self.register_buffer("qweight", pack_bits(codes, 4))  # [N, K/2]
                self.register_buffer("scale", scale[..., 0].to(dtype))
                self.register_buffer("minimum", mn[..., 0].to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        """The weight [N, K] as the layer computes with it, in the scales' dtype."""
        if self.bits == 8:
            return (self.qweight.float() * self.scale.float()[:, None]).to(self.scale.dtype)
        if self.cpu_kernel:
            codes = unpack_cpu_int4(self.qweight, self.out_features, self.in_features)
            codes = codes.view(self.out_features, -1, self.group).float() - 8  # [N, K/G, G]
            sz = self.scale_zero.float().transpose(0, 1)  # [N, K/G, 2]
            w = codes * sz[..., :1] + sz[..., 1:]
            return w.view(self.out_features, self.in_features).to(self.scale_zero.dtype)
        codes = unpack_bits(self.qweight, 4, self.in_features).view(self.out_features, -1, self.group)
        w = minmax_decode(codes, self.scale[..., None], self.minimum[..., None])
        return w.view(self.out_features, self.in_features).to(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [M, K]
        fused = flat.shape[0] <= FUSED_MAX_ROWS and x.device.type == "cpu"
        if self.bits == 8 and fused and x.dtype == self.scale.dtype:
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scale)
        elif self.bits == 4 and fused and self.cpu_kernel:
            y = self._int4_cpu(flat.to(self.scale_zero.dtype)).to(x.dtype)
        elif self.bits == 8:  # integer weights in the activations' dtype, then each output's scale: no
            y = F.linear(flat, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)  # float32 copy of W
        else:
            y = F.linear(flat, self.dequantize().to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def _int4_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x W^T [M, N] with PyTorch's CPU int4 kernel."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, self.group, self.scale_zero)

    def forward_split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self(x).split(self.splits, dim=-1)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.bits == 4 else ""
        return f"in={self.in_features}, out={self.out_features}, int{self.bits}{group}"


def quantize_weights(model: nn.Module, spec: str | WeightSpec | None) -> nn.Module:
    """Replace the linear layers of the language model (the output head excepted) by QuantLinear;
    with the spec's vision=1 also those of the vision tower and the projector. Returns the model."""
    spec = parse_weights(spec)
    if spec is None:
        return model
    roots = ["language_model"] + (["vision_tower", "multi_modal_projector"] if spec.vision else [])
    for root in roots:
        _replace(model.get_submodule(root), spec)
    return model


def _replace(module: nn.Module, spec: WeightSpec) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, QuantLinear(child, spec))
        else:
            _replace(child, spec)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (a tied weight counted once)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
