"""Settings for the API, the workers and the local stack: environment first, then an env file.

Built by `get_settings()` (cached), never at import, so tests can build their own.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "replace-me", "placeholder", "xxx", "test"}
DEFAULT_ENV_PASSTHROUGH = [
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
]

CsvList = Annotated[list[str], NoDecode]


def is_loopback(host: str) -> bool:
    """True when `host` names only this machine (so a development login cannot be reached from outside)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Every knob, with the original service's env names where they existed (prefix `AGENT_`)."""

    model_config = SettingsConfigDict(
        env_prefix="AGENT_",
        env_file=("/etc/overlord/agent.env", ".env"),
        env_file_encoding="utf-8",
        extra="ignore",
    )

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8767, ge=1, le=65535)
    redis_url: str = "redis://127.0.0.1:6379/0"
    queue: str = Field("agent", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    key_prefix: str = Field("agent:", description="prefix of every Redis key this service owns (not RQ's)")

    # Auth
    auth_mode: Literal["signed", "introspect", "dev"] = "signed"
    cookie_name: str = "session"
    session_secret: SecretStr = SecretStr("")
    session_max_age_s: int = Field(14 * 24 * 3600, gt=0)
    session_user_key: str = "username"
    auth_url: str = ""
    auth_cache_s: int = Field(30, ge=0, description="how long an introspection answer is reused")
    auth_timeout_s: float = Field(3.0, gt=0)
    dev_user: str = "dev"
    allowed_origins: CsvList = []
    admin_users: CsvList = []
    dashboard_redis_url: str = Field("", description="a read-only Redis user for /agent/rq/ (default: redis_url)")

    # Admission
    rate_max: int = Field(60, ge=1)
    rate_window_s: int = Field(3600, ge=1)
    concurrency_per_user: int = Field(1, ge=1)
    max_queued: int = Field(1000, ge=1)
    session_owner_ttl_s: int = Field(90 * 24 * 3600, ge=60)
    lease_ttl_s: int = Field(30, ge=3, description="lease lifetime while running; renewed every third of it")

    # Jobs
    job_timeout_s: int = Field(600, ge=1, description="wall clock for one claude run")
    queue_ttl_s: int = Field(600, ge=1, description="how long an ask may wait queued before it expires")
    result_ttl_s: int = Field(3600, ge=1)
    failure_ttl_s: int = Field(24 * 3600, ge=1)
    long_poll_max_s: float = Field(25.0, gt=0, le=60)

    # Worker
    worker_ttl_s: int = Field(30, ge=5)
    maintenance_interval_s: int = Field(5, ge=1)
    job_monitoring_interval_s: int = Field(5, ge=1)
    workers: int = Field(2, ge=1, le=64, description="workers the local stack starts")

    # Audit
    audit_log: Path = Path("/var/log/overlord-agent/audit.jsonl")

    # The claude CLI
    claude_bin: str = "claude"
    claude_cwd: Path = Path("/srv/overlord/work")
    claude_config_dir: Path = Path("/srv/overlord/claude")
    claude_tmpdir: Path | None = None
    claude_model: str = ""
    claude_tools: str = Field("", description='value of --tools ("" = no tools at all)')
    claude_allowed_tools: CsvList = []
    claude_permission_mode: str = "dontAsk"
    claude_max_turns: int = Field(8, ge=1)
    claude_append_system_prompt: str = ""
    claude_max_retries: int = Field(2, ge=0, le=10)
    claude_output_max_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    claude_stream_progress: bool = True
    claude_env_passthrough: CsvList = list(DEFAULT_ENV_PASSTHROUGH)
    claude_demo: bool = Field(False, description="replies come from the offline stand-in, not a model")

    @field_validator("allowed_origins", "admin_users", "claude_allowed_tools", "claude_env_passthrough", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _strip_slash(cls, value: list[str]) -> list[str]:
        return [origin.rstrip("/") for origin in value]

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.auth_mode == "signed":
            secret = self.session_secret.get_secret_value()
            if secret.strip().lower() in PLACEHOLDER_SECRETS or len(secret) < 16:
                raise ValueError(
                    "AGENT_SESSION_SECRET is empty, a placeholder or shorter than 16 characters: "
                    "set it to the secret dereth-tracker signs its session cookie with"
                )
        if self.auth_mode == "introspect" and not self.auth_url.startswith(("http://", "https://")):
            raise ValueError("AGENT_AUTH_MODE=introspect needs AGENT_AUTH_URL (the issuer's who-am-I URL)")
        if self.auth_mode == "dev" and not is_loopback(self.host):
            raise ValueError(f"AGENT_AUTH_MODE=dev lets anyone in: it only binds loopback, not {self.host!r}")
        return self

    @property
    def lease_ttl_ms(self) -> int:
        return self.lease_ttl_s * 1000

    @property
    def queued_lease_ttl_ms(self) -> int:
        """A lease taken at admission must outlive the longest queue wait plus the start of the job."""
        return (self.queue_ttl_s + self.lease_ttl_s) * 1000

    @property
    def rq_job_timeout_s(self) -> int:
        """RQ's own timeout is a backstop behind the worker's wall clock, which kills claude first."""
        return self.job_timeout_s + 30


@lru_cache
def get_settings() -> Settings:
    return Settings()
