"""Teachers: the model that answers, behind one interface, `answers(jobs)` -> (job, Answer) in completion order.

    LocalTeacher     a model folder, decoded by the serve engine's continuous batching (serve/batching.py): --batch
                     rows share every forward pass, so 16 answers cost little more than one on a CPU
    GGUFTeacher      a .gguf file through llama.cpp (llama-cpp-python), one answer at a time, its chat template
    EndpointTeacher  an OpenAI-compatible server (slm serve, llama-server, vLLM, a hosted API): --concurrency
                     requests in flight, retries with backoff on 429/5xx/timeouts (compose/remote.py)

A failed request is an Answer with `error` set: the run does not record it, so `--resume` asks again.
"""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from slmkit.compose.remote import RemoteError, RemoteModel, is_url


@dataclass
class Job:
    key: str  # what the run resumes by: prompt id, strategy, sample
    messages: list[dict]  # what the teacher sees (the strategy's system prompt included)
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int | None = None
    info: dict = field(default_factory=dict)  # the caller's (prompt, strategy, ...): passed through untouched


@dataclass
class Answer:
    text: str
    finish_reason: str | None = None  # "stop", "length" (hit max_new_tokens), "prompt_too_long"
    tokens: int = 0
    error: str | None = None  # the request failed (not the answer's fault): ask again on --resume


class LocalTeacher:
    """A model folder (ours or a Hugging Face causal LM) decoded by the batching engine."""

    def __init__(self, folder: Path, batch: int = 16, dtype: str = "fp32", device: str = "auto",
                 threads: int | None = None):
        from slmkit.hardware import in_fresh_thread
        from slmkit.infer.chat import reply_stops
        from slmkit.infer.generate import load

        self.name, self.batch = Path(folder).name, batch
        # loaded in a thread that ends: a live thread that ran the loading math slows the engine thread's decoding
        self.lm = in_fresh_thread(load, Path(folder), threads=threads, dtype=dtype, device=device)
        self.native_context, self.engine = self.lm.context, None
        self.stop = reply_stops(self.lm.tokenizer)

    def _engine(self, need: int):
        """An engine whose cache holds NEED positions per row (not the model's whole context: the cache is rows x
        context, ~6 GB at SmolLM2's 8k x 16 rows)."""
        from slmkit.serve.batching import Engine

        need = min(self.native_context, need)
        if self.engine is None or self.lm.context < need:
            self.close()
            self.lm.context = need
            self.engine = Engine(self.lm, max_batch=self.batch, max_queue=2 * self.batch).start()
        return self.engine

    def answers(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, Answer]]:
        from slmkit.infer.chat import render_prompt

        todo = [(job, self.lm.encode(render_prompt(self.lm.tokenizer, job.messages))) for job in jobs]
        if not todo:
            return
        engine = self._engine(max(len(ids) + job.max_new_tokens for job, ids in todo))
        done: queue.Queue = queue.Queue()
        in_flight, pending = 0, iter(todo)
        while True:
            while in_flight < 2 * self.batch:  # keep the engine's rows full, never overflow its queue
                nxt = next(pending, None)
                if nxt is None:
                    break
                job, ids = nxt
                if len(ids) >= engine.lm.context:
                    yield job, Answer("", "prompt_too_long")
                    continue
                self._submit(engine, job, ids, done)
                in_flight += 1
            if not in_flight:
                return
            yield done.get()
            in_flight -= 1

    def _submit(self, engine, job: Job, ids: list[int], done: queue.Queue) -> None:
        """Queue JOB; its (job, Answer) lands in DONE when it finishes. The sink runs on the engine's thread."""
        from slmkit.infer.generate import SamplingParams, TextStream
        from slmkit.serve.batching import Finish

        params = SamplingParams(max_new_tokens=job.max_new_tokens, temperature=job.temperature, top_k=0,
                                top_p=job.top_p, seed=job.seed)
        ts, got, pieces, holder = TextStream(self.lm.tokenizer, self.stop), [], [], {}

        def sink(ev) -> None:
            if not isinstance(ev, Finish):
                got.append(ev.id)
                if self.stop:  # the text up to the stop string, as slm generate streams it
                    pieces.append(ts.push(ev.id))
                    if ts.stopped and "req" in holder:
                        holder["req"].cancel()  # a stop string: free the row now
                return
            if ev.reason == "error" or (ev.reason == "cancelled" and not ts.stopped):
                done.put((job, Answer("", error=ev.message or "the engine stopped")))
                return
            if self.stop:
                text = "".join(pieces) + ts.finish()
            else:  # no stop string to watch for: decode once at the end
                text = self.lm.tokenizer.decode(got, skip_special_tokens=True)
            reason = "stop" if ts.stopped else ev.reason
            done.put((job, Answer(text.strip(), reason, len(got))))

        holder["req"] = engine.submit(ids, params, sink)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
            self.engine = None


class GGUFTeacher:
    """A GGUF file answered by llama.cpp with the chat template it carries."""

    def __init__(self, path: Path, threads: int | None = None, context: int = 4096):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise SystemExit(f"error: --teacher {path}: a GGUF teacher needs llama-cpp-python: "
                             'pip install -e ".[export]"') from None
        import torch

        from slmkit.edge.export_gguf import llama_cpp_model

        self.name = Path(path).name
        try:
            self.llm = llama_cpp_model(Path(path), n_ctx=context, n_threads=threads or torch.get_num_threads(),
                                       verbose=False)
        except ValueError as e:
            raise SystemExit(f"error: --teacher {path}: llama.cpp cannot load it ({e}); is it a complete GGUF "
                             "file of a decoder?") from None

    def answers(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, Answer]]:
        for job in jobs:
            try:
                out = self.llm.create_chat_completion(messages=job.messages, max_tokens=job.max_new_tokens,
                                                      temperature=job.temperature, top_p=job.top_p,
                                                      seed=job.seed if job.seed is not None else -1)
            except ValueError as e:  # llama-cpp-python: "Requested tokens (N) exceed context window of M"
                yield job, (Answer("", "prompt_too_long") if "context" in str(e) else Answer("", error=str(e)))
                continue
            choice = out["choices"][0]
            yield job, Answer((choice["message"].get("content") or "").strip(), choice.get("finish_reason"),
                              int((out.get("usage") or {}).get("completion_tokens") or 0))

    def close(self) -> None:
        self.llm.close() if hasattr(self.llm, "close") else None


class EndpointTeacher:
    """An OpenAI-compatible chat endpoint, CONCURRENCY requests at a time."""

    def __init__(self, url: str, model: str | None = None, api_key_env: str | None = None, concurrency: int = 4,
                 timeout: float = 120.0, retries: int = 5):
        self.remote = RemoteModel(url, model, api_key_env, timeout=timeout, retries=retries)
        self.name, self.concurrency = url if model is None else f"{url} {model}", concurrency

    def _ask(self, job: Job) -> Answer:
        try:
            out = self.remote.chat(job.messages, max_new_tokens=job.max_new_tokens, temperature=job.temperature,
                                   top_p=job.top_p, seed=job.seed)
        except RemoteError as e:
            return Answer("", error=str(e))
        return Answer(out["text"].strip(), out["finish_reason"], int(out["usage"].get("completion_tokens") or 0))

    def answers(self, jobs: Iterable[Job]) -> Iterator[tuple[Job, Answer]]:
        pending = iter(jobs)
        running: dict[Future, Job] = {}
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="slm-synth")
        try:
            while True:
                while len(running) < 2 * self.concurrency and (job := next(pending, None)) is not None:
                    running[pool.submit(self._ask, job)] = job
                if not running:
                    return
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    yield running.pop(fut), fut.result()
        finally:  # done, interrupted or abandoned: queued requests are dropped; no wait for those in flight
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pass


def open_teacher(ref: str, model: str | None = None, api_key_env: str | None = None, concurrency: int = 4,
                 batch: int = 16, dtype: str = "fp32", device: str = "auto", threads: int | None = None,
                 timeout: float = 120.0, retries: int = 5):
    """REF: an http(s) URL (an OpenAI-compatible API base), a .gguf file, or a model folder."""
    if is_url(ref):
        try:
            return EndpointTeacher(ref, model, api_key_env, concurrency, timeout, retries)
        except RemoteError as e:  # the key's variable is not set
            raise SystemExit(f"error: --teacher: {e}") from None
    path = Path(ref)
    if model is not None or api_key_env is not None:
        raise SystemExit(f"error: --teacher {ref} is not a URL; --teacher-model and --api-key-env are for URL "
                         "teachers: drop them")
    if path.is_file() and path.suffix.lower() == ".gguf":
        return GGUFTeacher(path, threads)
    if path.is_dir() and (path / "config.json").is_file():
        return LocalTeacher(path, batch, dtype, device, threads)
    raise SystemExit(f"error: --teacher {ref}: not a model folder (config.json), a .gguf file or an http(s) URL "
                     "(an OpenAI-compatible API base such as http://host:8000/v1)")
