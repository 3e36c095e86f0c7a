"""llama.cpp and onnxruntime, opened without torch, and their parity probes run in a child process.

A runtime is native code: built for another CPU, or simply buggy, it can kill the process with a signal (llama.cpp
built with GGML_NATIVE on a Xeon with AMX segfaults on q8_0 weights). `slm export` therefore asks a child process
for the runtime's side of a parity check (its tokens and logits) and compares them with torch's here:

    parent (torch)  --spec.json-->  python -m slmkit.edge.runtimes  --result.npz-->  parent compares
                                    (imports numpy + the runtime only)

A child that dies is reported as a `Crash` (the runtime, the signal, the fix), so the export is kept but marked
unverified; a child that answers is compared exactly as before. This module imports neither torch nor anything that
does, so `slm bench`'s llama.cpp and onnxruntime workers use it too and measure the runtime alone.

Test hook (tests only): with SLMKIT_TEST_CHECKER_SIGNAL=SIGSEGV in its environment the child kills itself with that
signal after opening the runtime, the way a miscompiled kernel does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CRASH_HOOK = "SLMKIT_TEST_CHECKER_SIGNAL"  # test-only: the child kills itself with this signal
# SLMKIT_LLAMA_CPP_REPACK=1 keeps llama.cpp's weight repacking on AMX CPUs (faster q8_0/q4_0), for a llama-cpp-python
# built with -DGGML_NATIVE=OFF, where the repacked kernels are safe.
REPACK = "SLMKIT_LLAMA_CPP_REPACK"
# What to do when a runtime's native code kills the checker, per runtime.
FIXES = {
    "llama.cpp": "rebuild llama-cpp-python for a generic CPU: CMAKE_ARGS=-DGGML_NATIVE=OFF pip install "
                 "--force-reinstall --no-cache-dir llama-cpp-python",
    "onnxruntime": "reinstall onnxruntime (pip install --force-reinstall onnxruntime) or try another version",
}
MODULES = {"llama.cpp": "llama_cpp", "onnxruntime": "onnxruntime"}


@dataclass
class Crash:
    """A signal (WHAT, e.g. SIGSEGV) killed the checker child inside RUNTIME's native code."""
    runtime: str
    what: str

    @property
    def reason(self) -> str:
        return f"{self.runtime} crashed ({self.what}) while checking it; {FIXES[self.runtime]}"


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Linux: the amx_tile flag), without importing torch."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_tile" in line for line in f)
    except OSError:
        return False


def llama_cpp_model(path: Path, **options):
    """llama_cpp.Llama(model_path=PATH, **OPTIONS), without weight repacking ("extra buffer types") on CPUs with AMX:
    there llama-cpp-python 0.3.36's repacked q8_0/q4_0 kernels segfault (Xeon Sapphire Rapids and later)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    if not cpu_has_amx() or os.environ.get(REPACK) == "1":
        return llama_cpp.Llama(model_path=str(path), **options)
    defaults = low.llama_model_default_params  # the only way in: Llama() takes the struct from this function

    def no_repacking():
        params = defaults()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = no_repacking
    try:
        return llama_cpp.Llama(model_path=str(path), **options)
    finally:
        low.llama_model_default_params = defaults


def onnx_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session with THREADS intra-op threads (default: all cores)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def empty_past(cfg: dict, batch: int = 1) -> np.ndarray:
    """(L, B, nkv, 0, hd) float32: the past of a fresh sequence."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return np.zeros((cfg["num_hidden_layers"], batch, cfg["num_key_value_heads"], 0, hd), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# The child's probes: plain data in, arrays out


def _crash_if_asked() -> None:
    name = os.environ.get(CRASH_HOOK)
    if name:
        os.kill(os.getpid(), getattr(signal, name))


def gguf_probe(spec: dict) -> dict[str, np.ndarray]:
    """llama.cpp's tokens for SPEC['text'] and its (T, V) logits for SPEC['ids'] (every position)."""
    llm = llama_cpp_model(Path(spec["path"]), n_ctx=spec["n_ctx"], logits_all=True, verbose=False, seed=0,
                          n_threads=spec["threads"], n_batch=min(512, spec["n_ctx"]))
    _crash_if_asked()
    tokens = llm.tokenize(spec["text"].encode("utf-8"), add_bos=True, special=False)
    llm.reset()
    llm.eval(spec["ids"])
    return {"tokens": np.array(tokens, dtype=np.int64),
            "logits": np.array(llm.scores[:len(spec["ids"])], dtype=np.float32)}


def onnx_probe(spec: dict) -> dict[str, np.ndarray]:
    """onnxruntime's outputs for SPEC's probe: a decoder's (2, T, V) logits (one full pass, then a prefill of half
    the probe and the rest one token at a time through the past key values); an encoder's graph output."""
    sess = onnx_session(Path(spec["path"]), spec["threads"])
    _crash_if_asked()
    ids = np.array(spec["ids"], dtype=np.int64)  # (1, T)
    if spec["kind"] != "decoder-with-past":
        return {"out": sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]}
    past = empty_past(spec["cfg"])
    full = sess.run(None, {"input_ids": ids, "past_keys": past, "past_values": past})[0][0]  # (T, V)
    k = max(1, ids.shape[1] // 2)
    logits, pk, pv = sess.run(None, {"input_ids": ids[:, :k], "past_keys": past, "past_values": past})
    steps = [logits[0]]
    for t in range(k, ids.shape[1]):
        logits, pk, pv = sess.run(None, {"input_ids": ids[:, t:t + 1], "past_keys": pk, "past_values": pv})
        steps.append(logits[0])
    return {"out": np.stack([full, np.concatenate(steps)])}  # (2, T, V)


PROBES = {"llama.cpp": gguf_probe, "onnxruntime": onnx_probe}


def child_main(argv: list[str]) -> None:
    """`python -m slmkit.edge.runtimes RUNTIME SPEC.json OUT.npz`: run one probe, save its arrays."""
    runtime, spec_path, out = argv
    arrays = PROBES[runtime](json.loads(Path(spec_path).read_text()))
    np.savez(out, **arrays)


# ----------------------------------------------------------------------------------------------------------------
# The parent's side


def installed(runtime: str) -> bool:
    return importlib.util.find_spec(MODULES[runtime]) is not None


def run_probe(runtime: str, spec: dict) -> dict[str, np.ndarray] | Crash:
    """Run RUNTIME's probe on SPEC in a child process: its arrays, or a Crash when a signal killed the child. A
    Python error there (the runtime refused the file) is a one-line SystemExit."""
    with tempfile.TemporaryDirectory(prefix="slmkit-check-") as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "out.npz"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "slmkit.edge.runtimes", runtime, str(spec_path), str(out)],
                              capture_output=True, text=True)
        if proc.returncode < 0:  # killed by a signal: native code died
            try:
                what = signal.Signals(-proc.returncode).name
            except ValueError:
                what = f"signal {-proc.returncode}"
            return Crash(runtime, what)
        if proc.returncode != 0 or not out.is_file():  # the runtime refused the file: a failed export, not a crash
            lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
            raise SystemExit(f"error: {spec['path']}: {runtime} cannot run it "
                             f"({(lines[-1].strip() if lines else f'exit status {proc.returncode}')[:200]}); "
                             "please report this model")
        with np.load(out) as data:
            return {k: data[k] for k in data.files}


if __name__ == "__main__":
    child_main(sys.argv[1:])
