"""The monitoring kit (monitoring/): alert rules, their PrometheusRule, the scrape job and the Grafana dashboard,
checked with the real tools and against what a running sidecar really exports.

- The rules pass `promtool check rules`, and `promtool test rules monitoring/alerts_test.yaml` shows every
  alert firing and not firing; alerts.yaml is rules.yaml wrapped in a PrometheusRule, text for text.
- Every series the rules and the dashboard read is in a real scrape of sidecar.py (started against the
  vLLM-like test server with adapters loaded, failed, skipped and absent), and every adapter state the rules
  name is one the sidecar reports.
- The dashboard is Grafana import JSON: schema fields, panels with targets, the namespace/pod/adapter
  variables; its queries parse (promtool) and, in the end-to-end test, evaluate on a real Prometheus.
- End to end: a real Prometheus server on loopback scrapes two sidecars through the shipped scrape job's
  relabeling, evaluates the shipped rules (their `for:` cut to seconds), and its HTTP API shows
  LoRAAdapterFailing going pending then firing when an adapter's source does not exist, and resolving when
  the ConfigMap is fixed the kubelet's way; likewise the replicas-disagree, not-in-sync and sidecar-down alerts.

prometheus and promtool come from Debian's `prometheus` package (monitoring/install-prometheus.sh). When
one is missing these tests skip with the reason; with CI=true they fail: CI never counts a skip as a pass.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from fake_vllm import FakeVLLM, make_adapter
from kubelet import KubeletConfigDir
from sidecar_process import Metrics, Sidecar, free_port, lora_config, wait_until

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
RULES = MONITORING / "rules.yaml"
MANIFEST = MONITORING / "alerts.yaml"
RULE_TESTS = MONITORING / "alerts_test.yaml"
SCRAPE_CONFIG = MONITORING / "scrape-config.yaml"
DASHBOARD = MONITORING / "dashboard.json"

CI = os.environ.get("CI", "").lower() == "true"

# Every alert, by name: (needs a pod in its description, needs an adapter there).
ALERTS = {
    "LoRAAdapterFailing": (True, True),
    "LoRAAdapterReplicasDisagree": (True, True),
    "LoRASidecarNotInSync": (True, False),  # names the adapters through a query in its description
    "LoRASidecarConfigInvalid": (True, False),
    "LoRASidecarVLLMDown": (True, False),
    "LoRASidecarDown": (True, False),
    "LoRASidecarTargetMissing": (False, False),  # no target at all: no pod to name
}
# The states sidecar.py reports (State).
KNOWN_STATES = {"loaded", "pending", "failed", "absent", "skipped", "inert"}
# Series Prometheus makes itself rather than scraping them; the rules may read these too.
SYNTHETIC_SERIES = {"up"}
# Grafana's own variables; the dashboard defines the others in templating.
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}

E2E_FOR = "3s"  # every rule's `for:` in the end-to-end copy
E2E_INTERVAL = "500ms"  # scrape and evaluation interval there


# ------------------------------------------------------------------ tools


def tool(name: str) -> str:
    """The path of `name` (PATH, else /usr/bin). Missing: skip with the reason, or fail when CI=true."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
    if path:
        return path
    why = (f"{name} not found on PATH or at /usr/bin/{name}: install Debian's prometheus package "
           "(bash monitoring/install-prometheus.sh, or apt-get install -y prometheus)")
    if CI:
        pytest.fail(f"CI=true and {why}", pytrace=False)
    pytest.skip(why)


def promtool(*args: str | os.PathLike[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60,
                          cwd=cwd, check=False)


# ------------------------------------------------------------------ PromQL, roughly


PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords, labels or label values)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        if text[match.end():].lstrip().startswith("("):
            continue  # a function
        if match.group().lower() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


def label_values_selector(query: str) -> tuple[str, str]:
    """Grafana's label_values(SELECTOR, LABEL) variable query, split."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.S)
    assert match, f"not a label_values(selector, label) query: {query!r}"
    return match.group(1), match.group(2)


def state_values(expr: str) -> set[str]:
    """Every state a `state=...`, `state=~...` or `state!~...` matcher names."""
    found: set[str] = set()
    for value in re.findall(r'\bstate\s*(?:=~|!~|!=|=)\s*"([^"]*)"', expr):
        found.update(value.split("|"))
    return found


# ------------------------------------------------------------------ the files


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(RULES)["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [(f"panel {p['id']} {p['title']!r} target {t['refId']}", t["expr"])
            for p in panels(dash) for t in p.get("targets", [])]


def variable_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, label_values query) of every query variable."""
    out = []
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((var["name"], query))
    return out


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's variables replaced: ${name} and $name."""
    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"no value for ${name} in {expr!r}"
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


# ------------------------------------------------------------------ a real scrape


@pytest.fixture(scope="module")
def scrape(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Metrics]:
    """/metrics of a running sidecar whose adapters are loaded, failed, skipped and absent, after loads
    and reconcile cycles (so every histogram and counter has its series)."""
    tmp = tmp_path_factory.mktemp("scrape")
    fake = FakeVLLM(port=0).start()
    sidecar = None
    try:
        config = KubeletConfigDir(tmp / "config")
        config.write(lora_config(fake.port, [
            {"id": "good", "source": str(make_adapter(tmp / "adapters" / "good"))},
            {"id": "broken", "source": str(tmp / "no-such-adapter")},
            {"id": "foreign", "source": str(tmp / "whatever"), "base-model": "another-base-model"},
        ], {"gone": str(tmp / "gone")}))
        sidecar = Sidecar(["--config", config.path]).start()
        states = {"good": "loaded", "broken": "failed", "foreign": "skipped", "gone": "absent"}
        sidecar.wait_for(lambda: all(sidecar.metrics().state_of(a) == s for a, s in states.items()), 10,
                         f"adapter states {states}")
        sidecar.wait_for(lambda: sidecar.metrics().total("lora_sidecar_reconcile_total") >= 2, 10, "two cycles")
        yield sidecar.metrics()
    finally:
        if sidecar is not None:
            sidecar.close()
        fake.stop()


def exported_names(metrics: Metrics) -> set[str]:
    """Sample names as Prometheus stores them (with _total, _bucket, _sum, _count)."""
    return {name for name, _, _ in metrics.samples}


# ===================================================================== the rules


def test_promtool_check_rules_passes():
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout, result.stdout


def test_promtool_unit_tests_pass():
    result = promtool("test", "rules", RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_unit_tests_show_every_alert_firing_and_not_firing():
    cases: dict[str, set[bool]] = {}
    tests = load_yaml(RULE_TESTS)
    assert tests["rule_files"] == ["rules.yaml"]
    for group in tests["tests"]:
        for case in group.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    missing = {name: {True, False} - cases.get(name, set()) for name in ALERTS}
    assert not {name: how for name, how in missing.items() if how}, f"alerts without a firing (True) or a " \
                                                                      f"not-firing (False) case: {missing}"


def test_rules_are_the_documented_alerts():
    by_name = {rule["alert"]: rule for rule in rules()}
    assert set(by_name) == set(ALERTS)
    for name, (names_pod, names_adapter) in ALERTS.items():
        rule = by_name[name]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{name}: no for:"
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        assert summary and description, name
        if names_pod:
            assert "$labels.pod" in description and "$labels.namespace" in description, name
        if names_adapter:
            assert "$labels.adapter" in description, name
    assert by_name["LoRAAdapterFailing"]["for"] == "15m"
    assert by_name["LoRASidecarNotInSync"]["for"] == "15m"
    assert {"failed", "inert"} <= state_values(by_name["LoRAAdapterFailing"]["expr"])


def test_alerts_manifest_is_the_rules_file_in_a_prometheusrule():
    result = subprocess.run([sys.executable, MONITORING / "build.py", "--check"], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    manifest = load_yaml(MANIFEST)
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1"
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["metadata"]["name"] == "lora-sidecar"
    assert manifest["spec"] == load_yaml(RULES)


def test_rules_read_only_series_and_states_the_sidecar_exports(scrape):
    exported = exported_names(scrape) | SYNTHETIC_SERIES
    reported_states = scrape.label_values("lora_sidecar_adapter_state", "state")
    assert reported_states | {"inert"} == KNOWN_STATES, "the sidecar's states changed: review the rules"
    for rule in rules():
        used = promql_metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']} reads series the sidecar does not export: {used - exported}"
        assert state_values(rule["expr"]) <= KNOWN_STATES, rule["alert"]
        for template in re.findall(r'printf "((?:[^"\\]|\\.)*)"', rule["annotations"]["description"]):
            query = template.replace('\\"', '"')  # a query inside a template reads the same series
            assert promql_metric_names(query) <= exported, f"{rule['alert']}: {query}"


def test_metric_name_extraction_on_known_expressions():
    assert promql_metric_names('up{job=~"(.+/)?lora-sidecar"} == 0') == {"up"}
    assert promql_metric_names(
        '(a_b{state=~"x|y"} == 1) * on (namespace, adapter) group_left () count by (namespace, adapter) (c{s="d"})'
    ) == {"a_b", "c"}
    assert promql_metric_names(
        'histogram_quantile(0.9, sum by (le) (rate(h_bucket{pod=~"$pod"}[$__rate_interval]))) or vector(0)'
    ) == {"h_bucket"}
    assert promql_metric_names("time() - x_seconds * 1000 > bool 5") == {"x_seconds"}


def test_scrape_config_is_valid_prometheus_config(tmp_path):
    """The shipped scrape job, as promtool sees it. Debian builds Prometheus without Kubernetes service
    discovery, so the copy checked here finds its one target statically; everything else (the relabeling, the
    rule file) is the shipped text. The end-to-end test runs the same relabeling."""
    config = load_yaml(SCRAPE_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"lora-sidecar"}
    assert jobs["lora-sidecar"]["kubernetes_sd_configs"] == [{"role": "pod"}]
    checked = copy.deepcopy(config)
    del checked["scrape_configs"][0]["kubernetes_sd_configs"]
    checked["scrape_configs"][0]["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(checked), encoding="utf-8")
    shutil.copy(RULES, tmp_path / "rules.yaml")
    result = promtool("check", "config", tmp_path / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout, result.stdout


# ===================================================================== the dashboard


def test_dashboard_is_grafana_import_json():
    dash = dashboard()
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time", "version"):
        assert key in dash, f"dashboard.json has no {key}"
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    assert "id" not in dash or dash["id"] is None, "an id ties the import to one Grafana; leave it out"

    variables = {var["name"]: var for var in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pod", "adapter"):
        assert variables[name]["type"] == "query", name
        assert variables[name]["includeAll"] and variables[name]["multi"], name
    assert label_values_selector(variables["namespace"]["query"]["query"])[1] == "namespace"
    assert label_values_selector(variables["pod"]["query"]["query"])[1] == "pod"
    assert label_values_selector(variables["adapter"]["query"]["query"])[1] == "adapter"

    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels(dash) if p["type"] != "row"]
    for wanted in ("Adapters per state per pod", "Replicas that disagree", "Loads, reloads and unloads by result",
                   "Failed operations by pod", "Load, reload and unload latency", "Reconcile cycle duration",
                   "Config valid", "Config last change"):
        assert wanted in titles, f"no panel {wanted!r}"
    for panel in panels(dash):
        pos = panel["gridPos"]
        assert pos["w"] >= 1 and pos["h"] >= 1 and pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        targets = panel.get("targets")
        assert targets, f"panel {panel['title']!r} has no targets"
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["expr"].strip(), panel["title"]
            used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
            assert used <= set(variables) | GRAFANA_VARIABLES, f"{panel['title']}: undefined {used}"
            assert 'namespace=~"$namespace"' in target["expr"], f"{panel['title']}: ignores $namespace"


def test_dashboard_reads_only_series_the_sidecar_exports(scrape):
    exported = exported_names(scrape)
    dash = dashboard()
    queries = dashboard_queries(dash) + [(f"variable {name}", label_values_selector(q)[0])
                                         for name, q in variable_queries(dash)]
    read = set()
    for where, expr in queries:
        used = promql_metric_names(expr)
        assert used, f"{where}: no series in {expr!r}"
        assert used <= exported, f"{where} reads series the sidecar does not export: {used - exported}"
        assert state_values(expr) <= KNOWN_STATES, where
        read |= used
    # Every family the sidecar reports has a place on the dashboard (the legacy lora_syncer_ one excepted).
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in exported if n.startswith("lora_sidecar_")}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in read}
    assert families <= shown, f"not on the dashboard: {families - shown}"


def test_dashboard_queries_parse(tmp_path):
    """promtool parses each query (variables filled in) as a recording rule: Prometheus' own parser."""
    values = {"namespace": "llm", "pod": ".*", "adapter": ".*", "datasource": "x", "__rate_interval": "1m",
              "__interval": "15s", "__range": "1h"}
    dash = dashboard()
    recorded = [{"record": f"dashboard:query_{i}", "expr": substitute(expr, values)}
                for i, (_, expr) in enumerate(dashboard_queries(dash))]
    recorded += [{"record": f"dashboard:variable_{name}", "expr": substitute(label_values_selector(q)[0], values)}
                 for name, q in variable_queries(dash)]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": recorded}]}), encoding="utf-8")
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


# ===================================================================== end to end


class Prometheus:
    """A real Prometheus server on 127.0.0.1:<free port>, its data and log in `folder`."""

    def __init__(self, binary: str, folder: Path, config: dict[str, Any]) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        self.log_path = folder / "prometheus.log"
        self.argv = [binary, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=info"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()

    def start(self, timeout: float = 30.0) -> Prometheus:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.folder)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}")
            return self.http.get(self.url + "/-/ready", timeout=2).status_code == 200

        try:
            wait_until(ready, timeout, 0.1, message=lambda: f"prometheus ready on {self.url}\n{self.log()}")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.http.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def api(self, path: str, **params: Any) -> Any:
        response = self.http.get(f"{self.url}/api/v1/{path}", params=params, timeout=5)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]

    def alerts(self, name: str, **labels: str) -> list[dict[str, Any]]:
        """Active alerts (pending or firing) called `name` whose labels include `labels`."""
        return [a for a in self.api("alerts")["alerts"]
                if a["labels"]["alertname"] == name and all(a["labels"].get(k) == v for k, v in labels.items())]

    def wait_alert(self, name: str, state: str, timeout: float = 20.0, **labels: str) -> dict[str, Any]:
        """Until the alert is in `state` (pending or firing); returns it."""
        found = wait_until(lambda: [a for a in self.alerts(name, **labels) if a["state"] == state], timeout, 0.05,
                           message=lambda: f"{name}{labels} {state}; alerts: {self.api('alerts')['alerts']}")
        assert len(found) == 1, found
        return found[0]

    def wait_resolved(self, name: str, timeout: float = 20.0, **labels: str) -> None:
        wait_until(lambda: not self.alerts(name, **labels), timeout, 0.05,
                   message=lambda: f"{name}{labels} resolved; alerts: {self.api('alerts')['alerts']}")

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]


def e2e_prometheus_config(targets: dict[str, int], rule_file: str) -> dict[str, Any]:
    """The shipped scrape job with static targets instead of Kubernetes discovery: each target carries the
    meta labels pod discovery would give the sidecar's container in namespace e2e, so the shipped relabeling
    is what turns them into the namespace and pod labels the rules and the dashboard use."""
    config = load_yaml(SCRAPE_CONFIG)
    job = config["scrape_configs"][0]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [
        {"targets": [f"127.0.0.1:{port}"],
         "labels": {"__meta_kubernetes_namespace": "e2e", "__meta_kubernetes_pod_name": pod,
                    "__meta_kubernetes_pod_container_name": "lora-sidecar",
                    "__meta_kubernetes_pod_container_port_name": "metrics", "__meta_kubernetes_pod_phase": "Running"}}
        for pod, port in targets.items()
    ]
    # A decoy: vLLM's own port in the same pod, which the job must not keep.
    job["static_configs"].append(
        {"targets": ["127.0.0.1:9"], "labels": {"__meta_kubernetes_namespace": "e2e",
                                                "__meta_kubernetes_pod_name": "vllm-0",
                                                "__meta_kubernetes_pod_container_name": "vllm",
                                                "__meta_kubernetes_pod_container_port_name": "http"}})
    job["scrape_interval"] = E2E_INTERVAL
    job["scrape_timeout"] = "400ms"
    config["global"] = {"scrape_interval": E2E_INTERVAL, "evaluation_interval": E2E_INTERVAL}
    config["rule_files"] = [rule_file]
    return config


def fast_rules(folder: Path) -> str:
    """rules.yaml with every `for:` cut to E2E_FOR (the expressions and texts as shipped)."""
    text = load_yaml(RULES)
    for group in text["groups"]:
        for rule in group["rules"]:
            rule["for"] = E2E_FOR
    path = folder / "rules-fast.yaml"
    path.write_text(yaml.safe_dump(text, sort_keys=False), encoding="utf-8")
    return str(path)


@pytest.mark.slow
def test_real_prometheus_fires_and_resolves_the_alerts(tmp_path, adapter_paths, start_sidecar):
    """Two sidecars (pods vllm-0 and vllm-1 of namespace e2e), each beside its own vLLM-like server, scraped
    by a real Prometheus. vllm-0 is given an adapter whose source does not exist while vllm-1 loads it."""
    binary = tool("prometheus")
    paths = adapter_paths(["good", "extra"])
    missing = str(tmp_path / "no-such-adapter")
    fakes = [FakeVLLM(port=0).start(), FakeVLLM(port=0).start()]
    prometheus: Prometheus | None = None
    try:
        configs = [KubeletConfigDir(tmp_path / f"config-{i}") for i in range(2)]

        def publish(pod: int, extra_source: str | None) -> None:
            adapters = {"good": paths["good"], **({"extra": extra_source} if extra_source else {})}
            configs[pod].write(lora_config(fakes[pod].port, adapters))

        publish(0, None)
        publish(1, None)
        sidecars = [start_sidecar(["--config", configs[i].path]) for i in range(2)]
        for sidecar in sidecars:
            sidecar.wait_ready()

        started = time.monotonic()
        prometheus = Prometheus(binary, tmp_path / "prometheus",
                                e2e_prometheus_config({"vllm-0": sidecars[0].metrics_port,
                                                       "vllm-1": sidecars[1].metrics_port},
                                                      fast_rules(tmp_path))).start()
        prom = prometheus

        # Both sidecars scraped through the shipped relabeling (the decoy port dropped), every rule healthy.
        def targets_up() -> bool:
            active = prom.api("targets")["activeTargets"]
            return sorted((t["labels"].get("namespace"), t["labels"].get("pod"), t["health"]) for t in active) == [
                ("e2e", "vllm-0", "up"), ("e2e", "vllm-1", "up")]
        wait_until(targets_up, 20, 0.1,
                   message=lambda: f"both targets up: {prom.api('targets')}\nprometheus log:\n{prom.log()}")
        wait_until(lambda: prom.api("query", query="lora_sidecar_in_sync")["result"], 10, 0.1)
        wait_until(lambda: len(prom.rules()) == len(ALERTS) and all(r.get("lastEvaluation", "").startswith("2")
                                                                     and r["health"] == "ok" for r in prom.rules()),
                   10, 0.1, message=lambda: f"every rule evaluated, health ok: {prom.rules()}")
        assert not prom.alerts("LoRAAdapterFailing") and not prom.alerts("LoRAAdapterReplicasDisagree")
        print(f"prometheus up, both targets scraped, rules ok after {time.monotonic() - started:.1f} s")

        # vllm-0 is told to load "extra" from a path that does not exist; vllm-1 loads it from a real one.
        failed_at = time.monotonic()
        publish(0, missing)
        publish(1, paths["extra"])
        sidecars[0].wait_for(lambda: sidecars[0].metrics().state_of("extra") == "failed", 10, "extra failed")
        pending = prom.wait_alert("LoRAAdapterFailing", "pending", pod="vllm-0", adapter="extra")
        pending_after = time.monotonic() - failed_at
        firing = prom.wait_alert("LoRAAdapterFailing", "firing", pod="vllm-0", adapter="extra")
        print(f"LoRAAdapterFailing pending {pending_after:.1f} s after the bad config, firing after "
              f"{time.monotonic() - failed_at:.1f} s (for: {E2E_FOR})")
        assert pending["activeAt"] == firing["activeAt"]
        assert firing["labels"] | {"instance": ""} == {
            "alertname": "LoRAAdapterFailing", "severity": "warning", "namespace": "e2e", "pod": "vllm-0",
            "container": "lora-sidecar", "job": "lora-sidecar", "instance": "", "adapter": "extra", "state": "failed"}
        assert firing["annotations"]["summary"] == "LoRA adapter extra is failed on pod e2e/vllm-0."
        assert "pod vllm-0 (namespace e2e)" in firing["annotations"]["description"]
        assert 'adapters["extra"].last_error' in firing["annotations"]["description"]

        disagree = prom.wait_alert("LoRAAdapterReplicasDisagree", "firing", pod="vllm-0", adapter="extra")
        assert disagree["labels"]["state"] == "failed" and float(disagree["value"]) == 1  # loaded on vllm-1
        assert "loaded on 1 replica(s) in namespace e2e" in disagree["annotations"]["description"]
        not_in_sync = prom.wait_alert("LoRASidecarNotInSync", "firing", pod="vllm-0")
        assert "Adapters not where the config wants them: extra (failed)." in \
            not_in_sync["annotations"]["description"]
        # Nothing about the healthy pod, the healthy adapter, or vLLM.
        for name in ("LoRAAdapterFailing", "LoRAAdapterReplicasDisagree", "LoRASidecarNotInSync"):
            assert not prom.alerts(name, pod="vllm-1"), name
        assert not prom.alerts("LoRAAdapterFailing", adapter="good")
        for name in ("LoRASidecarVLLMDown", "LoRASidecarConfigInvalid", "LoRASidecarDown"):
            assert not prom.alerts(name), name

        # Every dashboard query evaluates on this Prometheus, over series carrying the namespace and pod labels.
        values = {"namespace": "e2e", "pod": ".*", "adapter": ".*", "__rate_interval": "5s"}
        dash = dashboard()
        for where, expr in dashboard_queries(dash):
            prom.api("query", query=substitute(expr, values))  # asserts status success
            for name in promql_metric_names(expr):
                assert prom.api("series", **{"match[]": f'{name}{{namespace="e2e",pod=~"vllm-.*"}}'}), \
                    f"{where}: no {name} series with namespace and pod"
        for name, query in variable_queries(dash):
            selector, label = label_values_selector(query)
            found = prom.api(f"label/{label}/values", **{"match[]": substitute(selector, values)})
            assert found, f"variable {name}: no values"
        pods = prom.api("label/pod/values", **{"match[]": "lora_sidecar_config_valid"})
        assert {"vllm-0", "vllm-1"} <= set(pods)

        # The ConfigMap is fixed, the kubelet's way: the adapter loads and every alert about it resolves.
        fixed_at = time.monotonic()
        publish(0, paths["extra"])
        sidecars[0].wait_for(lambda: sidecars[0].metrics().state_of("extra") == "loaded", 10, "extra loaded")
        for name in ("LoRAAdapterFailing", "LoRAAdapterReplicasDisagree", "LoRASidecarNotInSync"):
            prom.wait_resolved(name, pod="vllm-0")
        print(f"resolved {time.monotonic() - fixed_at:.1f} s after the fix")
        rule = next(r for r in prom.rules() if r["name"] == "LoRAAdapterFailing")
        assert rule["state"] == "inactive" and rule["health"] == "ok", rule

        # A sidecar that stops answering its scrape: LoRASidecarDown names its pod.
        sidecars[0].stop()
        down = prom.wait_alert("LoRASidecarDown", "firing", pod="vllm-0")
        assert down["labels"]["job"] == "lora-sidecar"
        assert "Scraping 127.0.0.1:" in down["annotations"]["description"]
        assert not prom.alerts("LoRASidecarDown", pod="vllm-1")
        assert all(r["health"] == "ok" for r in prom.rules()), prom.rules()
        print(f"whole run {time.monotonic() - started:.1f} s")
    finally:
        if prometheus is not None:
            code = prometheus.stop()
            print(f"--- prometheus exited {code}; log:\n{prometheus.log()[-4000:]}")
        for fake in fakes:
            fake.stop()
