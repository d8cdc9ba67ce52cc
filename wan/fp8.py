"""FP8 teacher linears (`--teacher.fp8`): the DiT blocks' matmuls in float8 e4m3, scaled per row or per tensor.

`quantize_dit(model)` replaces, in place, every `nn.Linear` inside the transformer blocks (self- and
cross-attention q/k/v/o, the FFN's two layers: all but ~0.1% of the expert's FLOPs) by an
`Fp8Linear`. Each weight row (output channel) is scaled so that its largest magnitude maps to
e4m3's largest finite value (448) and stored in float8 with its float32 scale: half the bytes of
bf16. At run time each activation row (token) is scaled the same way, and the product runs on the
FP8 tensor cores through `torch._scaled_mm` with both scales applied to its float32 accumulator.
The embeddings, time projection, modulation and head stay as they are, and so does attention. With
row scaling the FFN's tanh GELU, and the bias of the layer before it, move into the quantisation of
its second layer's input: one pass on the GPU (`gelu_quantize_rows`, a Triton kernel), the same
numbers as the separate ops elsewhere.

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

__all__ = ["FP8_DTYPE", "SCALINGS", "Fp8Linear", "fp8_linear_reference", "gelu_quantize_rows",
           "gelu_quantize_rows_reference", "has_fp8_matmul", "quantize_dit", "quantize_rows", "quantize_tensor"]

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


def gelu_quantize_rows_reference(x: torch.Tensor,
                                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows(gelu(x + bias))`, the sum and the tanh GELU in x's dtype: the FFN's first bias, its
    activation and the quantisation of its second layer's input, as the unfused layers compute them."""
    if bias is not None:
        x = x + bias.to(x.dtype)
    return quantize_rows(torch.nn.functional.gelu(x, approximate="tanh"))


_TRITON_KERNEL = None


def _gelu_quantize_kernel():
    """The Triton kernel of `gelu_quantize_rows` on CUDA, built on first use (Triton is not on CPU builds)."""
    global _TRITON_KERNEL
    if _TRITON_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def gelu_quantize_rows_kernel(x_ptr, b_ptr, q_ptr, s_ptr, n_cols, stride_x, stride_q, HAS_BIAS: tl.constexpr,
                                      FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
            # one row per program, held in registers: read once, written once
            row = tl.program_id(0).to(tl.int64)
            cols = tl.arange(0, BLOCK)
            mask = cols < n_cols
            x_in = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
            if HAS_BIAS:  # rounded to x's dtype, as x + bias would be
                x_in = (x_in.to(tl.float32) + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(x_in.dtype)
            x = x_in.to(tl.float32)
            # tanh GELU as torch computes it (float32), tanh(z) = 1 - 2 / (exp(2z) + 1), then rounded to x's dtype
            z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
            g = (0.5 * x * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))).to(x_in.dtype).to(tl.float32)
            amax = tl.max(tl.where(mask, tl.abs(g), 0.0), axis=0)
            scale = tl.where(amax > 0, tl.math.div_rn(amax, FP8_MAX), 1.0)
            # times the reciprocal: an exact division per element measured 1.8x slower (H100, 8192 x 13824)
            q = tl.clamp(g * tl.math.div_rn(1.0, scale), -FP8_MAX, FP8_MAX)
            tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
            tl.store(s_ptr + row, scale)

        _TRITON_KERNEL = (triton, gelu_quantize_rows_kernel)
    return _TRITON_KERNEL


@torch.library.custom_op("wan_fp8::gelu_quantize_rows", mutates_args=())
def gelu_quantize_rows(x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K], bias [K] or None -> (gelu(x + bias) / scale in float8 e4m3 [M, K], scale [M, 1] float32):
    what `gelu_quantize_rows_reference` computes, in one pass on an FP8 GPU (a Triton kernel, each row read
    once; Inductor's fused GELU + row maximum + scaling read the FFN's widest activation twice and
    computed its GELU twice: 0.48 ms of the block's 6.7 ms on an H100 at 1024x1024 batch 2, this kernel
    0.15 ms alone), elsewhere the reference. The kernel scales by the reciprocal of the row's scale and
    computes tanh from exp: 0.03-0.07% of the codes differ from the reference's, by one step.
    An opaque op to torch.compile: the compiled block calls it as it is."""
    if not (x.is_cuda and has_fp8_matmul(x.device)):
        return gelu_quantize_rows_reference(x, bias)
    triton, kernel = _gelu_quantize_kernel()
    x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), device=x.device, dtype=FP8_DTYPE)
    scale = torch.empty((rows, 1), device=x.device, dtype=torch.float32)
    block = triton.next_power_of_2(cols)
    warps = max(4, min(32, block // 512))  # 16 values per thread at most
    with torch.cuda.device(x.device):
        kernel[(rows,)](x, x if bias is None else bias.contiguous(), q, scale, cols, x.stride(0), q.stride(0),
                        HAS_BIAS=bias is not None, FP8_MAX=_FP8_MAX, BLOCK=block, num_warps=warps)
    return q, scale


@gelu_quantize_rows.register_fake
def _(x, bias=None):
    return x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty((x.shape[0], 1), dtype=torch.float32)


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
                 fast_accum: bool = False, input_gelu: bool = False, input_bias: torch.Tensor | None = None):
        """`work_device`: the device the layer will run on (default: where `linear`'s weight is); the
        scales are computed there, the quantised weight stays where `linear`'s weight is, and whether
        `torch._scaled_mm` runs is decided for it once, here (not per call, inside compiled graphs).
        `scaling`: "row" or "tensor"; `fast_accum`: the kernel's reduced-precision accumulation;
        `input_gelu`: apply the FFN's tanh GELU to the input first, in one pass with its quantisation
        (`gelu_quantize_rows`; row scaling only), for the layer after a GELU the caller drops;
        `input_bias`: with input_gelu, the bias of the layer before, added to the input before the GELU
        in the same pass (the caller drops it there: torch.compile would otherwise add it in a pass of
        its own before the opaque op; in the FP8 product's epilogue it made the products 1.9 ms per forward slower)."""
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"FP8 scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        if input_gelu and scaling != "row":
            raise ValueError("input_gelu fuses the GELU with row-wise quantisation: use scaling='row'")
        if input_bias is not None and not input_gelu:
            raise ValueError("input_bias is added in the pass of input_gelu: set input_gelu=True")
        self.scaling, self.fast_accum, self.input_gelu = scaling, bool(fast_accum), bool(input_gelu)
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
        self.register_buffer("input_bias", None if input_bias is None else input_bias.detach().clone())

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, K] in float8 with its scale(s), as this layer scales: `quantize_rows` or `quantize_tensor`."""
        return quantize_rows(x) if self.scaling == "row" else quantize_tensor(x)

    def extra_repr(self) -> str:
        kernel = "torch._scaled_mm" if self.use_kernel else "float32 reference"
        accum = ", fast accumulation" if self.fast_accum else ""
        gelu = ""
        if self.input_gelu:
            gelu = ", the previous layer's bias and" if self.input_bias is not None else ","
            gelu += " tanh GELU of the input first"
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 {self.scaling}-wise"
                f"{accum}{gelu}, {kernel}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        out_dtype = (torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type)
                     else self.compute_dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        xq, x_scale = gelu_quantize_rows(x2, self.input_bias) if self.input_gelu else self.quantize(x2)
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
    `Fp8Linear`'s. With row scaling, a tanh GELU between two linear layers of an `nn.Sequential` (the
    FFN) moves into the second one with the first one's bias (`input_gelu`, `input_bias`: one pass for
    the bias, the activation and its quantisation) and leaves an `nn.Identity` in its place.

    Raises ValueError for a model whose parameters FSDP has sharded (DTensors)."""
    count = 0
    moved_bias = None  # the bias of a layer before a fused GELU, for the layer after it
    for block in model.blocks:
        for name, module in list(block.named_modules()):
            children = list(module.named_children())
            for index, (child_name, child) in enumerate(children):
                if not isinstance(child, nn.Linear):
                    continue
                if type(child.weight).__name__ == "DTensor":
                    raise ValueError("--teacher.fp8 quantises whole weight matrices and this expert is sharded by "
                                     "FSDP: run the FP8 teacher unsharded (one GPU per teacher, --teacher.offload)")
                near = [children[index + k][1] if 0 <= index + k < len(children) else None for k in (-1, 1, 2)]
                gelu_before, gelu_after = (scaling == "row" and isinstance(module, nn.Sequential)
                                           and isinstance(g, nn.GELU) and g.approximate == "tanh" for g in near[:2])
                gelu_after = gelu_after and isinstance(near[2], nn.Linear)  # a layer to take the bias
                if gelu_before:
                    setattr(module, children[index - 1][0], nn.Identity())
                # decides the kernel for work_device
                layer = Fp8Linear(child, work_device, scaling=scaling, fast_accum=fast_accum, input_gelu=gelu_before,
                                  input_bias=moved_bias if gelu_before else None)
                moved_bias = None
                if gelu_after:  # its bias moves into the next layer's fused pass
                    moved_bias, layer.bias = layer.bias, None
                setattr(module, child_name, layer)
                count += 1
    return count
