"""FP8 teacher linears (`--teacher.fp8`): the DiT blocks' matmuls in float8 e4m3, scaled per row or per tensor.

`quantize_dit(model)` replaces, in place, every `nn.Linear` inside the transformer blocks (self- and
cross-attention q/k/v/o, the FFN's two layers: all but ~0.1% of the expert's FLOPs) by an
`Fp8Linear`. Each weight row (output channel) is scaled so that its largest magnitude maps to
e4m3's largest finite value (448) and stored in float8 with its float32 scale: half the bytes of
bf16. At run time each activation row (token) is scaled the same way, and the product runs on the
FP8 tensor cores through `torch._scaled_mm` with both scales applied to its float32 accumulator.
The embeddings, time projection, modulation and head stay as they are, and so does attention.

Two scalings (`scaling=`, `--teacher.fp8_scaling`): "row" (the default) as above, every token and
every output channel with its own scale, so a sample's outputs do not depend on the rest of its
batch; "tensor": one scale for the whole weight and one for the whole activation (batch included),
cuBLASLt's plain FP8 product. `fast_accum=True` (`--teacher.fp8_fast_accum`) lets the tensor cores
keep their partial sums in reduced precision between promotions: faster, less exact.

`torch._scaled_mm` also runs on the CPU (float32 output there, equal to the float32 product of the
quantised operands), so the CPU tests go through the same call as a GPU run. A GPU without FP8
matmuls (before Ada / Hopper) multiplies the same quantised operands in float32
(`fp8_linear_reference`): the numbers FP8 gives, without its speed. A GPU test checks cuBLASLt's
kernel against that reference.

Quantise after loading and before `wan.compile.compile_dit` (Inductor fuses the activation scaling
into the op before each matmul). A sharded expert (FSDP) keeps bf16: its parameters are DTensors that
FSDP gathers per block, which this module does not rewrite.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FP8_DTYPE", "SCALINGS", "Fp8Linear", "fp8_linear_reference", "has_fp8_matmul", "quantize_dit",
           "quantize_rows", "quantize_tensor"]

FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_ALIGN = 16  # cuBLASLt's FP8 matmul wants every dimension a multiple of 16
SCALINGS = ("row", "tensor")


def has_fp8_matmul(device: torch.device) -> bool:
    """Whether `device` runs `torch._scaled_mm`: the CPU, or CUDA compute capability 8.9 or newer
    (Ada, Hopper, ...)."""
    device = torch.device(device)
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _to_e4m3(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x / scale in float8 e4m3 and scale = amax / 448 (1 where amax is 0: those values quantise to 0)."""
    scale = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_DTYPE), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x / scale in float8 e4m3 [M, K], scale [M, 1] float32), scale = max|row| / 448.

    An all-zero row gets scale 1 (its quantised values are 0 either way)."""
    return _to_e4m3(x, x.detach().abs().amax(dim=-1, keepdim=True).float())


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x / scale in float8 e4m3 [M, K], scale [] float32), scale = max|x| / 448 (1 for all zeros)."""
    return _to_e4m3(x, x.detach().abs().amax().float())


def fp8_linear_reference(xq, x_scale, wq, w_scale, bias, out_dtype) -> torch.Tensor:
    """What `torch._scaled_mm` computes, in float32: (xq * x_scale) @ (wq * w_scale)^T + bias (scales [M, 1] and
    [N, 1], or scalars)."""
    out = (xq.float() * x_scale) @ (wq.float() * w_scale).t()  # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


class Fp8Linear(nn.Module):
    """A frozen `nn.Linear` with its weight in float8 e4m3 and float32 scales: one per output row
    (scaling "row") or one for the matrix ("tensor"); activations are scaled the same way at run time.

    The output dtype is the one the replaced layer would have produced: the autocast dtype under
    autocast, else `compute_dtype` (the original weight's dtype)."""

    def __init__(self, linear: nn.Linear, work_device: torch.device | None = None, *, scaling: str = "row",
                 fast_accum: bool = False):
        """`work_device`: the device the layer will run on (default: where `linear`'s weight is); the
        scales are computed there, the quantised weight stays where `linear`'s weight is, and whether
        `torch._scaled_mm` runs is decided for it once, here (not per call, inside compiled graphs).
        `scaling`: "row" or "tensor"; `fast_accum`: the kernel's reduced-precision accumulation."""
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"FP8 scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        self.scaling, self.fast_accum = scaling, bool(fast_accum)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        home = linear.weight.device
        run = torch.device(work_device or home)
        aligned = run.type != "cuda" or (self.in_features % _ALIGN == 0 and self.out_features % _ALIGN == 0)
        self.use_kernel = has_fp8_matmul(run) and aligned
        with torch.no_grad():
            weight, scale = self.quantize(linear.weight.to(work_device or home))  # [out, in], [out, 1] or []
        self.register_buffer("weight_fp8", weight.to(home))
        self.register_buffer("weight_scale", scale.t().contiguous().to(home))  # [1, out] or []: _scaled_mm's scale_b
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] in float8 with its scale(s), as this layer scales: `quantize_rows` or `quantize_tensor`."""
        return quantize_rows(x) if self.scaling == "row" else quantize_tensor(x)

    def extra_repr(self) -> str:
        kernel = "torch._scaled_mm" if self.use_kernel else "float32 reference"
        accum = ", fast accumulation" if self.fast_accum else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 {self.scaling}-wise"
                f"{accum}, {kernel}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        out_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else self.compute_dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        xq, x_scale = self.quantize(x2)
        cuda = x.device.type == "cuda"
        if self.use_kernel:
            rows = x2.shape[0]
            pad = -rows % _ALIGN if cuda else 0
            if pad:  # zero rows (scale 1) to a multiple of 16, dropped after
                xq = torch.cat([xq, xq.new_zeros(pad, self.in_features)])
                if self.scaling == "row":
                    x_scale = torch.cat([x_scale, x_scale.new_ones(pad, 1)])
            # the row-wise kernel writes bf16 only (so does this for both scalings); the CPU one any float dtype
            kernel_dtype = torch.bfloat16 if cuda else out_dtype
            out = torch._scaled_mm(xq, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                   out_dtype=kernel_dtype, use_fast_accum=self.fast_accum)  # [M (+ pad), out]
            out = out[:rows]
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
            out = out.to(out_dtype)
        else:
            out = fp8_linear_reference(xq, x_scale, self.weight_fp8, self.weight_scale.t(), self.bias, out_dtype)
        return out.reshape(*lead, self.out_features)


def quantize_dit(model: nn.Module, work_device: torch.device | None = None, *, scaling: str = "row",
                 fast_accum: bool = False) -> int:
    """Replace every `nn.Linear` inside `model.blocks` by an `Fp8Linear`, in place; returns how many.
    `work_device`: the device the model will run on (default: where its weights are now); the scales
    are computed there one matrix at a time, wherever the weights live. `scaling`, `fast_accum`: as
    `Fp8Linear`'s.

    Raises ValueError for a model whose parameters FSDP has sharded (DTensors)."""
    count = 0
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            for child_name, child in list(module.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if type(child.weight).__name__ == "DTensor":
                    raise ValueError("--teacher.fp8 quantises whole weight matrices and this expert is sharded by "
                                     "FSDP: run the FP8 teacher unsharded (one GPU per teacher, --teacher.offload)")
                # decides the kernel for work_device
                setattr(module, child_name, Fp8Linear(child, work_device, scaling=scaling, fast_accum=fast_accum))
                count += 1
    return count
