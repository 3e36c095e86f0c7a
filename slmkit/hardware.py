"""hardware."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether oneDNN finds native bf16 instructions (AVX512-BF16 or AMX) on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume none
        return False


@functools.lru_cache(maxsize=1)
def cpu_has_vnni() -> bool:
    """Whether the CPU multiplies int8 by uint8 into 32-bit sums in one instruction (AVX512-VNNI, AVX-VNNI or AMX):
    without it x86 int8 kernels add pairs of products in 16 bits, which saturate unless activations use 7 bits."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:  # not Linux: assume the older instruction set (7-bit activations are correct either way)
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def pick_device(device: str) -> str:
    """'auto' -> this process's GPU when there is one, else 'cpu'; an explicit GPU that is not there is a one-line
    error here rather than a CUDA traceback later."""
    if device.startswith("cuda"):
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _, _, index = device.partition(":")
        if (int(index) if index.isdigit() else 0) >= n:
            raise SystemExit(f"error: --device {device}: PyTorch {torch.__version__} sees {n} CUDA GPU(s); "
                             "use --device cpu (or auto)")
    if device != "auto":
        return device
    if torch.cuda.is_available():
        from slmkit.distributed import local_rank

        rank, n = local_rank(), torch.cuda.device_count()
        if rank >= n:
            raise SystemExit(f"error: process {rank} on this machine has no GPU of its own ({n} visible); start "
                             "torchrun with --nproc-per-node at most the GPU count, or pass --device cpu")
        return f"cuda:{rank}"
    return "cpu"


# Narrowest model that --dtype auto trains in bf16 autocast on a CPU with fast bf16 products (cpu_bf16_fast). Measured
# at 2 threads, 16 x 256 tokens per step, bf16 over fp32 tokens/s: on an AMD EPYC with AVX512-BF16 (Zen 5), 64 dims
# (slm-tiny) 1.0-1.24x, 128 (slm-1m) 1.3-1.4x, 256 (slm-7m) 1.6x; on a Xeon with AMX, 128 dims 1.08x, 256 1.37x, 512
# 1.47x. Narrower, the casts cost about what the faster products save.
CPU_BF16_MIN_WIDTH = 128


# bf16 matrix products must run at least this many times fp32's rate for --dtype auto to use them: 3.7x on the Xeon
# with AMX and 4.5x on the Zen 5 EPYC above; CPUs that only emulate bf16 run it ~100x slower than fp32.
CPU_BF16_MIN_SPEEDUP = 3.0


def require_cpp_compiler() -> None:
    """torch.compile on CPU builds C++ kernels: fail at once, in one line, where no compiler is installed (otherwise
    the first compiled call fails deep inside inductor, after the data was tokenized or the model loaded)."""
    if not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise SystemExit("error: --compile needs a C++ compiler on CPU (torch.compile builds C++ kernels); install "
                         "one (e.g. apt-get install g++) or run without --compile")


def pick_dtype(dtype: str, device: str, width: int | None = None) -> torch.dtype | None:
    """None = plain fp32. 'auto' is bf16 autocast on GPUs that support it and, for models at least
    CPU_BF16_MIN_WIDTH wide (WIDTH: hidden size), on CPUs whose bf16 products are measured fast (cpu_bf16_fast);
    otherwise fp32."""
    if dtype == "fp32":
        return None
    if dtype in ("bf16", "bfloat16"):
        if device == "cpu" and not cpu_has_bf16():
            print("warning: this CPU has no bf16 units, so --dtype bf16 runs emulated (~15x slower measured); "
                  "use --dtype fp32", file=sys.stderr)
        return torch.bfloat16
    if dtype in ("fp16", "float16"):
        if not device.startswith("cuda"):
            raise SystemExit("error: --dtype fp16 trains on CUDA GPUs only (with a gradient scaler); on this "
                             f"{device} use --dtype bf16 (CPUs with bf16 units) or fp32")
        return torch.float16
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return torch.bfloat16 if (width or 0) >= CPU_BF16_MIN_WIDTH and cpu_bf16_fast() else None
    raise SystemExit(f"error: unknown --dtype {dtype!r}; use auto, fp32, bf16 or fp16")


def eval_dtype(autocast_dtype: torch.dtype | None, device: str) -> torch.dtype | None:
    """The precision a run's held-out evaluations use: fp32 on the CPU, the precision `slm eval` scores the saved
    folder in, so the loss a run reports and keeps its best weights by is the folder's own (bf16 autocast moved it by
    ~3e-4); the training autocast on GPUs, where a 125M model's final evaluation in fp32 would take ~20 s."""
    return autocast_dtype if device.startswith("cuda") else None


def precision_name(autocast_dtype: torch.dtype | None) -> str:
    """What pick_dtype chose, as the start lines and summaries print it: fp32, bf16 or fp16."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(autocast_dtype, "fp32")


# Once per process: callers (Muon's Newton-Schulz) may ask every step, and under torchrun the answer is a collective
@functools.cache
def cpu_bf16_fast() -> bool:
    """Whether this CPU multiplies bf16 matrices at least CPU_BF16_MIN_SPEEDUP times faster than fp32, measured once
    (~0.2 s; recipe.cpu_bf16_speedup). True on AMX (Intel Sapphire Rapids and later) and on AVX512-BF16 with full-width
    units (AMD Zen 5); CPUs without bf16 units are not measured at all. Under torchrun, true only where every rank
    measured it (ranks that picked different precisions would train different models), so every rank must ask
    first at the same point: train does, in pick_dtype or when it builds Muon."""
    from slmkit import distributed

    threads = torch.get_num_threads()
    fast = cpu_has_bf16() and cpu_bf16_speedup(threads) >= CPU_BF16_MIN_SPEEDUP
    return not distributed.any_rank(not fast)


@functools.cache
def cpu_bf16_speedup(threads: int) -> float:
    """bf16 matrix products' peak FLOP/s over fp32's on THREADS threads (the current setting; the cache key), their
    bursts interleaved: measured one dtype after the other, a load that came and went moved the ratio from 4.4x to
    3.2-5.3x on a Zen 5 (another process busy on one of the 2 cores); interleaved, both see the same machine. Ask
    models.cpu_has_bf16() first."""
    bf16, fp32 = matmul_rates((torch.bfloat16, torch.float32))
    return bf16 / fp32


def matmul_rates(dtypes: tuple[torch.dtype, ...], rounds: int = 5, reps: int = 4) -> list[float]:
    """Best FLOP/s of 1024 x 1024 products per dtype in DTYPES over ROUNDS rounds of one burst of REPS each, on the
    current thread setting: peaks, not averages over whatever else the machine is doing. fp32: ~0.1 s on a fast CPU,
    ~0.4 s on a slow one; bf16 takes seconds on CPUs without bf16 units (emulated). Leaves the global RNG as it was.
    benchmarks/bench_throughput.py takes its MFU denominator from here too, in longer bursts."""
    n = 1024
    gen = torch.Generator().manual_seed(0)  # its own: a probe must not move a seeded run's random numbers
    pairs = [(torch.randn(n, n, generator=gen).to(d), torch.randn(n, n, generator=gen).to(d)) for d in dtypes]
    for a, b in pairs:
        for _ in range(2):  # warm up MKL's thread pool and the caches
            a @ b
    best = [0.0] * len(dtypes)
    for _ in range(rounds):
        for i, (a, b) in enumerate(pairs):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            best[i] = max(best[i], 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


# ----------------------------------------------------------------------------------------------------------------
# Which thread runs the math

# Measured on 2 cores (Xeon AMX, torch 2.13 with MKL and GNU OpenMP): once a thread that stays alive has run a
# multi-threaded MKL/oneDNN product (loading a model, an embedding request), every *other* thread's small matrix-vector
# products run as if single-threaded: a 576 x 1536 fp32 matvec takes 150-170 us instead of 40-50, and SmolLM2-135M
# decodes at 21 tokens/s instead of 36 in a server's engine thread. No OpenMP/MKL setting fixed it; threads that have
# ended stop counting. So work that does heavy math outside the decoding thread runs in a short-lived thread.


def in_fresh_thread(fn, *args, **kwargs):
    """FN(*ARGS, **KWARGS) run in a new thread that ends with it (its result returned, its exception raised here)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name=f"slm-{getattr(fn, '__name__', 'work')}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


async def in_fresh_thread_async(fn, *args, **kwargs):
    """in_fresh_thread for the event loop: awaits FN run in a new, short-lived thread (asyncio.to_thread's pool
    threads live on, which slows every decoding thread: see above)."""
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def settle(key: str, value) -> None:
        if not done.done():  # the awaiting request may have been cancelled meanwhile
            (done.set_result if key == "result" else done.set_exception)(value)

    def target():
        try:
            loop.call_soon_threadsafe(settle, "result", fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - delivered to the awaiting coroutine
            loop.call_soon_threadsafe(settle, "error", e)

    threading.Thread(target=target, name=f"slm-{getattr(fn, '__name__', 'work')}", daemon=True).start()
    return await done
