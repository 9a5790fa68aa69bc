"""The request bodies `prefalign serve` accepts: OpenAI's fields, typed (they make the OpenAPI schema).

Unknown keys are errors (400 naming the key), as in prefalign's configs: a misspelt `max_token`
must not silently fall back to a default. OpenAI fields prefalign does not implement are accepted
only at their neutral value (`frequency_penalty: 0`, ...), so a client that sends the defaults works
and one that asks for the feature is told it is missing. `top_k`, `ignore_eos` and
`return_tokens_as_token_ids` are vLLM's extensions of the same API, spelt as vLLM spells them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# fields of OpenAI's API that are accepted at their neutral value only
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "best_of": 1, "suffix": None,
           "tools": None, "tool_choice": None, "response_format": None, "parallel_tool_calls": None,
           "function_call": None, "functions": None}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="a name from GET /v1/models")
    n: int = Field(1, ge=1, description="completions per prompt")
    temperature: float = Field(1.0, ge=0, le=2, description="softmax temperature; 0: greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass; 1: off")
    top_k: int = Field(0, ge=-1, description="(vLLM's extension) keep the k most likely tokens; 0 or -1: off")
    stop: str | list[str] | None = Field(None, description="up to 4 strings that end a completion (not returned)")
    seed: int | None = Field(None, ge=-2**63, lt=2**63, description="the draw is reproducible: same seed, prompt and "
                             "settings, same text (a 64-bit signed integer, as OpenAI and vLLM take it)")
    stream: bool = Field(False, description="server-sent events in OpenAI's chunk format, ending in data: [DONE]")
    stream_options: dict[str, Any] | None = Field(None, description="{include_usage: true}: a last chunk with usage")
    ignore_eos: bool = Field(False, description="(vLLM's extension) run to max_tokens past EOS (load tests)")
    return_tokens_as_token_ids: bool = Field(
        False, description="(vLLM's extension) logprobs name tokens as 'token_id:N' (exact ids for a client)")
    user: str | None = Field(None, description="accepted, unused")
    # OpenAI's fields that are accepted at their neutral value only (see NEUTRAL)
    frequency_penalty: float = 0
    presence_penalty: float = 0
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _neutral(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, neutral in NEUTRAL.items():
                # a JSON true/false is not 1/0 (Python says it is; the schema's enum does not)
                if key in data and (isinstance(data[key], bool) or data[key] not in (neutral, {}, [])) \
                        and not (key == "best_of" and data[key] is None):
                    raise ValueError(f"{key}: not supported by prefalign serve (only {neutral!r})")
            data = {k: v for k, v in data.items() if k not in NEUTRAL or k in cls.model_fields}
            for key, value in data.items():  # pydantic's lax mode reads true as 1: the schema says integer
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and "bool" not in str(field.annotation):
                    raise ValueError(f"{key}: a number, not {str(value).lower()}")
            if data.get("top_k") == -1:  # vLLM's spelling of off
                data["top_k"] = 0
        return data

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionBody(Body):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="text, texts, token ids, or lists of token ids (one completion set per prompt)")
    max_tokens: int | None = Field(None, ge=0, description="tokens generated per completion at most (default: "
                                                           "OpenAI's 16, or the server's --max-tokens if lower)")
    logprobs: int | None = Field(None, ge=0, le=20, description="log-probs of the sampled and the N most likely tokens")
    echo: bool = Field(False, description="the prompt is returned before the completion (with logprobs: scored)")
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("give at least one prompt (an empty list has nothing to complete)")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ...: passed to the chat template as they are

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: the text parts, in order
            parts = [p.get("text", "") for p in self.content if p.get("type") == "text"]
            if len(parts) != len(self.content):
                raise ValueError("content: only text parts are supported")
            return "".join(parts)
        return self.content or ""


class ChatBody(Body):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="tokens generated per completion at most")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    logprobs: bool = Field(False, description="log-prob of each sampled token")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and of the N most likely tokens (needs logprobs)")
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
