"""Prometheus text-format metrics (exposition format 0.0.4), written by hand: a few counters and histograms need
no client library."""

from __future__ import annotations

import threading
from collections import defaultdict

API_PATHS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify"}
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self):
        self.counts = [0] * len(BUCKETS)
        self.total, self.n = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(BUCKETS):
            if v <= b:
                self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        out = [f'{name}_bucket{{{labels}{sep}le="{b}"}} {c}' for b, c in zip(BUCKETS, self.counts, strict=True)]
        out += [f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.n}', f"{name}_sum{{{labels}}} {self.total:.6f}",
                f"{name}_count{{{labels}}} {self.n}"]
        return out


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(Histogram)
        self.ttft = Histogram()
        self.prompt_tokens: dict[str, int] = defaultdict(int)
        self.completion_tokens: dict[str, int] = defaultdict(int)
        self.cascade_answers: dict[tuple[str, str], int] = defaultdict(int)  # (cascade, small|large|large_failed)
        self.routed: dict[tuple[str, str, str], int] = defaultdict(int)  # (router, route, rule|router|fallback)

    def request(self, path: str, status: int, seconds: float) -> None:
        if path not in API_PATHS:  # pages, probes and unknown paths: one label, so scanners can't blow up the series
            path = "other"
        with self.lock:
            self.requests[(path, status)] += 1
            self.latency[path].observe(seconds)

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def tokens(self, model: str, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens[model] += prompt
            self.completion_tokens[model] += completion

    def cascade(self, model: str, answered_by: str, n: int = 1) -> None:
        """N answers of the cascade MODEL by its "small" or "large" model, or N escalations that "large_failed"."""
        with self.lock:
            self.cascade_answers[(model, answered_by)] += n

    def route(self, router: str, route: str, reason: str) -> None:
        """A request to ROUTER sent to ROUTE, decided by a rule, the router's classifier or its fallback."""
        with self.lock:
            self.routed[(router, route, reason)] += 1

    def render(self, engines: dict) -> str:
        with self.lock:
            out = ["# HELP slm_requests_total HTTP requests by endpoint and status.",
                   "# TYPE slm_requests_total counter"]
            out += [f'slm_requests_total{{endpoint="{p}",status="{s}"}} {n}'
                    for (p, s), n in sorted(self.requests.items())]
            out += ["# HELP slm_request_duration_seconds Time to the last byte of the response (streams included).",
                    "# TYPE slm_request_duration_seconds histogram"]
            for p, h in sorted(self.latency.items()):
                out += h.lines("slm_request_duration_seconds", f'endpoint="{p}"')
            out += ["# HELP slm_time_to_first_token_seconds Queueing plus prefill, until the first generated token.",
                    "# TYPE slm_time_to_first_token_seconds histogram"]
            out += self.ttft.lines("slm_time_to_first_token_seconds")
            for name, d, help_ in (("slm_prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed."),
                                   ("slm_completion_tokens_total", self.completion_tokens, "Tokens generated.")):
                out += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
                out += [f'{name}{{model="{m}"}} {n}' for m, n in sorted(d.items())]
            if self.cascade_answers:  # only when a cascade is served (and has answered)
                escalated: dict[str, int] = defaultdict(int)
                for (m, who), n in self.cascade_answers.items():
                    escalated[m] += n if who != "small" else 0
                out += ["# HELP slm_cascade_answers_total Cascade answers (texts, for classify) by the model that "
                        "gave them; large_failed: escalations the large model could not answer.",
                        "# TYPE slm_cascade_answers_total counter"]
                out += [f'slm_cascade_answers_total{{model="{m}",answered_by="{w}"}} {n}'
                        for (m, w), n in sorted(self.cascade_answers.items())]
                out += ["# HELP slm_cascade_escalations_total Answers a cascade's small model handed to its large one.",
                        "# TYPE slm_cascade_escalations_total counter"]
                out += [f'slm_cascade_escalations_total{{model="{m}"}} {n}' for m, n in sorted(escalated.items())]
            if self.routed:  # only when a router is served (and has routed)
                out += ["# HELP slm_routed_requests_total Requests to a router by the route that answered them and "
                        "what chose it (rule, router, fallback).", "# TYPE slm_routed_requests_total counter"]
                out += [f'slm_routed_requests_total{{model="{m}",route="{r}",reason="{w}"}} {n}'
                        for (m, r, w), n in sorted(self.routed.items())]
        out += ["# HELP slm_queue_depth Requests waiting for a free batch row.", "# TYPE slm_queue_depth gauge"]
        out += [f'slm_queue_depth{{model="{m}"}} {e.queue_depth}' for m, e in engines.items()]
        out += ["# HELP slm_active_sequences Sequences being decoded.", "# TYPE slm_active_sequences gauge"]
        out += [f'slm_active_sequences{{model="{m}"}} {e.active}' for m, e in engines.items()]
        kv = {m: e.kv for m, e in engines.items() if getattr(e, "kv", None) is not None}
        out += ["# HELP slm_kv_cache_bytes Key/value cache allocated now (grows with the rows, freed when idle).",
                "# TYPE slm_kv_cache_bytes gauge"]
        out += [f'slm_kv_cache_bytes{{model="{m}"}} {c.allocated_bytes}' for m, c in kv.items()]
        out += ["# HELP slm_kv_budget_bytes The --kv-memory budget the cache stays within.",
                "# TYPE slm_kv_budget_bytes gauge"]
        out += [f'slm_kv_budget_bytes{{model="{m}"}} {c.budget}' for m, c in kv.items()]
        drafted = {m: e.spec_stats for m, e in engines.items() if e.spec_stats is not None}
        if drafted:  # --draft: guesses made and kept (their ratio is the acceptance rate)
            out += ["# HELP slm_draft_tokens_total Draft guesses in speculative decoding: proposed, accepted.",
                    "# TYPE slm_draft_tokens_total counter"]
            out += [f'slm_draft_tokens_total{{model="{m}",outcome="{k}"}} {getattr(st, k)}'
                    for m, st in sorted(drafted.items()) for k in ("proposed", "accepted")]
        return "\n".join(out) + "\n"
