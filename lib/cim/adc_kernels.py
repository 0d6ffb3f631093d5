"""The CIM layers' elementwise work on large tensors (ADC conversion of the partial sums and its
gradient, input fake quantization, the slice-weighted gradient), eager or fused by torch.compile.

On this project's CPUs the partial sums of a layer are tens of MB and every elementwise pass
is bound by memory bandwidth, so fusing divide/round/clamp/scale/sum into one loop (Inductor)
makes the ADC several times cheaper. Fusion is used when it works (`CIM_AQ_COMPILE=auto`, the
default), forced with `1` (errors surface) and disabled with `0`. The CLIs' set-up pins the
mode once per process (`configure_compile`); a library used without it follows the variable.
A failed compile logs once and that kernel falls back to its eager form, which computes the
same values; the other kernels stay fused.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil

import torch

from lib.cim.direct_kernels import DirectKernel, Refused, takes_directly
from lib.errors import UserError
from lib.heap import heap_policy

log = logging.getLogger(__name__)

COMPILE_ENV = "CIM_AQ_COMPILE"
COMPILE_MODES = ("auto", "0", "1")
RECOMPILE_LIMIT = 64


class CompileModeError(UserError, ValueError):
    """A compile mode other than auto, 0 or 1."""


def forward_eager(p, step, coef, lo, hi):
    """Σ over tile·slice of clamp(round(p / step), lo, hi) · coef, with p (M, g, tiles·slices, o)."""
    levels = torch.round(p / step).clamp_(lo, hi)
    return levels.mul_(coef).sum(dim=2)


def backward_eager(grad_y, p, step, gamma, lo, hi):
    """(grad wrt p, Σ_m grad·level, Σ_m grad·v·on_grid) with v = p / step; in-place to save passes."""
    grad = grad_y.unsqueeze(2)  # broadcast over tiles·slices
    v = p / step
    rounded = torch.round(v)
    levels = rounded.clamp(lo, hi)
    on_grid = rounded.eq_(levels)  # 1.0 where the clamp did not act
    sum_levels = levels.mul_(grad).sum(dim=0)
    grad_on_grid = on_grid.mul_(grad)
    sum_v = v.mul_(grad_on_grid).sum(dim=0)
    return grad_on_grid.mul_(gamma), sum_levels, sum_v


def _forward_functional(p, step, coef, lo, hi):
    return (torch.clamp(torch.round(p / step), lo, hi) * coef).sum(dim=2)


def _forward_into_functional(out, p, step, coef, lo, hi):
    """The fused conversion written into `out` (a block of a larger output: no copy after)."""
    out.copy_(_forward_functional(p, step, coef, lo, hi))
    return out


def accumulate_eager(levels, coef):
    """Σ over tile·slice of levels · coef, for ADC levels (M, g, tiles·slices, o) already converted."""
    return levels.to(coef.dtype).mul_(coef).sum(dim=2)


def _accumulate_functional(levels, coef):
    return (levels.to(coef.dtype) * coef).sum(dim=2)


def _accumulate_into_functional(out, levels, coef):
    out.copy_(_accumulate_functional(levels, coef))
    return out


def _backward_functional(grad_y, p, step, gamma, lo, hi, chunks: int):
    """Fused backward. Written so that Inductor keeps two passes over p (the gradient, and both
    sums in `chunks` blocks of M/chunks rows — 2-3x faster on CPU than one reduction over the
    outer dimension) and never materialises a full-size intermediate."""
    grad = grad_y.unsqueeze(2)
    v = p / step
    rounded = torch.round(v)
    levels = torch.clamp(rounded, lo, hi)
    on_grid = rounded == levels
    grad_p = torch.where(on_grid, grad * gamma, 0.0)
    blocks = (chunks, -1) + tuple(p.shape[1:])
    sum_levels = (levels * grad).view(blocks).sum(dim=1).sum(dim=0)
    sum_v = torch.where(on_grid, v * grad, 0.0).view(blocks).sum(dim=1).sum(dim=0)
    return grad_p, sum_levels, sum_v


def _backward_into_functional(out, grad_y, p, step, gamma, lo, hi, chunks: int):
    """The fused backward writing the gradient of p into `out` (a reused buffer: on CPU a fresh
    tens-of-MB tensor costs about as much in page faults as the kernel itself)."""
    grad_p, sum_levels, sum_v = _backward_functional(grad_y, p, step, gamma, lo, hi, chunks)
    out.copy_(grad_p)
    return sum_levels, sum_v


def _clip_sums_functional(grad_y, p, step, lo, hi, chunks: int):
    """The fused backward's two column sums without the partial sums' gradient, in one read of p,
    with +inf in Σ grad·v·on_grid wherever the ADC clipped a partial sum of the column: that marks
    the column for lib.cim.slice_merge at no third reduction (Inductor runs each reduction beyond
    two as another pass over p)."""
    grad = grad_y.unsqueeze(2)
    v = p / step
    rounded = torch.round(v)
    levels = torch.clamp(rounded, lo, hi)
    on_grid = rounded == levels
    blocks = (chunks, -1) + tuple(p.shape[1:])
    sum_levels = (levels * grad).view(blocks).sum(dim=1).sum(dim=0)
    sum_v = torch.where(on_grid, v * grad, math.inf).view(blocks).sum(dim=1).sum(dim=0)
    return sum_levels, sum_v


def clip_sums_eager(grad_y, p, step, lo, hi):
    """(Σ_m grad·level, Σ_m grad·v·on_grid with +inf in the columns where the ADC clipped)."""
    grad = grad_y.unsqueeze(2)
    v = p / step
    rounded = torch.round(v)
    levels = rounded.clamp(lo, hi)
    on_grid = rounded.eq_(levels)
    sum_levels = levels.mul_(grad).sum(dim=0)
    sum_v = v.mul_(grad).masked_fill_(on_grid == 0, math.inf).sum(dim=0)
    return sum_levels, sum_v


def _merge_slices_into_functional(out, cells, gamma):
    """Σ_s gamma[s] · cells[s] written into `out`: a linear layer's merged array weight (see
    lib.cim.slice_merge), its compact cells widened on the fly in one pass."""
    merged = cells[0].to(gamma.dtype) * gamma[0]
    for s in range(1, cells.shape[0]):
        merged = merged + cells[s].to(gamma.dtype) * gamma[s]
    out.copy_(merged)
    return out


ROWS_PER_CHUNK = (32, 64, 16, 128, 8)


def _reduction_chunks(rows: int) -> int:
    """Blocks of about 32 rows for the two-stage sums (measured best on AVX2/AVX-512 CPUs); 1
    when no such block size divides `rows`."""
    for per_chunk in ROWS_PER_CHUNK:
        if rows % per_chunk == 0 and rows >= 2 * per_chunk:
            return rows // per_chunk
    return 1


def _laid_out(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """t, written channels_last when asked (a 4-d quantizer output its conv reads NHWC)."""
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def quant_forward_eager(x, scale, lo, hi, channels_last: bool = False):
    """clamp(round(x / scale), lo, hi) · scale (channels_last: in that memory format)."""
    return _laid_out(torch.round(x / scale).clamp_(lo, hi).mul_(scale), channels_last)


def quant_forward_abs_sum_eager(x, scale, lo, hi, channels_last: bool = False):
    """(clamp(round(x / scale), lo, hi) · scale (channels_last: in that memory format), Σ|x|)."""
    return quant_forward_eager(x, scale, lo, hi, channels_last), torch.linalg.vector_norm(x, ord=1)


def quant_backward_eager(grad, x, scale, lo, hi):
    """LSQ: (grad wrt x where round(x/scale) is on the grid, in x's memory format whatever grad's;
    Σ grad·(level − v·on_grid))."""
    v = x / scale
    rounded = torch.round(v)
    levels = rounded.clamp(lo, hi)
    on_grid = rounded.eq_(levels)
    grad_x = on_grid * grad  # the first operand's layout: x's
    return grad_x, (levels.sub_(v.mul_(on_grid))).mul_(grad).sum()


def _quant_forward_functional(x, scale, lo, hi, channels_last: bool = False):
    return _laid_out(torch.clamp(torch.round(x / scale), lo, hi) * scale, channels_last)


def _quant_forward_abs_sum_functional(x, scale, lo, hi, channels_last: bool = False):
    """The fake quantization and the input's Σ|x| in one pass over x (Inductor fuses the sum into
    the elementwise loop): a training forward's running |x| statistic at no extra read. With
    channels_last the output is written NHWC whatever x's layout, in the same pass."""
    return _laid_out(torch.clamp(torch.round(x / scale), lo, hi) * scale, channels_last), x.abs().sum()


def _quant_backward_functional(grad, x, scale, lo, hi):
    """`quant_backward_eager` in one pass; grad and x may differ in layout (an NHWC gradient of
    an NCHW input's channels-last quantized copy): the input's gradient takes x's."""
    v = x / scale
    rounded = torch.round(v)
    levels = torch.clamp(rounded, lo, hi)
    on_grid = (rounded == levels).to(x.dtype)
    return on_grid * grad, (grad * (levels - v * on_grid)).sum()


def slice_share_eager(grad, shares):
    """Σ_s shares[s] · grad[:, s, :] for grad (rows, slices, columns) → (rows, columns)."""
    out = grad[:, 0] * shares[0]
    for s in range(1, grad.shape[1]):
        out.addcmul_(grad[:, s], shares[s])
    return out


def _slice_share_functional(grad, shares):
    """Unrolled over the (few) slices: a pointwise kernel, which Inductor can write straight into
    an `out` buffer (a reduction it would compute into a fresh buffer and copy)."""
    acc = grad[:, 0] * shares[0]
    for s in range(1, grad.shape[1]):
        acc = acc + grad[:, s] * shares[s]
    return acc


def _slice_share_into_functional(out, grad, shares):
    out.copy_(_slice_share_functional(grad, shares))
    return out


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-d tensor laid out NHWC, else the default contiguous format."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def dense(x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """x in the memory format of `like` (default: its own): a channels-last model stays channels
    last, with no layout-changing copy on the way into or out of a kernel."""
    return x.contiguous(memory_format=memory_format_of(x if like is None else like))


def _plain(a):
    """A kernel argument detached and dense: no autograd state or overlapping layout to guard on
    (tensors already so pass as they are)."""
    if not isinstance(a, torch.Tensor):
        return a
    if a.requires_grad:
        a = a.detach()
    return a if a.is_contiguous() else dense(a)


def _parse_mode(mode: str, source: str) -> str:
    value = str(mode).strip().lower()
    if value not in COMPILE_MODES:
        raise CompileModeError(f"{source}={mode!r} is not allowed: expected one of {list(COMPILE_MODES)}")
    return value


class _Kernels:
    """Chooses fused or eager kernels once per process and device type; owns the compile mode and
    which kernels failed to compile."""

    def __init__(self) -> None:
        self._compiled: dict = {}
        self._failed: set = set()
        self._configured: str | None = None
        self._direct = True  # CPU kernels called without TorchDynamo (lib.cim.direct_kernels)

    @contextlib.contextmanager
    def direct_kernels(self, enabled: bool):
        """CPU kernels called directly (the default) or, inside `with direct_kernels(False)`,
        through torch.compile: the same values, for timing one against the other."""
        previous, self._direct = self._direct, bool(enabled)
        try:
            yield
        finally:
            self._direct = previous

    def configure(self, mode: str | None = None) -> str:
        """Pin the compile mode (auto | 0 | 1; None: from $CIM_AQ_COMPILE, default auto) and forget
        earlier compile failures; returns the mode."""
        if mode is None:
            mode = _parse_mode(os.environ.get(COMPILE_ENV, "auto"), COMPILE_ENV)
        else:
            mode = _parse_mode(mode, "compile mode")
        self._configured = mode
        self._failed = set()
        return mode

    def unpin(self) -> None:
        """Forget the pinned mode: $CIM_AQ_COMPILE decides again at every kernel call."""
        self._configured = None
        self._failed = set()

    @property
    def mode(self) -> str:
        """The pinned compile mode; unpinned (a library used without the CLIs' set-up), the environment's."""
        if self._configured is not None:
            return self._configured
        return _parse_mode(os.environ.get(COMPILE_ENV, "auto"), COMPILE_ENV)

    @property
    def direct_variants(self) -> int:
        """Graphs compiled so far for the DirectKernels (TorchDynamo counts torch.compile's)."""
        return sum(kernel.variants for kernel in self._compiled.values() if isinstance(kernel, DirectKernel))

    @property
    def failed(self) -> frozenset:
        """Kernels whose compile failed, now run eagerly."""
        return frozenset(self._failed)

    def _use_compiled(self, name: str, tensor: torch.Tensor) -> bool:
        mode = self.mode
        if mode == "0" or name in self._failed:
            return False
        device = tensor.device.type
        if mode == "auto" and device == "cpu" and not _has_cxx():
            return False
        return device in ("cpu", "cuda")

    def _get(self, name: str, fn, device: str, args):
        """The compiled kernel `name`: on CPU a DirectKernel (no TorchDynamo overhead per call)
        unless a float argument rules it out, else torch.compile's."""
        if device == "cpu" and self._direct and takes_directly(args):
            key = (name, "direct")
            if key not in self._compiled:
                self._compiled[key] = DirectKernel(name, fn)
            return self._compiled[key]
        if name not in self._compiled:
            # A model's layers differ in groups/tiles/slices (1 or more) and batch sizes: allow the
            # handful of variants that makes, beyond torch's default of 8 per function.
            limit = getattr(torch._dynamo.config, "recompile_limit", None)
            if limit is not None and limit < RECOMPILE_LIMIT:
                torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
            self._compiled[name] = torch.compile(fn, dynamic=True)
        return self._compiled[name]

    def run(self, name: str, functional, eager, tensor, *args, compiled_extra=()):
        """`functional(*args)` compiled as kernel `name` when the mode and `tensor`'s device allow
        and it compiles, else `eager(*args)` (None: return None instead)."""
        if self._use_compiled(name, tensor):
            try:
                plain = [_plain(a) for a in args]
                if eager is None:  # an out= variant: the first argument is written, keep it as given
                    plain[0] = args[0]
                plain += compiled_extra
                return self._get(name, functional, tensor.device.type, plain)(*plain)
            except Refused as err:  # this call's layout is not the traced one: eagerly, same values
                log.debug("%s; running it eagerly", err)
            except Exception as err:  # noqa: BLE001 - any compiler failure: same maths, eagerly
                if self.mode == "1":
                    raise
                self._failed.add(name)
                log.warning("fused kernel %r unavailable (%s: %s); running it eagerly", name,
                            type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        return None if eager is None else eager(*args)

    def forward(self, p, step, coef, lo: int, hi: int, out=None):
        """Σ over tile·slice of clamp(round(p / step), lo, hi) · coef; written into `out` when given."""
        bounds = grid_bounds(p, lo, hi)
        if out is None:
            return self.run("forward", _forward_functional, forward_eager, p, p, step, coef, *bounds)
        if self.run("forward_into", _forward_into_functional, None, p, out, p, step, coef, *bounds) is None:
            out.copy_(forward_eager(p, step, coef, *bounds))
        return out

    def accumulate(self, levels, coef, out=None):
        """Σ over tile·slice of levels · coef (the shift-and-add of converted levels); into `out` when given."""
        if out is None:
            return self.run("accumulate", _accumulate_functional, accumulate_eager, coef, levels, coef)
        if self.run("accumulate_into", _accumulate_into_functional, None, coef, out, levels, coef) is None:
            out.copy_(accumulate_eager(levels, coef))
        return out

    def quant_forward(self, x, scale, lo, hi, channels_last: bool = False):
        """Per-tensor LSQ fake quantization (lo, hi: 0-d tensors), written channels_last when asked."""
        return self.run("quant_forward", _quant_forward_functional, quant_forward_eager, x, x, scale, lo, hi,
                        channels_last)

    def quant_forward_abs_sum(self, x, scale, lo, hi, channels_last: bool = False):
        """`quant_forward` and Σ|x| (a 0-d tensor) from one pass over x."""
        return self.run("quant_forward_abs_sum", _quant_forward_abs_sum_functional, quant_forward_abs_sum_eager,
                        x, x, scale, lo, hi, channels_last)

    def quant_backward(self, grad, x, scale, lo, hi):
        """LSQ's gradients of `quant_forward`: the input's (in x's memory format) and Σ for the step."""
        return self.run("quant_backward", _quant_backward_functional, quant_backward_eager, x, grad, x, scale, lo, hi)

    def slice_share(self, grad, shares, out=None):
        """Σ_s shares[s] · grad[:, s, :] (shares: a (slices,) tensor), into `out` when given and fused."""
        if out is not None and self.run("slice_share_into", _slice_share_into_functional, None, grad,
                                         out, grad, shares) is not None:
            return out
        return self.run("slice_share", _slice_share_functional, slice_share_eager, grad, grad, shares)

    def backward(self, grad_y, p, step, gamma, lo: int, hi: int, out=None):
        """(grad wrt p, Σ_m grad·level, Σ_m grad·v·on_grid); the gradient is written into `out`
        (same shape as p) when given and the fused kernel runs, else into a fresh tensor."""
        bounds = grid_bounds(p, lo, hi)
        chunks = (_reduction_chunks(p.shape[0]),)
        if out is not None:  # None back: the fused kernel does not run here
            sums = self.run("backward_into", _backward_into_functional, None, p, out, grad_y, p, step, gamma,
                             *bounds, compiled_extra=chunks)
            if sums is not None:
                return (out,) + tuple(sums)
        return self.run("backward", _backward_functional, backward_eager, p, grad_y, p, step, gamma, *bounds,
                         compiled_extra=chunks)

    def clip_sums(self, grad_y, p, step, lo: int, hi: int):
        """(Σ_m grad·level, Σ_m grad·v·on_grid with +inf in every column where the ADC clipped):
        `backward`'s sums without its full-size gradient, for a backward that needs no
        partial-sum gradient where nothing was clipped (lib.cim.slice_merge)."""
        bounds = grid_bounds(p, lo, hi)
        return self.run("clip_sums", _clip_sums_functional, clip_sums_eager, p, grad_y, p, step, *bounds,
                        compiled_extra=(_reduction_chunks(p.shape[0]),))

    def merge_slices(self, out, cells, gamma) -> bool:
        """Σ_s gamma[s] · cells[s] into `out` with the fused kernel; False where it does not run
        (the caller then computes it eagerly)."""
        return self.run("merge_slices_into", _merge_slices_into_functional, None, gamma, out, cells, gamma) is not None


@functools.lru_cache(maxsize=None)
def _has_cxx() -> bool:
    """Whether a C++ compiler (which Inductor's CPU kernels need) is on PATH: looked up once per
    process, not on every kernel call."""
    return bool(shutil.which("c++") or shutil.which("g++"))


_CONSTANTS: dict = {}


def _constant(key: tuple, make):
    """`make()` made once per key and kept: constants every forward reads, made outside inference
    mode (an inference tensor could not be saved for a later backward)."""
    value = _CONSTANTS.get(key)
    if value is None:
        with torch.inference_mode(False):
            value = _CONSTANTS[key] = make()
    return value


def grid_bounds(p: torch.Tensor, lo: int, hi: int):
    """Grid bounds as 0-d tensors (a compiled kernel then serves every ADC width without
    recompiling), made once per value, dtype and device: no host-to-device copy per call."""
    dtype, device = p.dtype, p.device
    return _constant(("bounds", lo, hi, dtype, device),
                     lambda: (torch.tensor(float(lo), dtype=dtype, device=device),
                              torch.tensor(float(hi), dtype=dtype, device=device)))


def powers_of_two(bits: int, count: int, like: torch.Tensor) -> torch.Tensor:
    """2^(bits·i) for i < count in like's dtype and device (the slices' or input planes'
    significance), made once per setting."""
    dtype, device = like.dtype, like.device
    return _constant(("powers", bits, count, dtype, device),
                     lambda: 2.0 ** (bits * torch.arange(count, device=device, dtype=dtype)))


KERNELS = _Kernels()


def configure_compile(mode: str | None = None) -> str:
    """Set this process's compile mode (None: from $CIM_AQ_COMPILE); returns it. See the module docstring."""
    return KERNELS.configure(mode)


def compile_mode() -> str:
    """The compile mode in force: auto, 0 or 1."""
    return KERNELS.mode


def kernel_report() -> dict:
    """What a run's report records about how its kernels ran: the compile mode, the kernels that
    fell back to eager after a failed compile, and the freed-memory policy (lib.heap), which the
    large kernels' speed depends on."""
    return {"compile_mode": KERNELS.mode, "eager_after_failed_compile": sorted(KERNELS.failed),
            "freed_memory": heap_policy()}
