"""CPU kernels for inference (``cpu_kernels.c``, the GEMM in ``cpu_gemm.c`` and on AMX in ``cpu_amx.c``, a
decode step's layer blocks in ``cpu_decode.c``, bound in ``native_decode.py``): compiled for this CPU at first
use, called through ctypes.

* ``few_rows_linear``: decode and small batches multiply 1-8 activation rows by each weight matrix.
  Paddle's bundled MKL runs one row as a GEMV at memory speed but packs the whole weight for every call
  with two or more rows (the 1280 x 129280 lm_head: 20 ms for 1 row, 70 ms for 4), so a batch of four
  cost nearly four single steps. The kernel streams each weight once for up to four rows (25 ms for 4
  rows on the same matrix) and runs one row about as fast as MKL.
* ``swiglu_mlps``: a layer's SiLU-gated MLPs (its routed and shared experts, or its dense MLP) in one call,
  each expert on the tokens that chose it.
* ``native_decode``: a decode step's MLP block (router and experts) and whole MHA decoder layer, one call
  each, stringing the kernels below together in C; and MLA's absorbed decode attention.
* ``linear`` (AVX-512 builds): ``x @ weight.T + bias`` for more rows than ``MAX_FEW_ROWS`` by a blocked
  GEMM. Paddle's bundled MKL (2019) reaches about 230-250 GFLOP/s on the tiny model's prefill and vision
  shapes and 100-230 on a MoE expert's ~100 rows on this 2-core Xeon; the GEMM runs 380-410 and 290-300
  (numpy's OpenBLAS: about 400). ``swiglu_mlps`` runs prefill's experts through the same GEMM. On CPUs
  with AMX-BF16 the GEMM takes bf16 weights on AMX tiles from 32 rows on (``amx_gemm_runs``; off with
  ``PADDLEMIX_VL2_AMX=0``), exact to float32 rounding: 1.4-2.6x the AVX-512 GEMM on the model's shapes.
* Weights: every kernel above that multiplies by a weight matrix takes it in float32 or, on AVX512BW
  builds (``bf16_weights_supported``), as the checkpoint's bf16, widened to float32 in registers (the
  GEMM as it packs its panels), so a bf16-stored model computes exactly what its float32 copy would (up to
  the order of the float32 sums where the AMX GEMM takes the bf16 matrices and not the float32 ones).
* ``add_bias_``: a Linear's bias added in place into its own output (Paddle's broadcasting add runs at
  about a tenth of that speed).
* ``mha_decode`` (AVX-512 builds): a decode step's multi-head attention (RoPE, cache write, softmax
  attention over the written positions) in one call per layer instead of about fifteen Paddle ops.
* ``attention_qkv`` and ``attention_prefill`` (AVX-512 builds): the vision tower's attention straight from
  its fused q/k/v projection, and the language model's prefill attention (over the MHA cache, or MLA's
  keys and values expanded from its cache), each head's products through the GEMM (a prefill's query
  blocks skip the keys after their last row).
* ``softmax_last_axis`` and ``gelu_tanh_`` (AVX-512 builds): the attention normalisation (with its mask)
  and the ViT's GELU, which Paddle's CPU kernels run at about 0.3 G values/s (a fifth of the tower's time
  together).

The shared library is built with the system C compiler (``$CC``, else ``cc``) and ``-O3 -march=native
-fopenmp`` into ``$PADDLEMIX_VL2_CACHE`` (default ``~/.cache/paddlemix_vl2``), named by a hash of the
sources, the compiler commands and the CPU's feature flags, so a changed source or another CPU builds
anew. It is linked against the OpenMP runtime of Paddle's MKL (``paddle/libs/libiomp5.so``) where the
wheel has one: on GCC's runtime the two thread pools fought over the cores after every switch (an expert
GEMV beside an MKL call took 0.43 ms against 0.15 + 0.09 ms apart; 0.28 ms on the shared runtime), and
single-prompt decode ran at a third of its speed. Without a compiler, on a failed build, or with
``PADDLEMIX_VL2_NATIVE=0``, everything runs on Paddle's own kernels; the reason is logged once.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
from typing import List, Optional, Sequence, Tuple

import numpy as np
import paddle
from paddle import _C_ops

__all__ = [
    "NATIVE_VARIABLE", "AMX_VARIABLE", "amx_gemm_runs", "MAX_FEW_ROWS", "kernel_library", "few_rows_applies",
    "few_rows_linear", "gemm_applies", "linear", "mlp_kernels_apply", "swiglu_mlps", "MAX_DECODE_HEAD_DIM",
    "mha_kernels_apply", "mha_decode", "rope_store_prefill", "attention_qkv", "attention_prefill",
    "inference_kernels_apply", "add_bias_", "vector_kernels_apply", "vector_kernels_built", "softmax_last_axis",
    "gelu_tanh_", "bf16_weights_supported", "rms_norm", "MLPTable", "weights_readable", "check_status", "is_bf16",
    "output_tensor", "C_LONG", "check_step_mask", "PinnedTensors",
]

logger = logging.getLogger(__name__)

NATIVE_VARIABLE = "PADDLEMIX_VL2_NATIVE"
CACHE_VARIABLE = "PADDLEMIX_VL2_CACHE"
# "0" keeps the GEMM on AVX-512 where the CPU has AMX (``amx_gemm_runs``).
AMX_VARIABLE = "PADDLEMIX_VL2_AMX"
# Up to this many rows the kernel beats MKL's sgemm here (8 rows: two passes over the weight, 50 ms on
# the lm_head against 58-87 ms); beyond it sgemm's packing pays for itself.
MAX_FEW_ROWS = 8
# The C kernels' ``long`` index arrays, as NumPy allocates them.
C_LONG = np.dtype(ctypes.c_long)
_CPU = paddle.CPUPlace()
_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = [os.path.join(_HERE, name) for name in ("cpu_kernels.c", "cpu_gemm.c", "cpu_amx.c", "cpu_decode.c")]
_HEADER = os.path.join(_HERE, "cpu_kernels.h")
_COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-c"]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _link_flags() -> List[str]:
    """Shared-library flags, with Paddle's own OpenMP runtime when its wheel ships one."""
    libs = os.path.join(os.path.dirname(os.path.abspath(paddle.__file__)), "libs")
    if os.path.exists(os.path.join(libs, "libiomp5.so")):
        return ["-shared", f"-L{libs}", "-l:libiomp5.so", f"-Wl,-rpath,{libs}", "-lm"]
    return ["-shared", "-fopenmp", "-lm"]


def _build(compiler: str, link_flags: List[str], target: str) -> None:
    """Compile the kernel to ``target`` through temporary files, so no half-written library is ever loaded."""
    directory = os.path.dirname(target)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".cpu_kernels-", dir=directory) as scratch:
        objects = [os.path.join(scratch, f"{index}.o") for index in range(len(_SOURCES))]
        partial = os.path.join(scratch, "kernels.so")
        commands = [[compiler, *_COMPILE_FLAGS, source, "-o", obj] for source, obj in zip(_SOURCES, objects)]
        for command in commands + [[compiler, *objects, "-o", partial, *link_flags]]:
            subprocess.run(command, check=True, capture_output=True, timeout=300)
        os.replace(partial, target)


@functools.lru_cache(maxsize=None)
def kernel_library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library (``cpu_kernels.c``, ``cpu_gemm.c``, ``cpu_amx.c``, ``cpu_decode.c``), or None
    when it is switched off or cannot be built here."""
    if os.environ.get(NATIVE_VARIABLE) == "0":
        return None
    if platform.system() != "Linux":
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        logger.info("no C compiler found ($CC or cc): inference keeps Paddle's own kernels")
        return None
    source = b""
    for path in (*_SOURCES, _HEADER):
        with open(path, "rb") as f:
            source += f.read()
    link_flags = _link_flags()
    commands = " ".join(_COMPILE_FLAGS + link_flags)
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), commands.encode(), _cpu_flags().encode()]))
    cache = os.environ.get(CACHE_VARIABLE) or os.path.join(os.path.expanduser("~"), ".cache", "paddlemix_vl2")
    target = os.path.join(cache, f"cpu_kernels-{key.hexdigest()[:16]}.so")
    try:
        if not os.path.exists(target):
            _build(compiler, link_flags, target)
        library = ctypes.CDLL(target)
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", b"") or b""
        logger.warning(
            "could not build the CPU kernels (%s%s); inference keeps Paddle's own kernels (set %s=0 to skip)",
            error, ": " + detail.decode(errors="replace").strip().splitlines()[-1] if detail.strip() else "",
            NATIVE_VARIABLE,
        )
        return None
    library.few_rows_linear.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_long] * 3
    library.few_rows_linear.restype = None
    library.swiglu_mlps.argtypes = (
        [ctypes.c_void_p] + [ctypes.c_long] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int] + [ctypes.c_void_p] * 5
    )
    library.swiglu_mlps.restype = ctypes.c_int
    library.bf16_weights.restype = ctypes.c_int
    library.add_bias_rows.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2
    library.add_bias_rows.restype = None
    library.rms_norm_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float]
    library.rms_norm_rows.restype = None
    library.vector_lanes.restype = ctypes.c_int
    library.route_rows.argtypes = [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 3
    library.route_rows.restype = ctypes.c_int
    library.mlp_block_decode.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 3
    library.mlp_block_decode.restype = ctypes.c_int
    # Asked once here: the predicates below run on every Linear call of a decode step.
    library.reads_bf16_weights = library.vector_lanes() == 16 and library.bf16_weights() == 1
    library.amx_gemm_enable.argtypes = [ctypes.c_int]
    library.amx_gemm_enable.restype = ctypes.c_int
    library.amx_gemm = bool(library.amx_gemm_enable(int(os.environ.get(AMX_VARIABLE) != "0")))
    if library.vector_lanes() == 16:
        library.softmax_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 5
        library.softmax_rows.restype = None
        library.gelu_tanh_inplace.argtypes = [ctypes.c_void_p, ctypes.c_long]
        library.gelu_tanh_inplace.restype = None
        library.gemm_nt.argtypes = (
            [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
            + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 4
        )
        library.gemm_nt.restype = ctypes.c_int
        library.mha_decode.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_long] * 6 + [ctypes.c_float]
        library.mha_decode.restype = ctypes.c_int
        library.rope_store_prefill.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 7
        library.rope_store_prefill.restype = None
        library.attention_qkv.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 4 + [ctypes.c_float]
        library.attention_qkv.restype = ctypes.c_int
        library.attention_prefill.argtypes = (
            [ctypes.c_void_p] * 5 + [ctypes.c_long] * 9 + [ctypes.c_int, ctypes.c_float]
        )
        library.attention_prefill.restype = ctypes.c_int
        library.decode_step.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_void_p] * 3
        library.decode_step.restype = ctypes.c_int
        library.mla_decode_attention.argtypes = (
            [ctypes.c_void_p] * 5 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 8 + [ctypes.c_float]
        )
        library.mla_decode_attention.restype = ctypes.c_int
    return library


def inference_kernels_apply(x: paddle.Tensor) -> bool:
    """Whether the kernels may serve ``x``: inference (no gradient), float32 on the CPU, library built."""
    return (
        not paddle.is_grad_enabled()
        and x.dtype == paddle.float32
        and x.place.is_cpu_place()
        and kernel_library() is not None
    )


def amx_gemm_runs() -> bool:
    """Whether the GEMM multiplies bf16 weights on AMX tiles (``cpu_amx.c``): a CPU with AMX-BF16 (Xeon
    Sapphire Rapids on), Linux granting the tile state, and ``PADDLEMIX_VL2_AMX`` not "0". The float32
    activations are split into three bf16 parts that add up to them exactly, so the products are the
    float32 ones up to summation order (the GEMM tests hold it to float64 NumPy as tightly as the AVX-512
    GEMM); on the Intel benchmark machine the vision tower's Linears took 5.9 s for five tiles against 11.7
    (cProfile), the whole tower 11.3-11.6 s against 18.4-19.2 (alternating in one process)."""
    library = kernel_library()
    return library is not None and library.amx_gemm


def bf16_weights_supported() -> bool:
    """Whether every kernel that takes weights here (few-row products, the GEMM, the MLPs) also reads them
    as bfloat16, widening to float32 as it loads: an AVX-512 build whose CPU has AVX512BW. Then float32
    inference can keep a bf16 checkpoint's matrices as they are stored, at half the memory, with the same
    results (bf16 to float32 is exact)."""
    library = kernel_library()
    return library is not None and library.reads_bf16_weights


def weights_readable(weight: paddle.Tensor) -> bool:
    """Whether the kernels multiply by ``weight``: float32, or bfloat16 where ``bf16_weights_supported``."""
    return weight.dtype == paddle.float32 or (weight.dtype == paddle.bfloat16 and bf16_weights_supported())


def few_rows_applies(x: paddle.Tensor, weight: paddle.Tensor, rows: int) -> bool:
    """Whether the few-row kernels serve this call: at most ``MAX_FEW_ROWS`` rows, a float32 weight (or
    bfloat16, ``bf16_weights_supported``), and ``inference_kernels_apply(x)``."""
    return rows <= MAX_FEW_ROWS and inference_kernels_apply(x) and weights_readable(weight)


def gemm_applies(x: paddle.Tensor, weight: paddle.Tensor, rows: int) -> bool:
    """Whether the GEMM serves this call: more than ``MAX_FEW_ROWS`` rows, a float32 or bfloat16 weight,
    and ``vector_kernels_apply(x)`` (the GEMM is written for AVX-512)."""
    return rows > MAX_FEW_ROWS and vector_kernels_apply(x) and weights_readable(weight)


def mlp_kernels_apply(x: paddle.Tensor, weight: paddle.Tensor, rows: int) -> bool:
    """Whether ``swiglu_mlps`` serves MLPs over ``rows`` rows of ``x`` (any expert may take all of them) with
    weights like ``weight``: ``few_rows_applies`` or ``gemm_applies``, checked once."""
    return (
        inference_kernels_apply(x) and weights_readable(weight)
        and (rows <= MAX_FEW_ROWS or vector_kernels_built())
    )


def check_status(status: int) -> None:
    """Raise MemoryError for a kernel's nonzero status (its scratch memory could not be allocated)."""
    if status != 0:
        raise MemoryError("the CPU kernels could not allocate their scratch memory; free memory or set "
                          f"{NATIVE_VARIABLE}=0 to use Paddle's kernels")


def is_bf16(weight: paddle.Tensor) -> int:
    """1 for a bfloat16 weight, 0 for float32: the kernels' ``bf16`` flag."""
    return int(weight.dtype == paddle.bfloat16)


def output_tensor(shape: Sequence[int]) -> paddle.Tensor:
    """An uninitialised float32 CPU tensor for a kernel to write. ``paddle.empty``'s Python wrapper costs
    about 5 µs a call against 1 µs for the operator itself, and a tiny decode step makes about a hundred."""
    return _C_ops.empty(list(shape), paddle.float32, _CPU)


def add_bias_(y: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
    """``y += bias`` in place over the last axis by the kernel: y [..., N] float32 contiguous (the caller's
    own output), bias [N] float32, both on the CPU (``inference_kernels_apply``). Returns ``y``."""
    n = y.shape[-1]
    kernel_library().add_bias_rows(y.data_ptr(), bias.data_ptr(), math.prod(y.shape[:-1]), n)
    return y


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """``weight * x / sqrt(mean(x ** 2) + eps)`` over the last axis by the kernel: x [..., N] float32 and
    weight [N] float32 on the CPU (``inference_kernels_apply``) -> [..., N] float32."""
    n = x.shape[-1]
    if list(weight.shape) != [n]:
        raise ValueError(f"RMSNorm weight {list(weight.shape)} does not fit inputs of width {n}")
    x = x if x.is_contiguous() else x.contiguous()
    out = output_tensor(x.shape)
    kernel_library().rms_norm_rows(x.data_ptr(), weight.data_ptr(), out.data_ptr(), math.prod(x.shape[:-1]), n, eps)
    return out


def few_rows_linear(x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    """``x @ weight.T`` by the kernel: x [..., K] float32 (R rows), weight [N, K] float32 or bfloat16 ->
    [..., N] float32 (CPU)."""
    *lead, k_dim = x.shape
    n_dim = weight.shape[0]
    x = x if x.is_contiguous() else x.contiguous()
    out = output_tensor(lead + [n_dim])
    kernel_library().few_rows_linear(
        x.data_ptr(), weight.data_ptr(), is_bf16(weight), out.data_ptr(), math.prod(lead), k_dim, n_dim
    )
    return out


def linear(x: paddle.Tensor, weight: paddle.Tensor, bias: Optional[paddle.Tensor]) -> paddle.Tensor:
    """``x @ weight.T + bias`` by the GEMM: x [..., K] float32, weight [N, K] float32 or bfloat16, bias [N]
    float32 or None, on the CPU (``gemm_applies``) -> [..., N] float32."""
    *lead, k_dim = x.shape
    n_dim = weight.shape[0]
    x = x if x.is_contiguous() else x.contiguous()
    out = output_tensor(lead + [n_dim])
    check_status(kernel_library().gemm_nt(
        x.data_ptr(), k_dim, weight.data_ptr(), is_bf16(weight), k_dim, None if bias is None else bias.data_ptr(),
        out.data_ptr(), n_dim, math.prod(lead), n_dim, k_dim,
    ))
    return out


class PinnedTensors:
    """Tensors a kernel structure points to, with the addresses and dtypes it took, and optionally the module
    attributes they were found under. In-place updates (``set_value``, an optimizer step) keep a tensor's
    memory, but a cast or a replaced parameter (a LoRA merge into bf16 storage) moves it, and a kernel would
    then read freed memory; a cast can also land on the old address (the heap keeps freed memory, see
    ``_env``) and would be read as the old dtype; and a parameter or module put in another's place (a LoRA
    wrapper around a projection) leaves the old tensor alive where the kernel still reads it. ``check``
    runs before every call."""

    def __init__(self, tensors: Sequence[paddle.Tensor], owners: Sequence[Tuple[object, str]] = ()):
        self.tensors = tuple(tensors)
        self.addresses = [t.data_ptr() for t in self.tensors]
        self.dtypes = [t.dtype for t in self.tensors]
        self.owners = [(owner, name, getattr(owner, name)) for owner, name in owners]

    def __add__(self, other: "PinnedTensors") -> "PinnedTensors":
        joined = PinnedTensors(())
        joined.tensors = self.tensors + other.tensors
        joined.addresses, joined.dtypes = self.addresses + other.addresses, self.dtypes + other.dtypes
        joined.owners = self.owners + other.owners
        return joined

    def check(self) -> None:
        """Raise when a tensor no longer lives where it was pinned, holds another dtype there, or an owner's
        attribute holds another object."""
        if (
            [t.data_ptr() for t in self.tensors] != self.addresses or [t.dtype for t in self.tensors] != self.dtypes
            or any(getattr(owner, name) is not value for owner, name, value in self.owners)
        ):
            raise ValueError("the CPU kernels' weight pointers are stale (a weight was cast or replaced since "
                             "they were set up); start a new KVCache after changing the model's weights")


def module_owners(modules: Sequence[Tuple[object, str]]) -> List[Tuple[object, str]]:
    """(parent, name) of each module and (module, "weight") of its weight: what a kernel structure that
    reads ``getattr(parent, name).weight`` pins, so that replacing either is refused."""
    return [pair for parent, name in modules for pair in ((parent, name), (getattr(parent, name), "weight"))]


class MLPTable:
    """The weights of several SiLU-gated MLPs as ``swiglu_mlps`` takes them, gathered once.

    Collecting a MoE layer's weights and their pointers took about a fifth of a decode step's Python time
    on the tiny model; a table built once per generation (``KVCache.memo``: the weights are fixed
    meanwhile) leaves a NumPy gather per step. The table holds the tensors; ``swiglu_mlps`` refuses a table
    whose weights have moved (``PinnedTensors``; the first and last MLP's gate weights are checked).

    Args:
        mlps: each MLP's (gate [I_m, H], up [I_m, H], down [H, I_m]) weights, all float32 or all bfloat16.
    """

    def __init__(self, mlps: Sequence[Tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]]):
        self.bf16 = is_bf16(mlps[0][0])
        if any(is_bf16(w) != self.bf16 for mlp in mlps for w in mlp):
            raise ValueError("swiglu_mlps takes one weight dtype for all its MLPs; cast them to one")
        self.weights = tuple(tuple(mlp) for mlp in mlps)
        self.pointers = np.array([[w.data_ptr() for w in mlp] for mlp in mlps], dtype=np.uintp).T.copy()  # [3, n]
        self.intermediate = np.array([int(mlp[0].shape[0]) for mlp in mlps], dtype=C_LONG)
        self.addresses = tuple(array.ctypes.data for array in (*self.pointers, self.intermediate))
        self.pinned = PinnedTensors([self.weights[0][0], self.weights[-1][0]])

    @classmethod
    def of(cls, mlps: Sequence[Optional[Tuple[paddle.Tensor, ...]]]) -> Optional["MLPTable"]:
        """The table, or None when there are no MLPs, an MLP has no plain weights (None) or their dtypes
        differ."""
        if not mlps or any(mlp is None for mlp in mlps) or len({mlp[0].dtype for mlp in mlps}) > 1:
            return None
        return cls(mlps)


def swiglu_mlps(
    x: paddle.Tensor,
    table: MLPTable,
    mlp_ids: np.ndarray,
    row_counts: Sequence[int],
    row_ids: np.ndarray,
    row_scales: np.ndarray,
) -> paddle.Tensor:
    """Several SiLU-gated MLPs over rows of ``x`` by the kernel, in one call.

    ``out[row] = sum over the MLPs m that take row of scale * down_m(silu(gate_m(x[row])) * up_m(x[row]))``.

    Args:
        x: [..., H] float32 on the CPU (``mlp_kernels_apply``: more than ``MAX_FEW_ROWS`` rows need the
            AVX-512 GEMM).
        table: the MLPs' weights; mlp_ids [M] int: the ones that run, in this order.
        row_counts: [M], how many rows each of them takes; row_ids [sum(row_counts)] int64 and row_scales
            (same length, float32): those rows and their weights, MLP after MLP. Every row with weight 1
            for a dense MLP or the shared experts; the tokens that chose it with their router weights for
            a routed expert.
    Returns:
        [..., H] float32.

    A decode step's MLPs each cost a dozen Paddle ops and layer calls otherwise, and a prefill's MoE a
    sort, gathers, a split and a concat on top. An MLP with up to ``MAX_FEW_ROWS`` rows streams its
    weights once per four rows; one with more reads its rows and writes its weighted output in place
    through the GEMM's row lists.
    """
    *lead, hidden = x.shape
    table.pinned.check()
    x = x if x.is_contiguous() else x.contiguous()
    pointers = np.ascontiguousarray(table.pointers[:, mlp_ids])  # [3, M]
    intermediate = np.ascontiguousarray(table.intermediate[mlp_ids])
    row_counts = np.ascontiguousarray(row_counts, dtype=C_LONG)
    row_ids = np.ascontiguousarray(row_ids, dtype=C_LONG)
    row_scales = np.ascontiguousarray(row_scales, dtype=np.float32)
    out = output_tensor(lead + [hidden])
    gate, up, down = (pointers[i].ctypes.data for i in range(3))
    check_status(kernel_library().swiglu_mlps(
        x.data_ptr(), math.prod(lead), hidden, len(intermediate), gate, up, down, table.bf16,
        intermediate.ctypes.data, row_counts.ctypes.data, row_ids.ctypes.data, row_scales.ctypes.data,
        out.data_ptr(),
    ))
    return out


MAX_DECODE_HEAD_DIM = 512  # the kernels' per-head buffers (MAX_HEAD_DIM in cpu_kernels.h)


def mha_kernels_apply(x: paddle.Tensor, cache_dtype) -> bool:
    """Whether the attention kernels (``attention_prefill``; ``mha_decode`` for one new token per sequence
    and heads of at most ``MAX_DECODE_HEAD_DIM``; MLA's ``native_decode.mla_decode_attention``, which also
    needs ``weights_readable(kv_b_proj.weight)``) serve a layer: a float32 cache and ``vector_kernels_apply(x)``."""
    return cache_dtype == paddle.float32 and vector_kernels_apply(x)


def mha_decode(
    q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor,
    cache_keys: paddle.Tensor, cache_values: paddle.Tensor, mask: paddle.Tensor, position: int, scale: float,
) -> paddle.Tensor:
    """One decode step of multi-head attention by the kernel (``mha_kernels_apply``).

    Args:
        q: [B, 1, nh * D] and k, v: [B, 1, kv_heads * D], the projections of the new tokens (before RoPE).
        cos, sin: [B, 1, D] float32, the rotary table at the new tokens' positions.
        cache_keys, cache_values: [B, kv_heads, L, D] float32, the layer's heads-first cache; the new key
            (rotated) and value are written at ``position``.
        mask: additive [B, 1, 1, L] float32 (keys after ``position`` are not read).
    Returns:
        [B, 1, nh * D], the attention output before ``o_proj``.
    """
    batch, kv_heads, max_len, head_dim = cache_keys.shape
    heads = q.shape[-1] // head_dim
    check_step_mask(mask, batch, max_len)
    tensors = [t if t.is_contiguous() else t.contiguous() for t in (q, k, v, cos, sin, mask)]
    out = output_tensor(q.shape)
    q, k, v, cos, sin, mask = tensors
    check_status(kernel_library().mha_decode(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), cache_keys.data_ptr(),
        cache_values.data_ptr(), mask.data_ptr(), out.data_ptr(), batch, heads, kv_heads, head_dim, max_len,
        position, scale,
    ))
    return out


def rope_store_prefill(
    q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor,
    cache_keys: paddle.Tensor, cache_values: paddle.Tensor, start: int,
) -> paddle.Tensor:
    """A prompt's rotary embedding and cache write by the kernel (``mha_kernels_apply``).

    Args:
        q: [B, T, nh * D] and k, v: [B, T, kv_heads * D] float32, the projections of the new tokens (before
            RoPE); q is the caller's own output, rotated in place when contiguous.
        cos, sin: [B, T, D] float32, the rotary table at the new tokens' positions.
        cache_keys, cache_values: [B, kv_heads, L, D] float32, the layer's heads-first cache; the keys
            (rotated) and values are written at ``start .. start + T - 1``.
    Returns:
        q rotated, [B, T, nh, D].
    """
    batch, kv_heads, max_len, head_dim = cache_keys.shape
    tokens, heads = q.shape[1], q.shape[-1] // head_dim
    kv_shape, table_shape = [batch, tokens, kv_heads * head_dim], [batch, tokens, head_dim]
    if (
        not 0 <= start <= max_len - tokens or len(q.shape) != 3 or list(q.shape[:2]) != [batch, tokens]
        or q.shape[-1] % head_dim
        or list(k.shape) != kv_shape or list(v.shape) != kv_shape or list(cos.shape) != table_shape
        or list(sin.shape) != table_shape or list(cache_values.shape) != list(cache_keys.shape)
    ):
        raise ValueError(
            f"rope_store_prefill: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, cos {list(cos.shape)}, "
            f"sin {list(sin.shape)} at {start} do not fit a cache of {list(cache_keys.shape)} and "
            f"{list(cache_values.shape)}"
        )
    q, k, v, cos, sin = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v, cos, sin))
    kernel_library().rope_store_prefill(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), cos.data_ptr(), sin.data_ptr(), cache_keys.data_ptr(),
        cache_values.data_ptr(), batch, tokens, heads, kv_heads, head_dim, max_len, start,
    )
    return q.reshape([batch, tokens, heads, head_dim])


def check_step_mask(mask: paddle.Tensor, batch: int, max_len: int) -> None:
    """Raise unless ``mask`` is the [B, 1, 1, max_len] mask of a one-token step over the cache."""
    if list(mask.shape) != [batch, 1, 1, max_len]:
        raise ValueError(f"mask {list(mask.shape)} does not fit a one-token step over a cache of {max_len}")


def attention_qkv(qkv: paddle.Tensor, heads: int, scale: float) -> paddle.Tensor:
    """Bidirectional softmax attention by the kernel (``vector_kernels_apply``): qkv [N, P, 3 * C] float32,
    the fused projection (q, k, v side by side, heads side by side within each) -> [N, P, C] with the
    heads side by side."""
    batch, tokens, triple = qkv.shape
    qkv = qkv if qkv.is_contiguous() else qkv.contiguous()
    out = output_tensor([batch, tokens, triple // 3])
    check_status(
        kernel_library().attention_qkv(qkv.data_ptr(), out.data_ptr(), batch, tokens, triple // 3, heads, scale)
    )
    return out


def attention_prefill(
    q: paddle.Tensor, keys: paddle.Tensor, values: paddle.Tensor, mask: paddle.Tensor, start: int, scale: float,
    tokens_first: bool = False,
) -> paddle.Tensor:
    """Causal attention of T new tokens over keys and values by the kernel (``mha_kernels_apply``).

    Args:
        q: [B, T, nh, Dk] float32, rotated.
        keys, values: [B, kv_heads, S, Dk] and [B, kv_heads, S, Dv] (the MHA cache), or with ``tokens_first``
            [B, S, kv_heads, Dk] and [B, S, kv_heads, Dv] (MLA's keys and values expanded from its cache),
            holding positions 0 .. start + T - 1.
        mask: additive [B, 1, T, L] float32, L >= start + T.
    Returns:
        [B, T, nh * Dv].
    """
    if any(t.ndim != 4 or t.dtype != paddle.float32 for t in (q, keys, values)) or start < 0:
        raise ValueError(f"attention_prefill takes float32 q, keys and values of rank 4 and a start >= 0, not "
                         f"{[(list(t.shape), str(t.dtype)) for t in (q, keys, values)]} from {start}")
    batch, q_len, heads, key_dim = q.shape
    value_dim = values.shape[3]
    key_len, kv_heads = (keys.shape[1], keys.shape[2]) if tokens_first else (keys.shape[2], keys.shape[1])
    mask_len = mask.shape[-1]
    if list(mask.shape) != [batch, 1, q_len, mask_len] or mask.dtype != paddle.float32 or mask_len < start + q_len:
        raise ValueError(f"mask {list(mask.shape)} {mask.dtype} does not fit {q_len} queries after {start} positions")
    position_axes = [key_len, kv_heads] if tokens_first else [kv_heads, key_len]
    if (list(keys.shape) != [batch, *position_axes, key_dim] or list(values.shape) != [batch, *position_axes, value_dim]
            or key_len < start + q_len or kv_heads == 0 or heads % kv_heads):
        raise ValueError(f"keys {list(keys.shape)} and values {list(values.shape)} do not fit queries "
                         f"{list(q.shape)} after {start} positions")
    q, keys, values, mask = (t if t.is_contiguous() else t.contiguous() for t in (q, keys, values, mask))
    out = output_tensor([batch, q_len, heads * value_dim])
    check_status(kernel_library().attention_prefill(
        q.data_ptr(), keys.data_ptr(), values.data_ptr(), mask.data_ptr(), out.data_ptr(), batch, heads, kv_heads,
        q_len, key_len, mask_len, key_dim, value_dim, start, int(tokens_first), scale,
    ))
    return out


def vector_kernels_apply(x: paddle.Tensor) -> bool:
    """Whether the elementwise kernels (``softmax_last_axis``, ``gelu_tanh_``) serve ``x``:
    ``inference_kernels_apply(x)`` and the library built with AVX-512 (its exponential is written for
    that width)."""
    return inference_kernels_apply(x) and vector_kernels_built()


def vector_kernels_built() -> bool:
    """Whether the kernel library is built and with AVX-512 (16 float lanes): the GEMM, the attention and
    elementwise kernels and the fused decode step are written for that width."""
    library = kernel_library()
    return library is not None and library.vector_lanes() == 16


def softmax_last_axis(
    scores: paddle.Tensor, overwrite: bool = False, mask: Optional[paddle.Tensor] = None
) -> paddle.Tensor:
    """``softmax(scores + mask)`` over the last axis by the kernel: scores float32 on the CPU, [..., S], or
    [B, nh, T, S] with an additive float32 ``mask`` [B or 1, 1, T, S]. Returns the scores' shape.

    ``overwrite`` writes the result into ``scores`` (the caller's scratch): a fresh output of attention
    size is mostly page faults here (a [4, 729, 729] block: 3.1 ms into new memory, 0.8 ms in place,
    6.4 ms through Paddle's softmax). The mask is added row by row inside the kernel. The exponential is
    a degree-7 polynomial after range reduction (about 1e-7 relative).
    """
    if not scores.is_contiguous():
        scores = scores.contiguous()
    out = scores if overwrite else output_tensor(scores.shape)
    rows, n = math.prod(scores.shape[:-1]), scores.shape[-1]
    if mask is None:
        kernel_library().softmax_rows(scores.data_ptr(), None, out.data_ptr(), rows, n, 1, 1, 1)
        return out
    batch, heads, q_len, _ = scores.shape
    if mask.dtype != paddle.float32 or list(mask.shape) not in ([batch, 1, q_len, n], [1, 1, q_len, n]):
        raise ValueError(f"mask {list(mask.shape)} {mask.dtype} does not fit scores {list(scores.shape)}")
    mask = mask if mask.is_contiguous() else mask.contiguous()
    kernel_library().softmax_rows(
        scores.data_ptr(), mask.data_ptr(), out.data_ptr(), rows, n, heads, q_len, mask.shape[0]
    )
    return out


def gelu_tanh_(x: paddle.Tensor) -> paddle.Tensor:
    """The tanh-approximate GELU of ``x`` written into ``x`` (the caller's scratch) by the kernel; returns
    ``x``. float32 on the CPU (``vector_kernels_apply(x)``)."""
    if not x.is_contiguous():
        x = x.contiguous()
    kernel_library().gelu_tanh_inplace(x.data_ptr(), math.prod(x.shape))
    return x
