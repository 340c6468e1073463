"""The OpenAI wire format's data: request bodies (pydantic, strict: a string where a number belongs
is an error, not a guess), the error body every failure is returned in, and one readable line for
a validation error.

Unknown fields are ignored, as OpenAI clients send many (user, logprobs, presence_penalty...).
Turning a body into an engine request and building responses is `keel.serve.openai`'s job."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None   # None: 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None          # None: 1.0
    max_tokens: Annotated[int, Field(ge=1)] | None = None             # None: the server's default
    n: Annotated[int, Field(ge=1, le=1)] = 1                          # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk (OpenAI sends none unless asked)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens

    @model_validator(mode="after")
    def _newer_name(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_Sampling):
    # a string, a one-string list, or token ids
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | Annotated[list[int], Field(min_length=1)]
    echo: bool = False

    @model_validator(mode="after")
    def _no_echo(self):
        if self.echo:
            raise ValueError("echo is not supported")
        return self


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(e: ValidationError) -> tuple[str, str | None]:
    """One readable line for the first validation error, and the parameter it concerns."""
    err = e.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return f"the body is not valid JSON: {err['msg']}", None
    # union members appear in the location as type tags ("str", "list[int]"): keep the field path
    loc = ".".join(str(x) for x in err.get("loc", ()) if not _is_type_tag(str(x)))
    if err["type"] in ("model_type", "model_attributes_type") and not loc:
        return "the body must be a JSON object", None
    return (f"{loc}: {err['msg']}" if loc else err["msg"]), (loc or None)


def _is_type_tag(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "none") or part.startswith(
        ("list[", "dict[", "literal[", "constrained-", "function-", "nullable[", "json-or-python["))
