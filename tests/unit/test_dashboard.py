"""The monitoring assets in infra/ agree with each other and with the gateway.

The Grafana dashboard is well formed and queries only metrics (and labels) that GET /metrics
exports; Prometheus scrapes the gateway where compose runs it; Grafana's provisioned datasource
is the one the dashboard names; the compose file mounts what the other files expect.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.reference import load_reference
from gateway.config.settings import load_settings
from state import Store
from tests.conftest import CHAT_BODY, make_settings, running_gateway
from tests.fakes import FakeProvider

INFRA = Path(__file__).resolve().parents[2] / "infra"
DASHBOARD = INFRA / "grafana" / "dashboards" / "llm-gateway.json"
DATASOURCES = INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = INFRA / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml"
PROMETHEUS = INFRA / "prometheus" / "prometheus.yml"
COMPOSE = INFRA / "compose.yaml"
DOCKERFILE = INFRA / "Dockerfile"

METRIC_NAME = re.compile(r"\bllmgw_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Metrics without a `model` label: panels over them cannot follow the model selection.
UNLABELLED_BY_MODEL = {
    "llmgw_deployments",
    "llmgw_gpus_in_use",
    "llmgw_event_loop_lag_seconds",
    "llmgw_db_writes_pending",
    "llmgw_team_cost_month_dollars",
}
# Quantiles of request latency are only defined once there was a request: their series come then.
TRAFFIC_DEFINED = {"llmgw_request_duration_seconds_bucket", "llmgw_gateway_overhead_seconds_bucket"}
# Grafana's own variables, replaced by plausible values so PromQL tools can parse the queries.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$model": ".*"}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panel_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def base_name(name: str) -> str:
    """The family name of a histogram series (`x_bucket` -> `x`); other names unchanged."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and the template variables' queries."""
    exprs = [target["expr"] for _, target in panel_targets(dashboard)]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(query if isinstance(query, str) else query["query"])
    return exprs


def labels_used(expr: str, legend: str = "") -> set[str]:
    """Label names an expression groups by, matches on, or shows in its legend."""
    names: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names.update(n.strip() for n in group.split(",") if n.strip())
    for selector in re.findall(r"\{([^{}]*)\}", expr):
        names.update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector))
    names.update(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", legend))
    return names


def exported_series(exposition: str) -> dict[str, set[str] | None]:
    """The series names a Prometheus scrape of this text stores, each with the label names seen on
    its samples (None: no sample yet).

    A family without samples (a labelled metric nothing has touched yet) still counts as exported,
    under the names Prometheus will give its series: `_total` for counters, `_bucket`/`_sum`/
    `_count` for histograms."""
    series: dict[str, set[str] | None] = {}
    for family in text_string_to_metric_families(exposition):
        if family.type == "counter":
            series.setdefault(f"{family.name}_total", None)
        elif family.type == "histogram":
            for suffix in HISTOGRAM_SUFFIXES:
                series.setdefault(family.name + suffix, None)
        else:
            series.setdefault(family.name, None)
        for sample in family.samples:
            series[sample.name] = (series.get(sample.name) or set()) | set(sample.labels)
    return series


# -- the dashboard on its own ---------------------------------------------------------------


def test_dashboard_is_well_formed() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "llm-gateway"
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel.get("title"), panel
        targets = panel.get("targets", [])
        assert targets, f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r}: a target without expr"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_has_the_model_variable() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query"
    assert model["query"] == "label_values(llmgw_requests_total, model)"
    # "All" must match models without requests too (a pre-warmed model still costs money).
    assert model["includeAll"] and model["allValue"] == ".*"


def test_panels_with_a_model_label_follow_the_model_selection() -> None:
    for panel, target in panel_targets(load_dashboard()):
        names = {base_name(n) for n in metric_names(target["expr"])}
        if names - UNLABELLED_BY_MODEL:
            assert 'model=~"$model"' in target["expr"], f"{panel['title']!r} ignores $model"


def test_queries_are_balanced() -> None:
    for expr in dashboard_queries(load_dashboard()):
        for opening, closing in ("()", "{}", "[]"):
            assert expr.count(opening) == expr.count(closing), expr
        assert expr.count('"') % 2 == 0, expr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed")
def test_queries_parse_as_promql(tmp_path: Path) -> None:
    rules = []
    for index, (_, target) in enumerate(panel_targets(load_dashboard())):
        expr = target["expr"]
        for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the dashboard against the gateway's /metrics -------------------------------------------


async def test_dashboard_metrics_are_exported(tmp_path: Path, stub_url: str) -> None:
    provider = FakeProvider(endpoint=stub_url)
    async with running_gateway(make_settings(tmp_path), provider) as (app, client):
        for _ in range(2):  # a cold request, then a hot one
            chat = await client.post("/v1/chat/completions", json=CHAT_BODY)
            assert chat.status_code == 200, chat.text
        await app.state.usage.flush()  # token counts are taken from usage rows, on the reaper's tick
        response = await client.get("/metrics")  # no Authorization header: scraped without auth
    assert response.status_code == 200, response.text
    series = exported_series(response.text)

    dashboard = load_dashboard()
    queried = set().union(*(metric_names(expr) for expr in dashboard_queries(dashboard)))
    missing = sorted(name for name in queried if name not in series)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {missing}"
    # The metrics the dashboard is about are all there (a typo in the regex would hide some).
    assert {base_name(name) for name in queried} >= {
        "llmgw_requests_total",
        "llmgw_request_duration_seconds",
        "llmgw_gateway_overhead_seconds",
        "llmgw_cold_start_seconds",
        "llmgw_tokens_total",
        "llmgw_deployments",
        "llmgw_gpus_in_use",
        "llmgw_waiting_requests",
        "llmgw_cost_dollars_total",
        "llmgw_gpu_seconds_total",
        "llmgw_event_loop_lag_seconds",
        "llmgw_db_writes_pending",
    }

    # Label names, for every query (all have samples after those requests).
    for panel, target in panel_targets(dashboard):
        names = metric_names(target["expr"])
        seen = {name: series[name] for name in names}
        empty = sorted(name for name, labels in seen.items() if labels is None)
        assert not empty, f"panel {panel['title']!r}: no samples of {empty} after a cold and a hot request"
        available = set().union(*(labels for labels in seen.values() if labels is not None))
        unknown = labels_used(target["expr"], target.get("legendFormat", "")) - available
        assert not unknown, f"panel {panel['title']!r} uses labels {sorted(unknown)} not on {sorted(names)}"


async def test_every_panel_has_series_from_startup(tmp_path: Path, stub_url: str) -> None:
    """Before any request: each known model's series are there at zero (tokens, requests, waiting
    requests, cost, cold starts), so panels show 0 rather than "no data"."""
    models = {"org/chat": {}, "pinned": {"priority": 2}, "ext": {"endpoint": f"{stub_url}/v1"}}
    async with running_gateway(make_settings(tmp_path, models), FakeProvider(endpoint=stub_url)) as (
        _,
        client,
    ):
        await asyncio.sleep(0.25)  # a wake-up or two of the loop-lag probe
        response = await client.get("/metrics")
    series = exported_series(response.text)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    for panel, target in panel_targets(load_dashboard()):
        for name in metric_names(target["expr"]) - TRAFFIC_DEFINED:
            assert series[name] is not None, f"panel {panel['title']!r}: no samples of {name} at startup"
    for model in ("org/chat", "pinned", "ext"):
        assert samples[("llmgw_tokens_total", (("kind", "prompt"), ("model", model)))] == 0
        assert samples[("llmgw_waiting_requests", (("model", model),))] == 0
        assert (
            samples[
                (
                    "llmgw_requests_total",
                    (("model", model), ("path", "/v1/chat/completions"), ("status", "200")),
                )
            ]
            == 0
        )
    for model in ("org/chat", "pinned"):  # launchable: cost and cold starts (an external endpoint has none)
        assert samples[("llmgw_cost_dollars_total", (("model", model), ("phase", "idle")))] == 0
        assert ("llmgw_cold_start_seconds_count", (("model", model), ("phase", "total"))) in samples
    assert ("llmgw_cost_dollars_total", (("model", "ext"), ("phase", "idle"))) not in samples
    assert samples[("llmgw_deployments", (("state", "ready"),))] == 0
    assert samples[("llmgw_event_loop_lag_seconds_count", ())] >= 1


async def test_series_from_startup_are_capped_to_the_most_recently_used_models(
    tmp_path: Path, stub_url: str
) -> None:
    models = {f"m{i}": {} for i in range(6)}
    settings = make_settings(tmp_path, models, metrics_known_models=3)
    store = Store(settings.resolved_database_url)
    store.upgrade()
    store.touch_models({"m4": datetime(2026, 11, 1, tzinfo=UTC), "m2": datetime(2026, 11, 2, tzinfo=UTC)})
    store.close()
    async with running_gateway(settings, FakeProvider(endpoint=stub_url)) as (_, client):
        text = (await client.get("/metrics")).text
    waiting = {
        s.labels["model"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "llmgw_waiting_requests"
    }
    assert waiting == {"m2", "m4", "m0"}  # used most recently, then the others by name


# -- Prometheus, Grafana provisioning and compose -------------------------------------------


def test_prometheus_scrapes_the_gateway() -> None:
    config = load_yaml(PROMETHEUS)
    jobs = [
        job
        for job in config["scrape_configs"]
        if any("gateway:8000" in static.get("targets", []) for static in job.get("static_configs", []))
    ]
    assert len(jobs) == 1
    assert jobs[0].get("metrics_path") == "/metrics"
    assert jobs[0].get("scrape_interval", config["global"]["scrape_interval"]) == "15s"


def test_dashboard_datasource_is_the_provisioned_one() -> None:
    provisioned = {ds["uid"]: ds for ds in load_yaml(DATASOURCES)["datasources"]}
    assert provisioned["prometheus"]["type"] == "prometheus"
    assert provisioned["prometheus"]["url"] == "http://prometheus:9090"
    # $__rate_interval is derived from this: it must be Prometheus's scrape interval.
    assert provisioned["prometheus"]["jsonData"]["timeInterval"] == "15s"

    dashboard = load_dashboard()
    used = [panel["datasource"] for panel in dashboard["panels"]]
    used += [target["datasource"] for _, target in panel_targets(dashboard)]
    used += [variable["datasource"] for variable in dashboard["templating"]["list"]]
    for datasource in used:
        assert datasource == {"type": "prometheus", "uid": "prometheus"}


def test_compose_mounts_what_the_other_files_expect() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) >= {"gateway", "prometheus", "grafana"}

    def mounts(service: str) -> dict[str, Path]:
        """Container path -> host path of the service's bind mounts (relative to infra/)."""
        found = {}
        for volume in services[service].get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                host = (INFRA / source).resolve()
                assert host.exists(), f"{service}: {source} does not exist"
                found[target] = host
        return found

    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"

    gateway = services["gateway"]
    assert (INFRA / gateway["build"]["context"] / gateway["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert gateway["environment"]["LLMGW_ADMIN_TOKEN"].startswith("${LLMGW_ADMIN_TOKEN:?")
    gateway_mounts = mounts("gateway")
    assert "/etc/llm-gateway/gateway.yaml" in DOCKERFILE.read_text()
    settings = load_settings(gateway_mounts["/etc/llm-gateway/gateway.yaml"])
    assert settings.provider == "skypilot"
    assert settings.admin_token is None, "the admin token comes from the environment, never a file"
    assert str(settings.data_dir) in [v.split(":")[1] for v in gateway["volumes"]]
    assert load_reference(gateway_mounts[str(settings.model_reference)])

    prometheus = services["prometheus"]
    config_flag = next(arg for arg in prometheus["command"] if arg.startswith("--config.file="))
    assert mounts("prometheus")[config_flag.split("=", 1)[1]] == PROMETHEUS.resolve()

    grafana = services["grafana"]
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    grafana_mounts = mounts("grafana")
    assert grafana_mounts["/etc/grafana/provisioning/datasources"] == DATASOURCES.parent.resolve()
    assert grafana_mounts["/etc/grafana/provisioning/dashboards"] == DASHBOARD_PROVIDERS.parent.resolve()
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert grafana_mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()


def test_dockerfile_bakes_in_no_secret_and_runs_unprivileged() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#")]
    instructions = [line for line in lines if line]
    assert instructions[0].startswith("FROM python:3.11-slim")
    assert not any(
        line.split()[0] in {"ENV", "ARG"} and re.search(r"TOKEN|SECRET|PASSWORD", line)
        for line in instructions
    )
    assert any(line.startswith("ENV") and "LLMGW_HOST=0.0.0.0" in line for line in lines)
    assert "EXPOSE 8000" in instructions
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0", "0:0"}
