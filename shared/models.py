"""Request and response bodies of the HTTP contract (DESIGN.md section 1)."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

JobStatus = Literal["queued", "started", "finished", "failed", "canceled", "expired"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"finished", "failed", "canceled", "expired"})


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: uuid.UUID = Field(description="the conversation's UUID, from POST /agent/sessions/new")
    message: str = Field(min_length=1, max_length=10_000)

    @field_validator("message")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("message is blank")
        if "\x00" in value:
            raise ValueError("message contains a NUL character")
        return value


class AskAccepted(BaseModel):
    job_id: str
    session_id: str
    status: Literal["queued"] = "queued"
    position: int = Field(ge=0, description="0 = next to run")


class NewSession(BaseModel):
    session_id: str


class Me(BaseModel):
    user: str


class AskResult(BaseModel):
    result: str
    session_id: str
    duration_ms: int
    num_turns: int
    is_error: bool
    denied_tools: list[str] = Field(default_factory=list, description="tools the agent asked for and was refused")


class JobError(BaseModel):
    code: str
    message: str


class Progress(BaseModel):
    turns: int = 0
    tool: str | None = None
    updated_at: str | None = None


class JobView(BaseModel):
    job_id: str
    session_id: str
    status: JobStatus
    position: int | None = None
    progress: Progress | None = None
    result: AskResult | None = None
    error: JobError | None = None
    enqueued_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None


class HistoryMessage(BaseModel):
    role: Literal["user", "assistant"]
    text: str
    timestamp: str | None = None


class History(BaseModel):
    messages: list[HistoryMessage]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    redis: bool
    workers: int
    queued: int
    demo: bool


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    detail: str
    code: str
