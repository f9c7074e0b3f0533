"""Ahead-of-time resource report of the Triton kernels for sm_75 to sm_90, without a GPU.

    python -m benchmarks.kernel_resources [--out DIR] [--quick]

Triton compiles for any NVIDIA target on a CPU-only machine: the wheel holds the front end, LLVM
and ptxas. What a GPU would compile is taken from real calls: every loss runs through the
interpreter with its launches recorded (``brl_triton.kernels._config.record_launches``), and each
launch becomes a :class:`Variant` keyed the way Triton's runtime keys it (signature, constexprs,
and the attributes it derives from the argument values: 16-divisible pointers and ints, ints
equal to 1). Kernels with alternative configs (``_config.Tunable``) are compiled with each of
them. Registers, spills and static shared memory come from ``ptxas -v`` (Triton only learns them
from the driver, when a GPU loads the cubin), the instructions from ``cuobjdump -sass``, and the
occupancy from the CUDA occupancy rules. Writes kernel_resources.csv and kernel_resources.md.

The architectures are the keys of ``HARDWARE`` (``ARCHS``): T4 (sm_75), A100 (sm_80), A10 and RTX 30xx
(sm_86), L4 and RTX 40xx (sm_89), H100 (sm_90). A variant that does not compile for one of them gets a
row with the compiler's error in the ``error`` column, and the command exits with status 1.

The full matrix (every logits x target dtype, mode, delta and size; every config) is ~380 variants,
1,900 compiles over the five architectures. --quick (float32, one size) is 93 variants.

Compiles run in spawned worker processes with the interpreter off: under ``TRITON_INTERPRET=1``
``@triton.jit`` makes interpreter objects, which Triton cannot compile.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import itertools
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

# Without a GPU the losses only run through the interpreter, which triton applies to every
# @triton.jit function defined once it is imported, its own standard library included: it must be
# on before triton is first imported. (The compile workers are started with it off.)
if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

FIGURES = Path(__file__).resolve().parent / "figures"
LOGITS_DTYPES = ("float16", "bfloat16", "float32", "float64")
TARGET_DTYPES = ("float32", "int64", "bool")
# (N, P): sizes that are not multiples of 16, and ones that are with a single positive, so that both
# the plain and the specialized (16-divisible, == 1) integer arguments get compiled
SIZES = ((203, 13), (256, 1))
# a memory barrier whose scope is the whole GPU or the system (MEMBAR.SC.GPU, MEMBAR.ALL.SYS, ...)
MEMBAR_GPU = re.compile(r"\bMEMBAR(?:\.\w+)*\.(?:GPU|SYS)\b")
# a 16-byte global load: four 32-bit or two 64-bit words (ld.global.v4.b32, ld.global.nc.v2.b64, ...)
VECTOR_LOAD = re.compile(r"\bld\.global(?:\.\w+)*\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b")
# float64 arithmetic and conversions from or to float64 in PTX (moves and loads excluded)
FLOAT64_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:add|sub|mul|fma|div|rcp|min|max|neg|abs|setp\.\w+|selp)\S*\.f64\b"
                        r"|^\s*(?:@!?%p\d+\s+)?cvt\S*\.f64\b|^\s*(?:@!?%p\d+\s+)?cvt\S*\.f64\.\w+", re.M)
FLOAT32_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:add|sub|mul|fma|min|max)\S*\.f32\b", re.M)
TILE_LOOP_FLOAT32 = 64  # a 32 x 64 tile of 128 threads is 16 terms a thread, several float32 operations each
_LABEL = re.compile(r"^(\$L__\w+):", re.M)
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")


@dataclass(frozen=True)
class Hardware:
    """What bounds the resident blocks of one SM, per architecture. Where each number comes from:

    - NVIDIA's occupancy calculator, ``cuda_occupancy.h`` (read in CUDA 12.6's copy):
      resident blocks per SM (cudaOccMaxBlocksPerMultiprocessor: 16 on 7.5, 32 on 8.0, 24 on 8.9,
      16 on the other 8.x, 32 on 9.0); shared-memory allocation unit (cudaOccSMemAllocationGranularity:
      256 B on 7.x, 128 B on 8.x and 9.x); the largest carveout (cudaOccAlignUpShmemSizeVoltaPlus:
      64 KB on Turing, 164 KB on 8.0, 100 KB on the other 8.x, 228 KB on 9.0); the driver's reserve
      per block, added from compute capability 8 on (cudaOccSMemPerBlock), so a block's own limit
      is the carveout less 1 KB (163, 99, 227 KB) and the whole 64 KB on sm_75; register allocation
      (cudaOccMaxBlocksPerSMRegsLimit: 256-register units per warp, 4 sub-partitions).
    - Resident threads per SM, from the CUDA C++ Programming Guide's "Technical Specifications per
      Compute Capability" table, as quoted by NVIDIA's tuning guides and forum answers: 1024 (32
      warps) on 7.5, 2048 (64) on 8.0 and 9.0, 1536 (48) on 8.6 and 8.9. 64K 32-bit registers per
      SM on all five."""

    smem_per_sm: int  # bytes, at the largest shared-memory carveout
    smem_per_block: int  # bytes one block may use (opt-in maximum), the reserved 1 KB not included
    smem_reserved_per_block: int = 1024  # 0 before sm_80
    smem_granularity: int = 128  # a block's shared memory is allocated in 128-byte units (256 on sm_7x)
    regs_per_sm: int = 65536  # 32-bit registers (64K on every architecture here)
    reg_granularity: int = 256  # registers are allocated per warp, in units of 256 ...
    sub_partitions: int = 4  # ... from one of the SM's 4 quarter register files
    max_regs_per_thread: int = 255
    max_warps_per_sm: int = 64  # 2048 resident threads
    max_warps_per_block: int = 32  # 1024 threads
    max_blocks_per_sm: int = 32


KB = 1024
HARDWARE = {
    # T4, RTX 20xx: 1024 threads and 64 KB of shared memory per SM, all of it for one block
    75: Hardware(smem_per_sm=64 * KB, smem_per_block=64 * KB, smem_reserved_per_block=0, smem_granularity=256,
                 max_warps_per_sm=32, max_blocks_per_sm=16),
    80: Hardware(smem_per_sm=164 * KB, smem_per_block=163 * KB),  # A100
    # A10, A40, RTX 30xx: 1536 threads, 100 KB per SM
    86: Hardware(smem_per_sm=100 * KB, smem_per_block=99 * KB, max_warps_per_sm=48, max_blocks_per_sm=16),
    # L4, L40, RTX 40xx: as sm_86, with up to 24 blocks
    89: Hardware(smem_per_sm=100 * KB, smem_per_block=99 * KB, max_warps_per_sm=48, max_blocks_per_sm=24),
    90: Hardware(smem_per_sm=228 * KB, smem_per_block=227 * KB),  # H100 / H200
}
ARCHS = tuple(HARDWARE)


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(registers: int, shared_bytes: int, num_warps: int, arch: int) -> float:
    """Resident warps per SM over the maximum, the way cudaOccMaxActiveBlocksPerMultiprocessor
    counts them: the fewest blocks allowed by registers, shared memory, warps and blocks."""
    hw = HARDWARE[arch]
    if (num_warps > hw.max_warps_per_block or registers > hw.max_regs_per_thread
            or shared_bytes > hw.smem_per_block):
        return 0.0
    regs_per_warp = _round_up(max(registers, 1) * 32, hw.reg_granularity)
    warps_by_regs = hw.regs_per_sm // hw.sub_partitions // regs_per_warp * hw.sub_partitions
    smem_per_block = _round_up(shared_bytes + hw.smem_reserved_per_block, hw.smem_granularity)
    # no shared memory and no reserve (sm_75): shared memory does not limit the blocks
    blocks_by_smem = hw.smem_per_sm // smem_per_block if smem_per_block else hw.max_blocks_per_sm
    blocks = min(warps_by_regs // num_warps, blocks_by_smem, hw.max_warps_per_sm // num_warps,
                 hw.max_blocks_per_sm)
    return blocks * num_warps / hw.max_warps_per_sm


@dataclass(frozen=True)
class Variant:
    """One compilation of a kernel, as Triton's runtime keys it (equal variants compile to the
    same binary). ``config`` and ``dtypes`` only label it in the report."""

    module: str
    name: str  # qualified name of the kernel in its module
    signature: tuple  # ((parameter, type), ...): "*fp32", "i32", "fp32", "constexpr", ...
    constexprs: tuple  # ((path, value), ...), including ints specialized to 1 and None
    attrs: tuple  # ((path, ((attribute, value), ...)), ...): "tt.divisibility" 16
    num_warps: int
    num_stages: int
    config: str = field(default="", compare=False)
    dtypes: str = field(default="", compare=False)


@dataclass(frozen=True)
class Resources:
    kernel: str
    arch: int
    registers: int  # per thread
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int  # per block: Triton's dynamic shared memory plus ptxas' static
    occupancy: float
    has_membar_gpu: bool | None  # a GPU- or system-scope barrier in the SASS; None: not disassembled
    sass: str = field(repr=False)
    vector_loads: int = 0  # 128-bit global loads in the PTX (ld.global.v4 of 32-bit, .v2 of 64-bit words)
    tile_loop_float64: int = 0  # the most float64 instructions in one tile loop of the PTX (tile_loop_float64)
    ptx: str = field(default="", repr=False)


def tile_loop_float64(ptx: str) -> int:
    """The most float64 instructions (arithmetic, comparisons, conversions) in one tile loop of a
    kernel's PTX: an innermost loop (the lines from a label to a branch back to it, holding no
    other loop) with at least TILE_LOOP_FLOAT32 float32 instructions, i.e. a loop over 2-D tiles
    of float32 work, where float64 costs most (1/64 of the float32 rate on GeForce GPUs). Loops
    that only sum float64 values once per call (the loss outputs) are not tile loops."""
    lines = ptx.splitlines()
    where = {match[1]: number for number, line in enumerate(lines) if (match := _LABEL.match(line))}
    loops = [(where[match[1]], number) for number, line in enumerate(lines)
             if (match := _BRANCH.search(line)) and where.get(match[1], number + 1) <= number]
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    bodies = ["\n".join(lines[a:b + 1]) for a, b in innermost]
    return max((len(FLOAT64_OP.findall(body)) for body in bodies
                if len(FLOAT32_OP.findall(body)) >= TILE_LOOP_FLOAT32), default=0)


def _unwrap(kernel):
    """(innermost function, @triton.jit options): through autotuners and interpreter objects."""
    options = {}
    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        if isinstance(kernel, InterpretedFunction):
            options = kernel.kwargs
        kernel = kernel.fn
    return kernel, options


def _lookup(module: str, qualname: str):
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _key(kernel) -> tuple[str, str]:
    fn, _ = _unwrap(kernel)
    return fn.__module__, fn.__qualname__


_binding_functions: dict = {}


def _binding_function(kernel) -> JITFunction:
    """A JITFunction to bind arguments with, exactly as the runtime does. Under the interpreter the
    package records the plain function: wrap it again with the decorator's options (the module's
    own object keeps them), e.g. do_not_specialize. Nothing is compiled from it."""
    fn, options = _unwrap(kernel)
    if isinstance(fn, JITFunction):
        return fn
    if fn not in _binding_functions:
        if not options:
            options = _unwrap(_lookup(fn.__module__, fn.__qualname__))[1]
        _binding_functions[fn] = JITFunction(fn, **options)
    return _binding_functions[fn]


def variant(kernel, args, constexprs, num_warps: int = 4, num_stages: int = 2) -> Variant:
    """What ``kernel[grid](*args, num_warps=..., num_stages=..., **constexprs)`` compiles, with
    Triton's own binder and argument packing (runtime/jit.py), so specialization cannot drift."""
    jit = _binding_function(kernel)
    backend = make_backend(GPUTarget("cuda", 90, 32))  # specialization does not depend on the arch
    kwargs = {**constexprs, "num_warps": num_warps, "num_stages": num_stages}
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, consts, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    config = [f"{jit.arg_names[path[0]]}={value}" for path, value in consts.items()
              if jit.params[path[0]].is_constexpr]
    return Variant(
        module=jit.__module__, name=jit.__qualname__, signature=tuple(signature.items()),
        constexprs=tuple(sorted(consts.items())),
        attrs=tuple(sorted((path, tuple(tuple(a) for a in attr)) for path, attr in attrs.items() if attr)),
        num_warps=num_warps, num_stages=num_stages,
        config=" ".join([*config, f"warps={num_warps}", f"stages={num_stages}"]),
        dtypes=",".join(t[1:] for _, t in signature.items() if t.startswith("*")),
    )


def variant_of(launch) -> Variant:
    """The variant of a recorded ``_config.Launch``."""
    return variant(launch.kernel, launch.args, launch.constexprs, launch.num_warps, launch.num_stages)


def specialized_values(v: Variant) -> dict:
    """Parameter name -> value of every argument ``v`` compiles in as a constant: its constexprs,
    and the integers Triton specialized because they equal 1 (a stride of 1, for one)."""
    names = _binding_function(_lookup(v.module, v.name)).arg_names
    return {names[path[0]]: value for path, value in v.constexprs if len(path) == 1}


def missing_tools() -> str | None:
    """Why nothing can be compiled here (ptxas or cuobjdump not found), or None."""
    try:
        get_ptxas(90)
        knobs.nvidia.cuobjdump
    except RuntimeError as e:
        return f"Triton's bundled NVIDIA tools are missing: {e}"
    return None


def _compilable(v: Variant) -> JITFunction:
    fn = _lookup(v.module, v.name)
    while not isinstance(fn, (JITFunction, InterpretedFunction)) and hasattr(fn, "fn"):
        fn = fn.fn
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{v.module}.{v.name} was imported under TRITON_INTERPRET=1: cannot compile it")
    return fn


def _ptxas_log(compiled, arch: int, workdir: Path) -> str:
    """``ptxas -v`` on the PTX, with the flags of Triton's make_cubin (backends/nvidia/compiler.py),
    for kernels that came from Triton's cache."""
    md = compiled.metadata
    ptx = workdir / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
           *([] if md.enable_fp_fusion else ["--fmad=false"]), *(md.ptx_options or "").split(),
           f"--gpu-name={sm_arch_from_capability(arch)}", str(ptx), "-o", str(workdir / "ptxas.cubin")]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _disassemble(cubin: bytes, workdir: Path) -> str:
    path = workdir / "triton.cubin"
    path.write_bytes(cubin)
    return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", str(path)], capture_output=True, text=True,
                          check=True).stdout


def compile_variant(v: Variant, arch: int, sass: bool = True) -> Resources:
    """Compile ``v`` for sm_<arch> and measure it. ``sass=False`` skips the disassembly, which costs
    about as much as ptxas. From a process that interprets kernels the compile goes to a worker
    process (see the module docstring)."""
    if not knobs.runtime.interpret:
        return _compile_here(v, arch, sass)
    result, = compile_all([(v, arch, sass)], workers=1)
    if isinstance(result, str):
        raise RuntimeError(result)
    return result


def _compile_here(v: Variant, arch: int, sass: bool = True) -> Resources:
    """:func:`compile_variant` in this process."""
    attrs = {path: [list(a) for a in attr] for path, attr in v.attrs}
    printed = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(printed):
        knobs.nvidia.dump_ptxas_log = True  # Triton runs ptxas -v but only prints the log if asked
        compiled = triton.compile(ASTSource(_compilable(v), dict(v.signature), dict(v.constexprs), attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": v.num_warps, "num_stages": v.num_stages})
    log = printed.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        if "Used" not in log:  # a cache hit: no ptxas ran
            log = _ptxas_log(compiled, arch, Path(tmp))
        code = _disassemble(compiled.asm["cubin"], Path(tmp)) if sass else ""
    registers = int(re.search(r"Used (\d+) registers", log)[1])
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    static_smem = re.search(r"(\d+) bytes smem", log)
    shared = compiled.metadata.shared + (int(static_smem[1]) if static_smem else 0)
    return Resources(v.name, arch, registers, int(spills[1]), int(spills[2]), shared,
                     occupancy(registers, shared, v.num_warps, arch),
                     bool(MEMBAR_GPU.search(code)) if sass else None, code,
                     len(VECTOR_LOAD.findall(compiled.asm["ptx"])), tile_loop_float64(compiled.asm["ptx"]),
                     compiled.asm["ptx"])


def _compile_job(job):
    try:
        return _compile_here(*job)
    except Exception as e:  # reported per row; one broken variant must not hide the others
        where = traceback.extract_tb(e.__traceback__)[-1]
        return f"{type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})"


def compile_all(jobs, workers: int = 2, progress: bool = False) -> list:
    """Run :func:`compile_variant` on each ``(variant, arch[, sass])`` in spawned processes with the
    interpreter off. Returns a :class:`Resources` per job, or the error message as a string.

    The workers inherit the environment when they start, before they import triton (which
    already applies the interpreter to its own standard library), hence the switch here."""
    jobs = list(jobs)
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(_compile_job, jobs)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(jobs), desc="compiling", unit="kernel")
            return list(results)
    finally:
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def _case(n: int, p: int, logits_dtype, target_dtype, device):
    """Random logits; p positives with IoU-like targets in (0, 1], a tenth of the rest ignored
    (int targets: 1 / 0 / -1; bool targets: no ignored entries)."""
    g = torch.Generator().manual_seed(n * 1000 + p)
    logits = torch.randn(n, generator=g, dtype=torch.float64) * 2
    perm = torch.randperm(n, generator=g)
    targets = torch.zeros(n, dtype=torch.float64)
    targets[perm[:p]] = torch.rand(p, generator=g, dtype=torch.float64).clamp_min(0.05)
    targets[perm[p:p + n // 10]] = -1
    if target_dtype == torch.bool:
        targets = targets > 0
    elif not target_dtype.is_floating_point:
        targets = targets.sign()
    return logits.to(device, logits_dtype).requires_grad_(), targets.to(device, target_dtype)


def representative_launches(logits_dtypes=LOGITS_DTYPES, target_dtypes=TARGET_DTYPES,
                            deterministic=(False, True), deltas=(0.0, 0.5), sizes=SIZES) -> list:
    """Every loss, forward and backward with ``backend="triton"``, over the product of the given
    dtypes (names of torch dtypes), modes, deltas and (N, P) sizes; returns the recorded launches."""
    if not torch.cuda.is_available() and not isinstance(triton.language.sum, InterpretedFunction):
        raise RuntimeError("without a GPU the kernels run through the interpreter: set TRITON_INTERPRET=1 "
                           "before triton is imported")
    import brl_triton
    from brl_triton.kernels import _config

    device = "cpu" if _config.INTERPRET else "cuda"
    losses = [(brl_triton.bucketed_rank_sort_loss, {}), (brl_triton.rank_sort_loss, {}),
              (brl_triton.bucketed_ap_loss, {}), (brl_triton.ap_loss, {}),
              (brl_triton.ap_loss, {"interpolated": True})]
    with _config.record_launches() as recorder:
        for (fn, kwargs), ldt, tdt, det, delta, (n, p) in itertools.product(
                losses, logits_dtypes, target_dtypes, deterministic, deltas, sizes):
            if delta == 0 and kwargs.get("interpolated"):
                continue  # the interpolated AP loss needs delta > 0
            logits, targets = _case(n, p, getattr(torch, ldt), getattr(torch, tdt), device)
            out = fn(logits, targets, delta, backend="triton", deterministic=det, **kwargs)
            out = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    return recorder.launches


def tunables() -> dict:
    """``(module, qualname)`` of a kernel -> its ``_config.Tunable``, from the globals of every
    module of ``brl_triton.kernels``."""
    import brl_triton.kernels as package
    from brl_triton.kernels import _config

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        found.update({_key(t.kernel): t for t in vars(module).values() if isinstance(t, _config.Tunable)})
    return found


def variant_matrix(launches, tunable: dict | None = None) -> dict:
    """Every distinct variant of ``launches``, each Tunable kernel's launches with every one of its
    configs in turn. Value: whether the variant is what the recorded (default, not autotuned)
    call compiled; the other configs are what autotuning could pick."""
    tunable = tunables() if tunable is None else tunable
    found: dict = {}
    for launch in launches:
        owner = tunable.get(_key(launch.kernel))
        compiled = launch  # what the call compiled (a dtype may pick its own config) ...
        if owner is not None and owner.default is not owner.gpu_default and _launched_with(launch, owner.default):
            compiled = _with_config(launch, owner.gpu_default)  # ... or, interpreted, what a GPU would
        found[variant_of(compiled)] = True
        for config in owner.configs if owner else ():
            found.setdefault(variant_of(_with_config(launch, config)), False)
    return found


def _with_config(launch, config):
    return replace(launch, constexprs={**launch.constexprs, **config.kwargs}, num_warps=config.num_warps,
                   num_stages=config.num_stages)


def _launched_with(launch, config) -> bool:
    return (all(launch.constexprs.get(name) == value for name, value in config.kwargs.items())
            and (launch.num_warps, launch.num_stages) == (config.num_warps, config.num_stages))


COLUMNS = ["kernel", "config", "dtypes", "arch", "registers", "spill_stores", "spill_loads", "shared_bytes",
           "occupancy", "membar_gpu", "vector_loads", "tile_loop_float64", "default", "signature", "constexprs",
           "attrs", "error"]


def rows(matrix: dict, jobs, results) -> list[dict]:
    """One row per compile (COLUMNS), default configs first within a kernel."""
    out = []
    for (v, arch), r in zip(jobs, results):
        row = {"kernel": v.name, "config": v.config, "dtypes": v.dtypes, "arch": f"sm_{arch}",
               "default": matrix[v], "signature": " ".join(f"{k}:{t}" for k, t in v.signature),
               "constexprs": repr(v.constexprs), "attrs": repr(v.attrs), "error": ""}
        if isinstance(r, str):
            row["error"] = r
        else:
            row.update(registers=r.registers, spill_stores=r.spill_stores, spill_loads=r.spill_loads,
                       shared_bytes=r.shared_bytes, occupancy=round(r.occupancy, 4),
                       membar_gpu=r.has_membar_gpu, vector_loads=r.vector_loads,
                       tile_loop_float64=r.tile_loop_float64)
        out.append(row)
    return sorted(out, key=lambda r: (r["kernel"], not r["default"], r["config"], r["dtypes"], r["arch"]))


def markdown(table: list[dict]) -> str:
    head = ["kernel", "config", "dtypes", "arch", "registers", "spills st/ld (B)", "shared (B)", "occupancy",
            "MEMBAR .GPU", "16-B loads", "f64 per tile loop", "default"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        if r["error"]:
            cells = ["error: " + r["error"].splitlines()[0][:80]] + [""] * 6
        else:
            cells = [str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}", str(r["shared_bytes"]),
                     f"{r['occupancy']:.0%}", "yes" if r["membar_gpu"] else "", str(r["vector_loads"]),
                     str(r["tile_loop_float64"])]
        lines.append("| " + " | ".join([r["kernel"], r["config"], r["dtypes"], r["arch"], *cells,
                                         "yes" if r["default"] else ""]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIGURES)
    parser.add_argument("--quick", action="store_true",
                        help="float32 logits and targets, one size (every loss, mode, delta and config)")
    args = parser.parse_args(argv)
    if reason := missing_tools():
        parser.error(reason)
    float32 = dict(logits_dtypes=("float32",), target_dtypes=("float32",), sizes=SIZES[:1])
    matrix = variant_matrix(representative_launches(**(float32 if args.quick else {})))
    jobs = [(v, arch) for v in matrix for arch in ARCHS]
    table = rows(matrix, jobs, compile_all(jobs, progress=True))
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "kernel_resources.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    text = markdown(table)
    (args.out / "kernel_resources.md").write_text(text)
    print(text)
    return 1 if any(r["error"] for r in table) else 0


if __name__ == "__main__":
    raise SystemExit(main())
