"""The OpenAI wire format's data: request bodies (pydantic, strict: a string where a number belongs
is an error, not a guess), the error body every failure is returned in, and one readable line for
a validation error.

Unknown fields are refused (extra="forbid": a 400 naming the field), never silently ignored. OpenAI
fields keel does not implement are accepted only at their neutral value (null, the default), which
is what clients that fill in every field send; any other value is a 400 naming the field.
Turning a body into an engine request and building responses is `keel.serve.openai`'s job."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


MAX_N = 16            # choices per prompt
MAX_CHOICES = 64      # choices per request (prompts x n): bounds one request's work
MAX_PROMPTS = 64      # prompts in one completions request
MAX_TOP_LOGPROBS = 20
MAX_STOPS = 4         # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 128  # characters per stop string: bounds the per-token stop check

# OpenAI fields keel does not implement, and the values that mean "not used" (accepted, no effect)
_NEUTRAL: dict[str, tuple] = {
    "user": (Any,), "metadata": (None,), "store": (None, False), "service_tier": (None, "auto", "default"),
    "logit_bias": (None, {}), "best_of": (None, 1), "suffix": (None,), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "parallel_tool_calls": (None, True), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "reasoning_effort": (None,), "modalities": (None, ["text"]), "prediction": (None,), "audio": (None,),
    "web_search_options": (None,),
}


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


def _drop_neutral(data: Any) -> Any:
    """Remove unimplemented OpenAI fields sent at a value meaning "not used"; refuse the rest."""
    if not isinstance(data, dict):
        return data
    for name, neutral in _NEUTRAL.items():
        if name in data:
            value = data[name]
            if neutral != (Any,) and value not in neutral:
                what = (" (json_object and json_schema are not implemented)" if name == "response_format" else "")
                raise ValueError(f"UNSUPPORTED:{name}:the parameter {name!r} is not supported by this server"
                                 f"{what}; omit it or send null")
    return {k: v for k, v in data.items() if k not in _NEUTRAL}


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

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
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1                      # choices per prompt
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: (Annotated[str, Field(max_length=MAX_STOP_CHARS)]
           | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOPS)] | None) = None
    seed: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        return _drop_neutral(data)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk (OpenAI sends none unless asked)."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _newer_name(self):
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("TOP:top_logprobs needs logprobs: true")
        return self


class CompletionRequest(_Sampling):
    # a string, token ids, or a batch of either
    prompt: (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: Annotated[int, Field(ge=0)] | None = None   # 0 only with echo: score the prompt
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("MAX:max_tokens must be >= 1 (0 is allowed only with echo: true)")
        if self.echo and self.stream:
            raise ValueError("ECHO:echo is not supported with stream: true")
        prompts = 1 if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else len(self.prompt)
        if prompts * self.n > MAX_CHOICES:
            raise ValueError(f"N:{prompts} prompts x n={self.n} is over the limit of {MAX_CHOICES} choices per request")
        return self

    def prompts(self) -> list:
        """The prompts: each a string or a list of token ids."""
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(e: ValidationError) -> tuple[str, str | None]:
    """One readable line for the first validation error, and the parameter it concerns."""
    err = e.errors(include_url=False)[0]
    msg = str(err.get("ctx", {}).get("error", "")) if err["type"] == "value_error" else ""
    tagged = {"UNSUPPORTED": None, "TOP": "top_logprobs", "N": "n", "MAX": "max_tokens", "ECHO": "echo"}
    tag, _, rest = msg.partition(":")
    if tag in tagged:
        if tag == "UNSUPPORTED":
            name, _, text = rest.partition(":")
            return text, name
        return rest, tagged[tag]
    if err["type"] == "extra_forbidden":
        name = ".".join(str(x) for x in err.get("loc", ()) if not _is_type_tag(str(x)))
        return f"the parameter {name!r} is not supported by this server; remove it", name
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
