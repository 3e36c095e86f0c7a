"""A client for OpenAI-compatible HTTP servers (`slm serve`, llama.cpp's llama-server, vLLM, OpenAI itself), on the
standard library only: the large model of a cascade and the routes of a router can live on another machine.

    RemoteModel(url).complete(prompt)  -> POST {url}/completions
    RemoteModel(url).chat(messages)    -> POST {url}/chat/completions
    RemoteModel(url).classify(texts)   -> POST {url}/classify   (slm serve's endpoint)
    RemoteModel(url).models()          -> GET  {url}/models

URL is the API base, with or without the trailing /v1: "http://host:8000" and "http://host:8000/v1" are the same
server (a base that already ends in /v1 is kept as it is, any other gets /v1 appended). The API key is read from the
environment variable named by api_key_env, never taken as a value: a flag's value shows in `ps` and shell history.
Busy (429), failing (5xx), slow (timeout) and unreachable servers are retried with exponential backoff; after the
last try `RemoteError` says, in one line, which URL failed and what to check.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

RETRY_STATUS = {429, 500, 502, 503, 504}  # busy or failing: worth another try; other 4xx are the request's fault


class RemoteError(RuntimeError):
    """A remote model that could not answer: one line naming the URL and what to do."""


def is_url(s: str) -> bool:
    """True for an http(s) URL (a remote model), False for anything else (a model folder path)."""
    return isinstance(s, str) and s.strip().lower().startswith(("http://", "https://"))


def api_base(url: str) -> str:
    """'http://h:8000', 'http://h:8000/' or 'http://h:8000/v1/' -> 'http://h:8000/v1'."""
    base = url.strip().rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class RemoteModel:
    """One model behind an OpenAI-compatible URL. MODEL names it in requests (default: the first the server lists,
    asked once, on first use)."""

    def __init__(self, url: str, model: str | None = None, api_key_env: str | None = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5):
        if not is_url(url):
            raise ValueError(f"{url!r} is not an http(s) URL")
        self.url, self.model, self.timeout = api_base(url), model, timeout
        self.retries, self.backoff = max(1, retries), backoff
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise RemoteError(f"{self.url}: the environment variable {api_key_env} (the API key) is not set; "
                                  f"export {api_key_env}=KEY before running")

    def __repr__(self) -> str:
        return f"RemoteModel({self.url!r}, model={self.model!r})"

    # -- the endpoints ---------------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """The model ids the server lists."""
        return [m["id"] for m in self._request("GET", "/models").get("data", [])]

    def complete(self, prompt: str, **sampling) -> dict:
        """PROMPT's completion: {"text", "model", "finish_reason", "usage"}. SAMPLING: max_tokens (or
        max_new_tokens), temperature, top_p, stop, seed, ... as the OpenAI API names them; None values are left out."""
        out = self._request("POST", "/completions", {"model": self._model(), "prompt": prompt, **_sampling(sampling)})
        choice = _first_choice(out, self.url + "/completions")
        return {"text": choice.get("text") or "", "model": out.get("model") or self._model(),
                "finish_reason": choice.get("finish_reason"), "usage": out.get("usage") or {}}

    def chat(self, messages: list[dict], **sampling) -> dict:
        """The assistant's reply to MESSAGES ([{"role", "content"}, ...]): same keys as `complete`."""
        out = self._request("POST", "/chat/completions",
                            {"model": self._model(), "messages": messages, **_sampling(sampling)})
        choice = _first_choice(out, self.url + "/chat/completions")
        return {"text": (choice.get("message") or {}).get("content") or "", "model": out.get("model") or self._model(),
                "finish_reason": choice.get("finish_reason"), "usage": out.get("usage") or {}}

    def classify(self, texts: list[str], top_k: int = 1, batch_size: int = 32) -> list[list[dict]]:
        """Top-K labels for each of TEXTS: rows of {"label", "score"}, most probable first (slm serve's
        /v1/classify), asked BATCH_SIZE texts per request (servers cap the inputs of one request: slm serve at 64)."""
        out: list[list[dict]] = []
        for i in range(0, len(texts), batch_size):
            chunk = list(texts[i:i + batch_size])
            answer = self._request("POST", "/classify", {"model": self._model(), "input": chunk, "top_k": top_k})
            rows = sorted(answer.get("data") or [], key=lambda r: r.get("index", 0))
            if len(rows) != len(chunk):
                raise RemoteError(f"{self.url}/classify answered {len(rows)} rows for {len(chunk)} texts; is it an "
                                  "slm serve classifier?")
            out += [[{"label": x["label"], "score": float(x["score"])} for x in r["labels"]] for r in rows]
        return out

    # -- plumbing --------------------------------------------------------------------------------------------------
    def _model(self) -> str:
        if self.model is None:  # OpenAI-style servers want a name; llama-server ignores it but lists one
            names = self.models()
            if not names:
                raise RemoteError(f"{self.url}/models lists no models; name one with the model setting")
            self.model = names[0]
        return self.model

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON answer to METHOD {url}PATH, retried on 429/5xx/timeouts/refused connections."""
        url = self.url + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        problem = ""
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))  # 0.5 s, 1 s, 2 s, ...: let a busy server drain
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code not in RETRY_STATUS:  # the request is wrong: another try would fail the same way
                    raise RemoteError(f"{url} answered {e.code}: {message}") from None
                problem = f"answered {e.code} ({message})"
            except TimeoutError:
                problem = f"gave no answer within {self.timeout:g} s"
            except urllib.error.URLError as e:
                reason = e.reason
                if isinstance(reason, TimeoutError):
                    problem = f"gave no answer within {self.timeout:g} s"
                else:
                    problem = f"cannot be reached ({getattr(reason, 'strerror', None) or reason})"
            except ConnectionError as e:
                problem = f"cannot be reached ({e.strerror or type(e).__name__})"
            except json.JSONDecodeError:
                raise RemoteError(f"{url} answered something that is not JSON; is the URL an OpenAI-compatible API "
                                  "base (…/v1)?") from None
        tries = f"{self.retries} {'try' if self.retries == 1 else 'tries'}"
        raise RemoteError(f"{url} {problem} after {tries}; is the server running? check the URL "
                          "(the API base, e.g. http://host:8000/v1) and that the server is up")


def _sampling(sampling: dict) -> dict:
    """Our setting names -> the OpenAI API's (max_new_tokens -> max_tokens); unset (None) values dropped."""
    out = {k: v for k, v in sampling.items() if v is not None}
    if "max_new_tokens" in out:
        out["max_tokens"] = out.pop("max_new_tokens")
    if not out.get("stop"):
        out.pop("stop", None)  # OpenAI refuses an empty stop list
    return out


def _first_choice(out: dict, url: str) -> dict:
    choices = out.get("choices") or []
    if not choices:
        raise RemoteError(f"{url} answered without choices; is it an OpenAI-compatible API?")
    return choices[0]


def _error_message(e: urllib.error.HTTPError) -> str:
    """The server's error message (OpenAI's {"error": {"message"}} shape, or the body's first line)."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except Exception:
        return str(e.reason)
    try:
        err = json.loads(raw).get("error")
        return str(err.get("message") if isinstance(err, dict) else err or raw).splitlines()[0][:300]
    except (ValueError, AttributeError, IndexError):
        return (raw.strip().splitlines() or [str(e.reason)])[0][:300]
