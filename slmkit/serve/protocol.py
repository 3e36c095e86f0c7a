"""Request and response schemas: the OpenAI API shapes (the fields slmkit honours), plus /v1/classify.

Unknown fields are ignored, as OpenAI clients send many optional ones; values out of range are a 400 in OpenAI's
error shape (`{"error": {"message", "type", "param", "code"}}`, see `error_body`; routes raise `APIError`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


@dataclass
class Settings:
    """Server limits and security settings (from `slm serve`'s options)."""

    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    max_body_bytes: int = 1_000_000
    max_tokens_limit: int = 1024  # largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # default: the model's context
    max_inputs: int = 64  # texts per embeddings / classify request
    max_batch: int = 16  # sequences decoded together per model
    max_queue: int = 64  # requests waiting for a free row before 429
    cors_origins: list[str] = field(default_factory=list)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An error answered in OpenAI's shape with STATUS (and HEADERS, e.g. Retry-After); raised by routes and the body
    limit, turned into JSON by the app's handler."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Req):
    include_usage: bool = False


class _Sampling(_Req):
    model: str = Field(description="a name listed by GET /v1/models")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (default: up to the limit)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=8, description="independent choices")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings; generation ends before the first")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: str | None = None

    def stop_list(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [x for x in s if x]


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(description="text to continue (a list of one string is accepted)")
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20, description="log probabilities of the chosen and top tokens")
    echo: bool = False


class ChatMessage(_Req):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | None = ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(_Req):
    model: str
    input: str | list[str] = Field(description="one text or a list of texts")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)


class ClassifyRequest(_Req):
    """POST /v1/classify: the top-k labels with probabilities for each input text (a classifier model)."""

    model: str
    input: str | list[str] = Field(description="one text or a list of texts")
    top_k: int = Field(1, ge=1, le=100, description="labels per text, most probable first")


# -- responses (documented in /openapi.json) -------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slmkit"
    kind: Literal["decoder", "encoder", "classifier", "remote", "router"]  # remote: NAME=URL; router: `auto`
    context_length: int  # 0 for a remote model (its server knows)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str | None
    logprobs: dict | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class LabelScore(BaseModel):
    label: str
    score: float


class Classification(BaseModel):
    index: int
    labels: list[LabelScore]


class ClassificationList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Classification]
    model: str
    usage: Usage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# Characters that str.splitlines (and so httpx's line reader) treats as line ends but JSON leaves raw: a generated
# U+2028 cut an event in two for such clients (found by the 10-minute soak). JSON escapes them just as well.
_LINE_BREAKERS = {ord(c): f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"}


def sse_event(obj: dict) -> str:
    """One server-sent event: a single `data:` line whatever the text holds (UTF-8 kept readable otherwise)."""
    return f"data: {json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKERS)}\n\n"

