"""Settings: defaults < YAML config file < environment (`LLMGW_`, nested keys joined by `__`).

Built lazily by `load_settings()`, never at import time.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

DEFAULT_DATA_DIR = Path("data")

# vLLM's OpenAI server; placeholders are filled per engine (see tasks.local.render_command).
DEFAULT_ENGINE_COMMAND = (
    ".venv-engine/bin/vllm serve {model} --served-model-name {served_name} "
    "--uds {socket} --tensor-parallel-size {gpus} {engine_args}"
)


def detect_gpu_ids() -> list[str]:
    """GPU indices from nvidia-smi; on a machine without GPUs, one CPU slot (engines run on CPU)."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            ids = [line.strip() for line in out.splitlines() if line.strip()]
            if ids:
                return ids
        except (OSError, subprocess.SubprocessError):
            pass
    return ["cpu0"]


class LocalSettings(BaseModel):
    engine_command: str = Field(
        DEFAULT_ENGINE_COMMAND,
        description="Engine command template. Placeholders: {model} (local path or model id), "
        "{served_name}, {socket} (a Unix socket in the engine's private directory: the engine should "
        "listen there, behind its nginx front), or {host} and {port} (a private TCP address instead), "
        "{gpus}, {max_model_len}; the word {engine_args} expands to the model's engine_args.",
    )
    gpu_ids: list[str] | None = Field(
        None,
        description="GPU ids handed out as CUDA_VISIBLE_DEVICES; default: detected GPUs, else one CPU slot.",
    )
    stop_grace_seconds: float = Field(10.0, gt=0, description="SIGTERM, then SIGKILL after this long.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for engines.")
    env_passthrough: list[str] = Field(
        default_factory=list,
        description="Names or patterns (AWS_*) of the gateway's environment that engines get beyond the "
        "allowlist (PATH, HOME, LANG, LC_*, VLLM_*, HF_* but no tokens or keys); LLMGW_* and cloud "
        "credentials pass only when listed here.",
    )

    def resolved_gpu_ids(self) -> list[str]:
        return self.gpu_ids if self.gpu_ids is not None else detect_gpu_ids()


class SkyPilotSettings(BaseModel):
    default_accelerators: list[str] = Field(
        ["L4", "A10G", "L40S", "A100", "A100-80GB", "H100"],
        description="GPU types a model may get (any of) when its entry names no `accelerators`.",
    )
    failsafe_minutes: int = Field(
        30, ge=5, description="Clusters delete themselves this long after the gateway's last heartbeat."
    )
    disk_size_gb: int = Field(256, ge=50)
    use_spot: bool = False
    vllm_version: str = Field("0.32.0", description="`pip install vllm==...` on the cluster (no image).")
    image: str | None = Field(None, description="Docker image instead of pip, e.g. vllm/vllm-openai:v0.32.0.")
    infra: str | None = Field(
        None, description="Where to launch: aws, aws/us-east-1, k8s, ... (default: any)."
    )
    job_check_seconds: float = Field(15.0, gt=0, description="Job status poll while an engine loads.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra labels on every cluster.")
    sdk_long_threads: int = Field(
        64,
        ge=1,
        description="Threads for SkyPilot's long waits (a launch or down each): concurrent cold starts.",
    )
    sdk_short_threads: int = Field(
        8, ge=1, description="Threads for short SkyPilot calls (status, heartbeats)."
    )
    call_timeout_seconds: float = Field(60.0, gt=0, description="Timeout of a short SkyPilot call.")
    launch_timeout_seconds: float = Field(
        1800.0,
        gt=0,
        description="Timeout of a launch (provisioning and setup); it is then cancelled and downed.",
    )
    down_timeout_seconds: float = Field(900.0, gt=0, description="Timeout of a `down` or an `exec` (swap).")
    cold_start_timeout_seconds: float = Field(
        1800.0,
        gt=0,
        description="Cold-start timeout of SkyPilot engines (the top-level one applies locally).",
    )
    network: Literal["public", "private"] = Field(
        "public",
        description="public: the engine's front port is open to the internet (key-checked); private: no "
        "port is opened and the gateway reaches the node's internal address (aws.use_internal_ips).",
    )
    install: Literal["pip", "uv"] = Field("pip", description="How setup installs vLLM when no image is set.")
    disk_tier: Literal["low", "medium", "high", "ultra", "best"] | None = Field(
        None, description="Disk tier of the nodes (high: faster weight loads); default SkyPilot's."
    )
    weight_store: str | None = Field(
        None,
        description="s3:// or gs:// prefix where each model's files are under its id; read with vLLM's "
        "Run:ai streamer instead of a Hugging Face download. A model's own weights_uri wins.",
    )
    cache_uri: str | None = Field(
        None, description="Bucket mounted cached on the node for vLLM's compile cache (VLLM_CACHE_ROOT)."
    )
    release_wait_seconds: int = Field(
        180, ge=0, description="After a swap, how long the new engine waits for the old one's ports and GPUs."
    )


class ScheduleSettings(BaseModel):
    cron: str = Field(description="Cron expression, read in `timezone`.")
    timezone: str = "America/Chicago"
    models: list[str] = Field(default_factory=list, description="Models to load (pre-warm only).")

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(v):
            raise ValueError(f"invalid cron expression {v!r}")
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {v!r}") from exc
        return v


class CostSettings(BaseModel):
    local_gpu_hour: float = Field(0.0, ge=0, description="Dollars per GPU-hour of the local provider's GPUs.")
    gpu_hour: dict[str, float] = Field(
        default_factory=lambda: {
            "L4": 0.8,
            "A10G": 1.0,
            "L40S": 1.9,
            "A100": 3.7,
            "A100-80GB": 4.1,
            "H100": 9.0,
        },
        description="Fallback dollars per GPU-hour by accelerator, when SkyPilot cannot price a cluster.",
    )
    default_gpu_hour: float = Field(2.0, ge=0, description="Fallback for accelerators not in `gpu_hour`.")


class ExportSettings(BaseModel):
    bucket: str | None = Field(
        None, description="S3 bucket for daily usage and cost files; unset: no export."
    )
    prefix: str = "llm-gateway"
    cron: str = Field("30 0 * * *", description="When to export (UTC): the finished days are written.")
    days_back: int = Field(3, ge=1, le=366, description="How many finished days each run (re)writes.")


class UsageSettings(BaseModel):
    raw_rows: bool = Field(
        False,
        description="Also keep one row per request (table `usage`), besides the per-minute rollups "
        "(`usage_minutes`) that costs, dashboards and the export read. Off: at thousands of requests "
        "per second that is hundreds of millions of rows a day.",
    )
    retention_days: float | None = Field(
        30, gt=0, description="Raw rows older than this are deleted (hourly); null keeps them."
    )
    rollup_retention_days: float | None = Field(
        None, gt=0, description="Per-minute rollups older than this are deleted; null keeps them."
    )
    flush_seconds: float = Field(2.0, gt=0, description="How often usage is written to the database.")


class FleetSettings(BaseModel):
    """Several gateways on one database: every one serves, the lease holder acts."""

    poll_seconds: float = Field(
        0.5,
        gt=0,
        description="How often a gateway that is not the lease holder reads the ready deployments (and "
        "the holder the others' reports); on PostgreSQL LISTEN/NOTIFY wakes them at once as well.",
    )
    report_seconds: float = Field(
        1.0,
        gt=0,
        description="How often such a gateway reports its requests in flight and waiting (at once when a "
        "model gets its first waiting request). Reports older than three intervals are ignored.",
    )
    takeover_poll_seconds: float = Field(
        1.0, gt=0, description="How often it tries to take the controller lease over."
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLMGW_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = DEFAULT_DATA_DIR
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL (sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST/DB); "
        "default: SQLite in data_dir.",
    )
    upgrade_database_on_start: bool = Field(
        False,
        description="Upgrade an older database schema at startup (--dev sets it); otherwise startup "
        "refuses one and `llm-gateway db upgrade` does it. An empty database is always created.",
    )
    model_reference: Path = Path("model_reference.json")
    provider: Literal["local", "skypilot"] = "local"
    admin_token: SecretStr | None = None
    client_auth: Literal["keys", "open"] | None = Field(
        None,
        description="keys: the OpenAI routes need a client API key (`llm-gateway admin keys create`); "
        "open: anyone who reaches the gateway may use (and wake) every model. Unset: keys, except "
        "`serve --dev` on a loopback address, which is open.",
    )
    hf_token: SecretStr | None = Field(None, description="Hugging Face token handed to engines as a secret.")
    keep_hot_seconds: float = Field(600.0, ge=0)
    spare_seconds: float = Field(
        0.0,
        ge=0,
        description="After the keep-hot time, how long a cluster stays up as a spare for another model's "
        "cold start to swap onto (SkyPilot only); 0: off. A model's own `spare_seconds` wins.",
    )
    cold_start_timeout_seconds: float = Field(900.0, gt=0)
    max_waiting_requests: int = Field(512, ge=0, description="Requests waiting for a cold model, per model.")
    allow_unlisted_models: bool = False
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    upstream_timeout_seconds: float = Field(600.0, gt=0, description="Engine read timeout.")
    reaper_interval_seconds: float = Field(2.0, gt=0)
    scale_up_seconds: float = Field(
        30.0,
        ge=0,
        description="A model with replicas.max > 1 gets one more replica when its load per ready replica "
        "stays above target_in_flight_per_replica this long (the reference file may set its own).",
    )
    scale_down_seconds: float = Field(
        120.0,
        ge=0,
        description="One replica is removed when the load stays low enough for one fewer this long.",
    )
    controller_lease_seconds: float = Field(
        15.0,
        gt=0,
        description="A second gateway on the same database takes over this long after the first died.",
    )
    loading_comment_seconds: float = Field(
        2.0, gt=0, description="Interval of `: loading` SSE comments sent to waiting streams."
    )
    stop_timeout_seconds: float = Field(
        900.0,
        gt=0,
        description="One provider stop (a `sky down` can take minutes); a failed stop is retried.",
    )
    provider_call_timeout_seconds: float = Field(
        120.0, gt=0, description="Any other provider call (probe, heartbeat, list, swap submission)."
    )
    orphan_sweep_seconds: float = Field(
        120.0,
        gt=0,
        description="How often the control loop lists the provider's clusters and stops those no "
        "deployment owns (left by a gateway that died mid-launch while the next could not list them).",
    )
    engine_secret: SecretStr | None = Field(
        None,
        description="Secret from which each engine's API key is derived (HMAC with the deployment id); "
        "default: derived from admin_token.",
    )
    log_level: str = "INFO"
    metrics_known_models: int = Field(
        200,
        ge=0,
        description="Models whose Prometheus series exist from startup (at zero); with a bigger reference "
        "file, the most recently used ones. The others get theirs at their first request.",
    )
    failed_model_ttl_seconds: float = Field(
        600.0, ge=0, description="How long a model whose engine failed to start is answered with 400."
    )
    eviction_cooldown_seconds: float = Field(
        600.0, ge=0, description="A model evicted by X cannot evict X back within this time."
    )
    drain_seconds: float = Field(
        30.0, ge=0, description="Requests in flight get this long before a forced stop."
    )
    after_hours: ScheduleSettings | None = Field(
        default_factory=lambda: ScheduleSettings(cron="0 23 * * *", timezone="America/Chicago"),
        description="At each firing every deployment is stopped, pinned ones included; null turns it off.",
    )
    prewarm: list[ScheduleSettings] = Field(
        default_factory=list, description="Schedules that load models before people arrive."
    )
    reconcile_unknown: Literal["down", "adopt"] = Field(
        "down",
        description="At startup, what to do with a cluster carrying our label that the store does not know.",
    )
    local: LocalSettings = Field(default_factory=LocalSettings)
    costs: CostSettings = Field(default_factory=CostSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    skypilot: SkyPilotSettings = Field(default_factory=SkyPilotSettings)
    fleet: FleetSettings = Field(default_factory=FleetSettings)

    @field_validator("log_level")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    @property
    def keys_required(self) -> bool:
        return self.client_auth != "open"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'gateway.db'}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the YAML file, which is passed as init kwargs.
        return env_settings, init_settings


class ConfigFileError(ValueError):
    pass


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigFileError(f"{path}: cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigFileError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """File < environment < `overrides` (command-line flags, already validated by their types)."""
    settings = Settings(**(read_config_file(config_file) if config_file else {}))
    return settings.model_copy(update=overrides) if overrides else settings
