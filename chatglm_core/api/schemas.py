"""The OpenAI wire shapes as pydantic models: requests we accept and responses we send.

Their bounds are the documented limits of the API, and they generate /openapi.json, so a fuzzer
reading that document knows exactly what is valid. Anything outside the schema is a 400 in
OpenAI's error shape (see `errors.py`); checks the schema can't express (role order, tool
schemas, context length) raise `RequestError` later and are 400s too.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
MAX_N = 8
MAX_EMBEDDING_INPUTS = 2048
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class _Model(BaseModel):
    # Unknown fields are ignored (clients send many we don't use); NaN/inf are rejected.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


# --- requests: messages --------------------------------------------------------------------
class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] = ""  # a JSON object, encoded as a string by OpenAI clients


class ToolCallIn(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool", "function", "observation"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCall | None = None  # legacy functions API


# --- requests: tools and formats -----------------------------------------------------------
class FunctionDef(_Model):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="a JSON Schema of type object")
    strict: bool | None = None


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: FunctionName


class TextFormat(_Model):
    type: Literal["text"]


class JsonObjectFormat(_Model):
    type: Literal["json_object"]


class JsonSchemaSpec(_Model):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Model):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = None  # legacy
    function_call: Literal["none", "auto"] | FunctionName | None = None  # legacy
    logprobs: bool | None = None
    user: str | None = None
    # extensions (vLLM-style)
    repetition_penalty: float | None = Field(None, ge=0.1, le=10)
    top_k: int | None = Field(None, ge=0, le=100_000)


class EmbeddingRequest(_Model):
    model: str
    input: str | list[str] = Field(description="a string, or a list of up to 2048 strings")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# --- responses -------------------------------------------------------------------------------
class ErrorDetail(_Model):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Model):
    error: ErrorDetail


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FunctionCallOut(_Model):
    name: str
    arguments: str


class ToolCallOut(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None


class Choice(_Model):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls", "function_call"]
    logprobs: None = None


class PromptTokensDetails(_Model):
    cached_tokens: int = 0  # prompt tokens taken from the prefix cache


class UsageOut(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletion(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageOut


class EmbeddingItem(_Model):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(_Model):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(_Model):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


class Health(_Model):
    status: Literal["ok"] = "ok"
    model: str
