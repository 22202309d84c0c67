"""Request bodies of the HTTP API (pydantic; unknown fields are refused, every limit names itself)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 8        # choices per chat completion
MAX_WORKERS = 8  # workers (or given branches) per fork


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class Sampling(Body):
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class StreamOptions(Body):
    include_usage: bool = False


class ParsynOptions(Body):
    workers: int = Field(3, ge=1, le=MAX_WORKERS)
    roles: list[str] | None = None
    route: Literal["cache", "text", "both", "auto"] = "cache"
    layout: Literal["parallel", "sequential"] | None = None
    instruction: str | None = None
    worker_max_tokens: int = Field(128, ge=1)
    worker_temperature: float = Field(0.7, ge=0, le=2)


class ChatRequest(Sampling):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    parsyn: ParsynOptions | None = None


class ForkRequest(Sampling):
    question: str = Field(min_length=1)
    system: str | None = None
    workers: int | None = Field(None, ge=1, le=MAX_WORKERS)
    roles: list[str] | None = None
    branches: list[str] | None = Field(None, min_length=1, max_length=MAX_WORKERS)
    temperature: float = Field(0.7, ge=0, le=2)
    stream: bool = False


class BranchRequest(Body):
    text: str = Field(min_length=1)
    role: str | None = None


class SynthesizeRequest(Sampling):
    route: Literal["cache", "text", "both", "auto"] = "cache"
    layout: Literal["parallel", "sequential"] | None = None
    instruction: str | None = None
    adapter: Literal["auto", "none"] = "auto"
    temperature: float = Field(0.0, ge=0, le=2)
    stream: bool = False
