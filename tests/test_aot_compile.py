"""AOT compile gate: the Triton kernels compiled for sm_75, sm_80, sm_86, sm_89 and sm_90 with Triton's
bundled ptxas, no GPU needed. Default configs must not spill, must fit a block's shared memory on
each architecture (64 KB on sm_75, 99 KB on sm_86/sm_89), and the streaming
reduction and positive-compaction kernels must not fence the whole GPU: a default (acq_rel) atomic
comes with a MEMBAR .GPU, which waits until the warp's earlier writes are visible to the whole GPU.

Toy kernels check that the gate can fail: an acq_rel atomic has the fence, a relaxed one has not,
and a register tile too big for one warp spills. The compiles run in worker processes (see
``benchmarks/kernel_resources.py``), so the toy kernels live at module level.
"""

import pytest
import torch
import triton
import triton.language as tl

from benchmarks import kernel_resources as kr

MISSING = kr.missing_tools()
pytestmark = [pytest.mark.aot, pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


@triton.jit
def _toy_atomic(out_ptr, value):
    tl.atomic_add(out_ptr, value)  # default semantics: acq_rel, GPU scope


@triton.jit
def _toy_relaxed_atomic(out_ptr, value):
    tl.atomic_add(out_ptr, value, sem="relaxed")


@triton.jit
def _toy_spill(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)  # all BLOCK values stay live across the reductions
    tl.store(out_ptr + offs, x - tl.sum(x, 0) / tl.max(x, 0))


@triton.jit
def _toy_scale(x_ptr, out_ptr, n, m, factor, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=offs < n * m) * factor, mask=offs < n * m)


@triton.jit
def _toy_tile_loop(x_ptr, out_ptr, n, FLOAT64: tl.constexpr):
    """Tiles of 32 x 64 float32 terms; their row sums added in float64 each tile, or in float32."""
    rows = tl.arange(0, 32).to(tl.float32)
    total = tl.zeros([32], dtype=tl.float64 if FLOAT64 else tl.float32)
    for start in range(0, n, 64):
        cols = start + tl.arange(0, 64)
        x = tl.load(x_ptr + cols, mask=cols < n, other=0.0)
        terms = tl.minimum(tl.maximum(x[None, :] - rows[:, None] * 0.5 + 0.5, 0.0), 1.0) * x[None, :]
        total += tl.sum(terms, axis=1).to(total.dtype)
    tl.store(out_ptr + tl.arange(0, 32), total.to(tl.float32))


@pytest.fixture(scope="module")
def toys():
    x = torch.zeros(8192)
    atomic = kr.variant(_toy_atomic, (x, 1.5), {}, num_warps=1, num_stages=1)
    relaxed = kr.variant(_toy_relaxed_atomic, (x, 1.5), {}, num_warps=1, num_stages=1)
    spill = kr.variant(_toy_spill, (x, x), {"BLOCK": 8192}, num_warps=1, num_stages=1)  # 256 values a thread
    tiles = {f"tiles_float{64 if wide else 32}": (kr.variant(_toy_tile_loop, (x, x, 1000), {"FLOAT64": wide}), 86, False)
             for wide in (True, False)}
    jobs = {**{("atomic", arch): (atomic, arch) for arch in kr.ARCHS},
            **{("relaxed", arch): (relaxed, arch) for arch in kr.ARCHS}, "spill": (spill, 90, False), **tiles}
    return dict(zip(jobs, kr.compile_all(jobs.values())))


def test_variant_specializes_like_the_runtime():
    x = torch.zeros(64)
    v = kr.variant(_toy_scale, (x, x[1:], 1, 17, 0.5), {"BLOCK": 64})
    assert dict(v.signature) == {"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "constexpr", "m": "i32",
                                 "factor": "fp32", "BLOCK": "constexpr"}
    assert dict(v.constexprs) == {(2,): 1, (5,): 64}  # an int equal to 1 becomes a constant
    assert dict(v.attrs) == {(0,): (("tt.divisibility", 16),)}  # the offset view is not 16-byte aligned
    w = kr.variant(_toy_scale, (torch.ones(64), torch.ones(64), 32, 32, 2.0), {"BLOCK": 64})
    assert dict(w.attrs) == {(0,): (("tt.divisibility", 16),), (1,): (("tt.divisibility", 16),),
                             (2,): (("tt.divisibility", 16),), (3,): (("tt.divisibility", 16),)}
    same = kr.variant(_toy_scale, (torch.zeros(8), torch.zeros(8), 48, 16, -1.0), {"BLOCK": 64})
    assert len({v, w, same}) == 2 and same == w  # other tensors, same specialization: one variant


def test_occupancy_follows_the_cuda_rules():
    """Expected values worked out by hand from the CUDA rules: registers per warp rounded up to 256
    and allotted per quarter SM; a block's shared memory plus the reserve (1 KB from sm_80 on, none
    on sm_75) rounded up to 128 B (256 B on sm_75); the fewest blocks allowed by registers, shared
    memory, warps (32 per SM on sm_75, 48 on sm_86/sm_89, 64 on sm_80/sm_90) and blocks (16 on
    sm_75 and sm_86, 24 on sm_89, 32 on sm_80 and sm_90)."""
    assert kr.ARCHS == (75, 80, 86, 89, 90)
    assert kr.occupancy(32, 0, 4, 90) == 1.0
    assert kr.occupancy(255, 0, 4, 90) == 8 / 64  # 8192 registers a warp: 2 warps per quarter SM
    assert kr.occupancy(40, 0, 4, 80) == 48 / 64  # 1280 a warp: 12 warps per quarter, not 51 per SM
    assert kr.occupancy(32, 100 * 1024, 4, 80) == 4 / 64  # 101 KB with the reserve: one block
    assert kr.occupancy(32, 100 * 1024, 4, 90) == 8 / 64
    assert kr.occupancy(32, 200 * 1024, 4, 80) == 0.0  # over the per-block limit

    # sm_75 (T4): 32 warps, 16 blocks, 64 KB with no reserve, 256-byte units
    assert kr.occupancy(32, 0, 4, 75) == 1.0  # 8 blocks of 4 warps fill the 32 slots; no shared memory
    assert kr.occupancy(32, 0, 1, 75) == 16 / 32  # one-warp blocks: 16 blocks at most
    assert kr.occupancy(128, 0, 4, 75) == 16 / 32  # 4096 registers a warp: 4 warps per quarter
    assert kr.occupancy(255, 0, 4, 75) == 8 / 32  # 8160 -> 8192 a warp: 2 per quarter
    assert kr.occupancy(32, 9300, 1, 75) == 6 / 32  # 9300 B -> 9472: 6 blocks (7 in 128-byte units)
    assert kr.occupancy(32, 64 * 1024, 4, 75) == 4 / 32  # the whole 64 KB: one block
    assert kr.occupancy(32, 64 * 1024 + 1, 4, 75) == 0.0  # over the per-block limit
    assert kr.occupancy(32, 40 * 1024, 4, 75) == 4 / 32  # 40 KB: one block in 64 KB ...
    assert kr.occupancy(32, 40 * 1024, 4, 80) == 16 / 64  # ... 41 KB with the reserve: 4 blocks in 164 KB

    # sm_86 / sm_89 (A10, RTX 30xx / L4, RTX 40xx): 48 warps, 16 / 24 blocks, 100 KB per SM, 99 KB a block
    assert kr.occupancy(32, 0, 4, 86) == kr.occupancy(32, 0, 4, 89) == 1.0  # 12 blocks of 4 warps
    assert kr.occupancy(32, 0, 1, 86) == 16 / 48  # one-warp blocks: 16 blocks on sm_86 ...
    assert kr.occupancy(32, 0, 1, 89) == 24 / 48  # ... 24 on sm_89 ...
    assert kr.occupancy(32, 0, 1, 80) == 32 / 64  # ... and 32 on sm_80
    assert kr.occupancy(40, 0, 4, 86) == 1.0  # 1280 a warp: 12 per quarter = 48, all of sm_86's slots
    assert kr.occupancy(64, 0, 4, 89) == 32 / 48  # 2048 a warp: 8 per quarter
    assert kr.occupancy(32, 48 * 1024, 4, 86) == 8 / 48  # 49 KB with the reserve: 2 blocks in 100 KB
    assert kr.occupancy(32, 48 * 1024, 4, 80) == 12 / 64  # 3 blocks in 164 KB
    assert kr.occupancy(32, 99 * 1024, 4, 89) == 4 / 48  # 99 KB + 1 KB reserve: exactly one block
    assert kr.occupancy(32, 99 * 1024 + 1, 4, 86) == 0.0  # over sm_86's per-block limit ...
    assert kr.occupancy(32, 99 * 1024 + 1, 4, 80) == 4 / 64  # ... which sm_80 runs


@pytest.mark.parametrize("arch", kr.ARCHS)
def test_gate_sees_gpu_scope_fences(toys, arch):
    atomic, relaxed = toys["atomic", arch], toys["relaxed", arch]
    assert not isinstance(atomic, str) and not isinstance(relaxed, str), (atomic, relaxed)
    assert atomic.has_membar_gpu and "MEMBAR" in atomic.sass
    assert relaxed.has_membar_gpu is False and ("RED" in relaxed.sass or "ATOM" in relaxed.sass)
    assert atomic.spill_stores == relaxed.spill_stores == 0


def test_gate_sees_spills(toys):
    spill = toys["spill"]
    assert not isinstance(spill, str), spill
    assert spill.spill_stores > 0 and spill.spill_loads > 0 and spill.registers == 255
    assert spill.has_membar_gpu is None  # not disassembled
    assert spill.occupancy == 8 / 64  # 8192 registers a warp: 2 warps in each quarter of the SM


def test_gate_sees_float64_in_tile_loops(toys):
    """A tile loop that adds each tile's sums in float64 has float64 instructions (the conversion
    and the adds); adding them in float32 has none. The loop over the tiles is the only loop."""
    wide, narrow = toys["tiles_float64"], toys["tiles_float32"]
    assert not isinstance(wide, str) and not isinstance(narrow, str), (wide, narrow)
    assert wide.tile_loop_float64 >= 2 and narrow.tile_loop_float64 == 0
    assert "add.f64" in wide.ptx and ".f64" not in narrow.ptx


@pytest.fixture(scope="module")
def kernels():
    """The distinct default-config variants of a float32 and a float64 call of every loss, hard and
    smooth step, deterministic or not, compiled for every architecture of ``kr.ARCHS`` (float64
    tiles need twice the registers: the likeliest to spill)."""
    launches = kr.representative_launches(logits_dtypes=("float32", "float64"), target_dtypes=("float32",),
                                          deltas=(0.0, 0.5), sizes=kr.SIZES[:1])
    variants = [v for v, default in kr.variant_matrix(launches).items() if default]
    jobs = [(v, arch, _streaming(v.name)) for v in variants for arch in kr.ARCHS]  # disassembly where checked
    return list(zip(jobs, kr.compile_all(jobs)))


def _streaming(name):
    return any(word in name for word in ("reduce", "scan", "compact"))


def _label(v, arch, *_):
    return f"{v.name} [{v.config}; {v.dtypes}] sm_{arch}"


def test_kernels_compile(kernels):
    errors = [f"{_label(*job)}: {r}" for job, r in kernels if isinstance(r, str)]
    assert not errors, "\n".join(errors)


def test_default_configs_do_not_spill(kernels):
    spills = [f"{_label(*job)}: {r.spill_stores} B stored, {r.spill_loads} B loaded" for job, r in kernels
              if not isinstance(r, str) and (r.spill_stores or r.spill_loads)]
    assert not spills, "\n".join(spills)


def test_shared_memory_fits_a_block(kernels):
    over = [f"{_label(*job)}: {r.shared_bytes} B" for job, r in kernels
            if not isinstance(r, str) and r.shared_bytes > kr.HARDWARE[r.arch].smem_per_block]
    assert not over, "\n".join(over)


def test_streaming_kernels_have_no_gpu_scope_fence(kernels):
    streaming = [(job, r) for job, r in kernels if not isinstance(r, str) and _streaming(r.kernel)]
    names = {r.kernel for _, r in streaming}
    assert any("reduce" in n for n in names) and any("scan" in n or "compact" in n for n in names), names
    fenced = [f"{_label(*job)}: {', '.join(sorted(set(kr.MEMBAR_GPU.findall(r.sass))))}"
              for job, r in streaming if r.has_membar_gpu]
    assert not fenced, "\n".join(fenced)


STREAMING_PASSES = {"_scan_kernel", "_reduce_kernel", "_distribute_kernel"}


def _contiguous(v):
    """Both streams flat with stride 1 (``layout`` of a contiguous tensor)."""
    values = kr.specialized_values(v)
    return all(values.get(name) == 1 for name in ("S_NDIM", "Y_NDIM", "s_st0", "y_st0"))


def test_contiguous_streams_load_16_bytes_at_a_time(kernels):
    """The three passes over all N elements load whole blocks of contiguous tensors without a
    mask from a 16-divisible start: the PTX has 128-bit loads (ld.global.v4.b32 / .v2.b64)."""
    checked = [(job, r) for job, r in kernels
               if not isinstance(r, str) and r.kernel in STREAMING_PASSES and _contiguous(job[0])]
    assert {r.kernel for _, r in checked} == STREAMING_PASSES
    scalar = [_label(*job) for job, r in checked if r.vector_loads == 0]
    assert not scalar, "\n".join(scalar)


TILE_KERNELS = {"_per_positive_kernel", "_finish_kernel"}


def test_float32_tile_loops_do_without_float64(kernels):
    """Float32 calls in the default (non-deterministic) mode add their tile sums in float32 over
    a span of tiles before a float64 add, and compare targets as integer keys: a tile loop keeps
    at most one float64 instruction (the conversion of a float64 column load to float32)."""
    checked = [(job, r) for job, r in kernels if not isinstance(r, str) and r.kernel in TILE_KERNELS
               and "DETERMINISTIC=False" in job[0].config and dict(job[0].signature)["s_pos_ptr"] == "*fp32"]
    assert {r.kernel for _, r in checked} == TILE_KERNELS
    heavy = [f"{_label(*job)}: {r.tile_loop_float64}" for job, r in checked if r.tile_loop_float64 > 1]
    assert not heavy, "\n".join(heavy)
