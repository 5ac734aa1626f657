"""CPU kernels for the models' linear layers, chosen per machine (``model.cpu_kernels``).

- ``default``: torch's own path (``F.linear``: MKL sgemm in fp32, oneDNN matmul in bf16, unpacked weights).
- ``onednn``: every ``nn.Linear`` (LM head included) reads a weight reordered once into oneDNN's blocked
  layout (``torch.ops.mkldnn._reorder_linear_weight``) through ``torch.ops.mkldnn._linear_pointwise``, the
  kernel inductor itself emits for frozen CPU linears. On CPUs torch's default fp32 path costs 2-4x more
  at 5-9 rows (a verify pass) than at 1 row (a draft step); the packed weight keeps the verify pass close
  to a single step (``scripts/bench_kernels.py``, ``docs/benchmarks.md``).
- ``auto``: on a CPU with oneDNN, time both on one of the model's own MLP weights at 1 and 5 rows and keep
  the faster; anywhere else (CUDA, no oneDNN) ``default``.

Same model outputs up to fp32 rounding: oneDNN sums in another order, so logits differ by ~1e-6 relative
(``tests/test_kernels.py`` bounds it and checks that greedy tokens on the tiny pair do not change).

``model.draft.quantize=int8`` (:func:`quantize_int8`) is another matter: the draft's linears keep int8
weights (per output channel) and quantize their input per token (:class:`Int8Linear`, fbgemm's dynamic int8
linear, x86 CPUs). A draft step reads a quarter of the bytes, and on an AVX2 CPU in fp32 it ran ~5x faster;
the draft's proposals change a little (teacher-forced on the real pair its top-1 missed the target's at 9.7 %
of positions, the fp32 draft's at 8.7 %), so accepted lengths and what the rules accept shift, while lossless
SD still returns the target's own tokens.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CPU_KERNELS = ("auto", "default", "onednn")
QUANTIZE = (None, "int8")


class OneDNNLinear(torch.nn.Module):
    """An ``nn.Linear`` whose weight is packed once for oneDNN (CPU only; inference only)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # the packed weight is an opaque oneDNN tensor of the same shape: a buffer, not a parameter
        self.register_buffer("weight", pack_weight(linear.weight.detach()), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


@functools.cache
def onednn_supports(dtype: torch.dtype) -> str | None:
    """None when oneDNN packs and multiplies ``dtype`` linears on this CPU; else oneDNN's reason (its bf16
    path needs avx512bw/vl/dq or avx_ne_convert: an AVX2-only CPU has none)."""
    try:
        onednn_linear(torch.zeros(2, 16, dtype=dtype), pack_weight(torch.zeros(16, 16, dtype=dtype)))
    except RuntimeError as err:
        return str(err).splitlines()[0]
    return None


def _median_ms(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def measure_linear(w: torch.Tensor, rows=(1, 5), reps: int = 5) -> dict[str, float]:
    """Milliseconds of ``default`` and ``onednn`` summed over ``rows`` (interleaved, median of ``reps``)."""
    packed = pack_weight(w)
    out = {"default": 0.0, "onednn": 0.0}
    with torch.inference_mode():
        for m in rows:
            x = torch.randn(m, w.shape[1], dtype=w.dtype)
            out["default"] += _median_ms(lambda x=x: F.linear(x, w), reps)
            out["onednn"] += _median_ms(lambda x=x: onednn_linear(x, packed), reps)
    return out


def _probe_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The most frequent linear shape of a model that is not its LM head (the MLP's up projection)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    best = None
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not head and (best is None or m.weight.numel() > best.numel()):
            best = m.weight
    return None if best is None else best.detach()


def resolve_cpu_kernels(choice: str, model: torch.nn.Module) -> tuple[str, str]:
    """(``default`` | ``onednn``, why) for a loaded model under ``model.cpu_kernels=choice``."""
    if choice not in CPU_KERNELS:
        raise ValueError(f"model.cpu_kernels '{choice}' is not one of {list(CPU_KERNELS)}")
    p = next(model.parameters())
    if choice == "default":
        return "default", "model.cpu_kernels=default"
    if p.device.type != "cpu":
        if choice == "onednn":
            raise ValueError(
                f"model.cpu_kernels=onednn needs model.device=cpu (the model is on {p.device}); "
                f"use cpu_kernels=auto or default"
            )
        return "default", f"not a CPU ({p.device.type})"
    if not onednn_available():
        if choice == "onednn":
            raise ValueError("model.cpu_kernels=onednn: this torch build has no oneDNN (torch.backends.mkldnn)")
        return "default", "torch has no oneDNN here"
    dt = str(p.dtype).removeprefix("torch.")
    if why := onednn_supports(p.dtype):  # e.g. bf16 on an AVX2-only CPU
        if choice == "onednn":
            raise ValueError(
                f"model.cpu_kernels=onednn: oneDNN has no {dt} linear kernel on this CPU ({why}); "
                f"use model.cpu_kernels=auto or default, or model.dtype=float32 (model.dtype=auto picks it here)"
            )
        return "default", f"auto: oneDNN has no {dt} linear kernel on this CPU ({why[:80]})"
    if choice == "onednn":
        return "onednn", "model.cpu_kernels=onednn"
    w = _probe_weight(model)
    if w is None:
        return "default", "no linear layer to measure"
    ms = measure_linear(w)
    pick = "onednn" if ms["onednn"] < ms["default"] else "default"
    return pick, (
        f"auto: a {tuple(w.shape)} {str(w.dtype).removeprefix('torch.')} linear at 1+5 rows took "
        f"{ms['default']:.2f} ms default, {ms['onednn']:.2f} ms oneDNN-packed"
    )


def swap_linears(model: torch.nn.Module, make) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` (in place) by ``make(linear)``; returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, make(child))
                n += 1
    return n


def use_onednn(model: torch.nn.Module) -> int:
    """Swap every ``nn.Linear`` of ``model`` (in place) for a :class:`OneDNNLinear`; returns how many."""
    return swap_linears(model, OneDNNLinear)


def apply_cpu_kernels(choice: str, model: torch.nn.Module) -> tuple[str, str]:
    """Resolve ``choice`` for ``model`` and apply it; returns (kernels, why)."""
    kernels, why = resolve_cpu_kernels(choice, model)
    if kernels == "onednn":
        use_onednn(model)
    return kernels, why


# --------------------------------------------------------------------------- int8 draft


class Int8Linear(torch.nn.Module):
    """An ``nn.Linear`` with int8 weights (symmetric, one scale per output row) packed once for fbgemm, and
    inputs quantized per token (CPU only; returns the input's dtype).

    fbgemm quantizes a call's whole input with one scale, so a token's precision would depend on what shares
    its call (a prompt, a batch, a teacher-forced response: one outlier token coarsens them all). Each row is
    divided by its own largest magnitude first and the output row multiplied back (a linear map commutes with
    that; the bias is added after), which makes the scale per token: the same proposals at any batch size."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # torch's quantized tensors warn that they are deprecated
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qw, None)
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    @property
    def weight(self) -> torch.Tensor:
        """The weight's shape only (a meta tensor): what callers read of an LM head (its vocabulary)."""
        return torch.empty((self.out_features, self.in_features), device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        # reduce_range: 7-bit inputs, so that AVX2's 16-bit pairwise sums cannot saturate (as torch's own)
        if x32.numel() == x32.shape[-1]:  # one token (a decode step): fbgemm's scale is already its own
            y = torch.ops.quantized.linear_dynamic(x32, self._packed, True)
        else:
            scale = x32.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # per token
            y = torch.ops.quantized.linear_dynamic(x32 / scale, self._packed, True) * scale
        if self.bias is not None:
            y = y + self.bias
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int8_unavailable() -> str | None:
    """None when fbgemm's dynamic int8 linear runs here; else why not."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return f"this torch build has no fbgemm engine ({torch.backends.quantized.supported_engines})"
    try:
        Int8Linear(torch.nn.Linear(16, 8))(torch.zeros(2, 16))
    except (RuntimeError, AttributeError) as err:
        return str(err).splitlines()[0]
    return None


def quantize_int8(model: torch.nn.Module, key: str = "model.draft.quantize") -> int:
    """Swap every ``nn.Linear`` of a CPU ``model`` (LM head included) for an :class:`Int8Linear`, in place;
    returns how many. Refused, naming ``key``, on another device or where fbgemm is missing."""
    dev = next(model.parameters()).device
    if dev.type != "cpu":
        raise ValueError(f"{key}=int8 runs on the CPU only (the model is on {dev}); set {key}=null")
    if why := int8_unavailable():
        raise ValueError(f"{key}=int8: {why}; set {key}=null")
    return swap_linears(model, Int8Linear)
