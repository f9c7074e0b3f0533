"""Launch plumbing shared by the Triton kernels: configs, launches, host reads.

Every kernel launch of the backend goes through :func:`launch` (or a :class:`Tunable`), and every
device-to-host read through :func:`read_host`. That keeps three GPU facts checkable without a GPU:
how many kernels one loss call launches, how many times it waits for the device, and which
kernel variants (constexprs, dtypes) a real call compiles (see :func:`record_launches`).

Configs: each kernel has one default config chosen by heuristics (block sizes, warps), so that a
first call compiles one variant per kernel and runs no benchmark. ``BRL_AUTOTUNE=1`` lets the
kernels that have alternatives autotune over them on a GPU (results cached on disk per device by
Triton); their accumulated outputs are restored after every benchmark launch. ``BRL_AUTOTUNE=emulate``
(tests, interpreter) replaces the benchmark by launching every config three times with the
autotuner's own hooks, which is what autotuning does to the arguments on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import triton

# Read when the kernels are defined, which is when triton decides to interpret them.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE_ENV = "BRL_AUTOTUNE"
AUTOTUNE = os.environ.get(AUTOTUNE_ENV, "0")

# Elements per launch of a streaming kernel: longer tensors are launched in chunks, so that grid
# sizes and per-launch counts stay far from 2^31 (offsets inside the kernels are int64 anyway).
MAX_ELEMENTS_PER_LAUNCH = 1 << 30


def launch_chunks(n: int):
    """``(start, stop)`` element ranges of at most MAX_ELEMENTS_PER_LAUNCH covering ``range(n)``."""
    step = MAX_ELEMENTS_PER_LAUNCH
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def size_class(n: int) -> int:
    """Autotuning key for a size: its power of two, so that sizes that change every call (RoIs
    after NMS, say) do not trigger a new tuning run each time."""
    return max(int(n), 1).bit_length()


@dataclass
class Launch:
    """One kernel launch as a GPU would compile it: the jit function, its runtime arguments and
    every constexpr (config values included)."""

    kernel: object  # triton JITFunction
    args: tuple
    constexprs: dict
    num_warps: int
    num_stages: int
    grid: tuple = ()
    device: torch.device | None = None  # the device of the innermost on_device block; None: no guard


@dataclass
class _Counters:
    launches: list = field(default_factory=list)
    host_reads: int = 0


_recorders: list[_Counters] = []
_inside_launch = 0
_inside_host_read = 0
_guarded: list[torch.device] = []


@contextlib.contextmanager
def on_device(device: torch.device):
    """Launch the block's kernels on ``device``. Triton launches on the current CUDA device and
    its current stream, not on the tensors' device: without this, tensors on ``cuda:1`` with
    ``cuda:0`` current would be read from the wrong device (an illegal access, or a race with
    ``cuda:1``'s stream under peer access). Launches record the guarded device."""
    _guarded.append(torch.device(device))
    # while a compiler traces the kernels (``_ops.triton_forward``), the compiled code's own
    # device guard runs them: entering the CUDA device here would need a GPU at trace time
    guard = torch.device(device).type == "cuda" and not tracing()
    try:
        with torch.cuda.device(device) if guard else contextlib.nullcontext():
            yield
    finally:
        _guarded.pop()


def device_kind(device: torch.device) -> tuple:
    """What autotuning results are kept per: the GPU model and compute capability (the device
    type elsewhere, e.g. the interpreter's CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return (device.type,)
    return ("cuda", torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))


def tracing() -> bool:
    """True while ``torch.compile`` traces (the kernels then become ``wrap_triton`` nodes): under
    Dynamo, or on fake tensors in the compiler's later tracing."""
    return torch.compiler.is_compiling() or torch._guards.detect_fake_mode() is not None


@contextlib.contextmanager
def record_launches():
    """Collect every launch and host read made inside the block (``.launches``, ``.host_reads``)."""
    counters = _Counters()
    _recorders.append(counters)
    try:
        yield counters
    finally:
        _recorders.remove(counters)


def inside_launch() -> bool:
    """True while a kernel is being launched: the interpreter's own host copies happen then."""
    return _inside_launch > 0


def _jit_function(kernel):
    while not isinstance(kernel, triton.runtime.JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _record(kernel, args, constexprs, num_warps, num_stages, grid):
    for counters in _recorders:
        counters.launches.append(Launch(_jit_function(kernel), tuple(args), dict(constexprs), num_warps,
                                        num_stages, tuple(grid), _guarded[-1] if _guarded else None))


def launch(kernel, grid, *args, num_warps: int = 4, num_stages: int = 2, **constexprs):
    """``kernel[grid](*args, **constexprs)`` with fixed warps and stages, counted and recorded."""
    global _inside_launch
    grid = tuple(grid)
    _inside_launch += 1
    try:
        # traced: a node of the graph that the compiler sees (Inductor compiles and launches it)
        runnable = torch.library.wrap_triton(kernel) if tracing() else kernel
        runnable[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
    finally:
        _inside_launch -= 1
    _record(kernel, args, constexprs, num_warps, num_stages, grid)


def read_host(tensor) -> list:
    """The one way the backend waits for the device: a copy of ``tensor`` to host, as a list.
    The copy's own torch op (a CUDA tensor's ``_to_copy``) is this host read, not a launch."""
    global _inside_host_read
    for counters in _recorders:
        counters.host_reads += 1
    _inside_host_read += 1
    try:
        return tensor.tolist()
    finally:
        _inside_host_read -= 1


def inside_host_read() -> bool:
    """True during :func:`read_host`: the torch ops dispatched then are its copy to the host."""
    return _inside_host_read > 0


def _emulated_benchmark(kernel_call, quantiles):
    """What a GPU benchmark does to the arguments: several launches, each wrapped in the hooks."""
    for _ in range(3):
        kernel_call()
    _emulated_benchmark.calls += 1
    # a different config wins each time, so that the real launch also runs the alternatives
    return [float(_emulated_benchmark.calls % 3)] * len(quantiles)


_emulated_benchmark.calls = 0


class Tunable:
    """A kernel with a default config and, optionally, alternatives to autotune over.

    ``launch(grid, *args, **constexprs)``: ``grid`` is a function of the config's kwargs.
    ``fixed=True`` always takes the default, which is what deterministic mode asks for: the
    summation order must not depend on a benchmark's outcome.
    ``restore``: the arguments the kernel accumulates into; benchmark launches leave them as
    they were, so that autotuning never changes a result (chunked launches keep accumulating).
    ``interpreted``: the default under the Triton interpreter, where ``default`` would be too
    slow (one of ``alternatives``); ``gpu_default`` stays what a GPU launches, which the resource
    table and the AOT gate compile.
    """

    def __init__(self, kernel, default: triton.Config, alternatives=(), key=(), restore=(),
                 interpreted: triton.Config | None = None):
        self.kernel = kernel
        self.key = tuple(key)
        self.restore = tuple(restore)
        self.gpu_default = default
        self.default = interpreted if INTERPRET and interpreted is not None else default
        self.configs = [default, *alternatives]
        self.autotuning = AUTOTUNE in ("1", "emulate") and bool(alternatives)
        if self.autotuning and AUTOTUNE == "1" and INTERPRET:
            raise RuntimeError(f"{AUTOTUNE_ENV}=1 needs a GPU; use {AUTOTUNE_ENV}=emulate under the interpreter")
        # one autotuner per kind of device: a tuning result holds for the GPU model it was measured on
        self.autotuners: dict[tuple, object] = {}
        self.tuned = None  # the autotuner of the last autotuned launch (benchmark tables name its config)

    def autotuner_for(self, device: torch.device):
        """The autotuner of ``device``'s kind (its GPU model and compute capability)."""
        kind = device_kind(device)
        if kind not in self.autotuners:
            options = {"do_bench": _emulated_benchmark} if AUTOTUNE == "emulate" else {"cache_results": True}
            self.autotuners[kind] = triton.autotune(configs=self.configs, key=list(self.key),
                                                    restore_value=list(self.restore), **options)(self.kernel)
        return self.autotuners[kind]

    def launch(self, grid, *args, fixed: bool = False, config=None, **constexprs):
        """``config``: run that one (tests and the resource table); ``fixed``: the default."""
        global _inside_launch
        if not self.autotuning or fixed or config is not None or tracing():
            config = config or self.default
            launch(self.kernel, grid(config.kwargs), *args, num_warps=config.num_warps,
                   num_stages=config.num_stages, **config.kwargs, **constexprs)
            return
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        self.tuned = self.autotuner_for(device)
        _inside_launch += 1
        try:
            self.tuned[lambda meta: tuple(grid(meta))](*args, **constexprs)
        finally:
            _inside_launch -= 1
        config = self.tuned.best_config
        _record(self.kernel, args, {**config.kwargs, **constexprs}, config.num_warps, config.num_stages,
                grid(config.kwargs))
