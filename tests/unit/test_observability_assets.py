"""The Grafana dashboard and the Prometheus alert rules under observability/ match what mtad exports.

Every series a PromQL expression names must be exported by mtad/observe/metrics.py under that exact name
(a counter as NAME_total, a histogram as NAME_bucket/_sum/_count, a gauge as NAME), every label it selects
or groups by must exist on that metric, and promtool must accept the rules, the dashboard's expressions
and the real /metrics output. The promtool tests skip when promtool is missing (the Debian `prometheus`
package; scripts/install-system-deps.sh installs it).

The rule file is read without a YAML library (none is a dependency): a small reader for the layout the
file uses (`- alert:` items with an `expr: |` block and `for:`, `severity:`, `summary:`, `description:`).
promtool checks that the file is valid YAML with valid rules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics import MetricWrapperBase

import mtad.observe.metrics as mtad_metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "observability" / "grafana" / "mtad-dashboard.json"
ALERTS = ROOT / "observability" / "prometheus" / "mtad-alerts.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus; scripts/install-system-deps.sh)"
)

# Series and labels that Prometheus itself provides, not mtad.
PROMETHEUS_SERIES = {"up": {"job", "instance"}}
TARGET_LABELS = {"job", "instance"}  # attached by the scrape to every series

# `promtool check metrics` lint lines accepted on mtad's output, as regexes with the reason. None so far:
# every line promtool prints fails the test.
ACCEPTED_METRIC_LINTS: dict[str, str] = {}

PROMQL_WORDS = {
    # aggregation operators and keywords
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "atan2", "Inf", "NaN", "inf", "nan",
    # functions
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp", "floor", "histogram_quantile",
    "histogram_count", "histogram_sum", "histogram_fraction", "histogram_stddev", "histogram_stdvar",
    "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace", "ln", "log2",
    "log10", "minute", "month", "predict_linear", "rate", "resets", "round", "scalar", "sgn", "sort",
    "sort_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time", "min_over_time",
    "max_over_time", "sum_over_time", "count_over_time", "quantile_over_time", "stddev_over_time",
    "stdvar_over_time", "last_over_time", "present_over_time", "acos", "acosh", "asin", "asinh", "atan",
    "atanh", "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "rad", "pi",
    # Grafana query helpers
    "label_values", "query_result", "metrics", "label_names",
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_INTERVAL = re.compile(r"\$\{?(?:__rate_interval|__interval|__range)\b\}?")
_SELECTOR = re.compile(r'([a-zA-Z_:][\w:]*)?\s*\{((?:[^{}"]|"(?:[^"\\]|\\.)*")*)\}')
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*(?:,|$)')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)")
_LEGEND_LABEL = re.compile(r"\{\{\s*([a-zA-Z_]\w*)\s*\}\}")
_LABEL_VALUES = re.compile(r"label_values\(\s*(.*?)\s*,\s*([a-zA-Z_]\w*)\s*\)$", re.S)


# -- what mtad exports --------------------------------------------------------------------------------

def _series_of(name: str, kind: str) -> set[str]:
    """The sample names prometheus-client exposes for a family of this type."""
    return {
        "counter": {name + "_total", name + "_created"},
        "gauge": {name},
        "histogram": {name + "_bucket", name + "_sum", name + "_count", name + "_created"},
        "summary": {name, name + "_sum", name + "_count", name + "_created"},
        "info": {name + "_info"},
    }.get(kind, {name})


def exported_series() -> set[str]:
    """Every series name in the default registry once mtad.observe.metrics is imported."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names |= _series_of(family.name, family.type)
        names |= {sample.name for sample in family.samples}
    return names


def mtad_metric_objects() -> list[MetricWrapperBase]:
    return [value for value in vars(mtad_metrics).values() if isinstance(value, MetricWrapperBase)]


def labels_by_series() -> dict[str, set[str]]:
    """Series name -> the labels it carries (metric labels, le on buckets, target labels)."""
    out = {name: set(labels) for name, labels in PROMETHEUS_SERIES.items()}
    for metric in mtad_metric_objects():
        family = metric.describe()[0]
        for series in _series_of(family.name, family.type):
            out[series] = set(metric._labelnames) | TARGET_LABELS | ({"le"} if series.endswith("_bucket") else set())
    return out


# -- reading PromQL -----------------------------------------------------------------------------------

class Query:
    """The metric names and labels one PromQL expression uses."""

    def __init__(self, expr: str) -> None:
        self.expr = expr
        self.concrete = _GRAFANA_INTERVAL.sub("5m", expr)  # what Prometheus gets from Grafana
        self.selectors: list[tuple[str | None, list[str]]] = []
        for match in _SELECTOR.finditer(self.concrete):
            body = match.group(2)
            matchers = _MATCHER.findall(body)
            assert _MATCHER.sub("", body).strip() == "", f"unreadable label matchers {{{body}}} in: {expr}"
            self.selectors.append((match.group(1), [label for label, _ in matchers]))
        rest = _SELECTOR.sub(lambda m: (m.group(1) or "") + " ", self.concrete)
        rest = _STRING.sub(" ", rest)
        rest = re.sub(r"\[[^\]]*\]", " ", rest)  # ranges and subqueries
        self.grouping_labels: set[str] = set()
        for _, labels in _GROUPING.findall(rest):
            self.grouping_labels |= {label.strip() for label in labels.split(",") if label.strip()}
        rest = _GROUPING.sub(lambda m: " " + m.group(1) + " ", rest)
        assert "$" not in rest, f"a Grafana variable outside a label matcher or range: {expr}"
        self.metric_names = {name for name in _IDENTIFIER.findall(rest) if name not in PROMQL_WORDS}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(board: dict) -> list[dict]:
    panels = []
    for panel in board["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
    return panels


def dashboard_queries(board: dict) -> list[tuple[str, Query, list[str]]]:
    """(where, query, legend labels) for every panel target."""
    out = []
    for panel in dashboard_panels(board):
        for target in panel.get("targets", []):
            if target.get("expr"):
                legend = _LEGEND_LABEL.findall(target.get("legendFormat", ""))
                out.append((f"panel {panel['title']!r} {target.get('refId')}", Query(target["expr"]), legend))
    return out


def variable_queries(board: dict) -> list[tuple[str, Query, str]]:
    """(where, query of the metric, label) for every label_values() template variable."""
    out = []
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        text = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        match = _LABEL_VALUES.match(text.strip())
        assert match, f"variable {variable['name']}: expected label_values(METRIC, LABEL), got {text!r}"
        out.append((f"variable {variable['name']}", Query(match.group(1)), match.group(2)))
    return out


def read_alert_rules(text: str) -> list[dict]:
    """The alerting rules of the file: name, expr, for, severity, summary, description."""
    rules = []
    for block in re.split(r"^\s*- alert:", text, flags=re.M)[1:]:
        lines = block.splitlines()
        rule = {"alert": lines[0].strip()}
        i = 1
        while i < len(lines):
            match = re.match(r"^(\s*)(expr|for|severity|summary|description):\s*(.*)$", lines[i])
            i += 1
            if not match:
                continue
            indent, key, value = len(match.group(1)), match.group(2), match.group(3).strip()
            if value in ("|", "|-", ">", ">-"):
                body = []
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    body.append(lines[i].strip())
                    i += 1
                value = ("\n" if value.startswith("|") else " ").join(body).strip()
            elif value[:1] in "\"'":
                value = value[1:-1]
            rule[key] = value
        rules.append(rule)
    return rules


def alert_rules() -> list[dict]:
    return read_alert_rules(ALERTS.read_text())


def all_queries() -> list[tuple[str, Query, list[str]]]:
    board = dashboard()
    queries = dashboard_queries(board)
    queries += [(where, query, [label]) for where, query, label in variable_queries(board)]
    queries += [(f"alert {rule['alert']}", Query(rule["expr"]), []) for rule in alert_rules()]
    return queries


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


# -- the reader itself ------------------------------------------------------------------------------

def test_the_expression_reader_finds_metrics_and_labels():
    query = Query(
        'sum by (provider) (rate(mtad_delivery_attempts_total{result="bounced", provider=~"$provider"}'
        "[$__rate_interval])) / ignoring (result) histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m])))"
        " > 0.05 and on () absent(up{job=\"mtad\"}) unless mtad_ready"
    )
    assert query.metric_names == {"mtad_delivery_attempts_total", "x_bucket", "up", "mtad_ready"}
    assert query.selectors == [("mtad_delivery_attempts_total", ["result", "provider"]), ("up", ["job"])]
    assert query.grouping_labels == {"provider", "result", "le"}
    rules = read_alert_rules(
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: |\n          a_total\n"
        "          > 1\n        for: 5m\n        labels:\n          severity: warning\n"
        '        annotations:\n          summary: "s {{ $value }}"\n          description: d\n'
    )
    assert rules == [{"alert": "A", "expr": "a_total\n> 1", "for": "5m", "severity": "warning",
                      "summary": "s {{ $value }}", "description": "d"}]


# -- 1. names -----------------------------------------------------------------------------------------

def test_every_series_in_the_dashboard_and_the_rules_is_exported_by_mtad():
    exported = exported_series() | set(PROMETHEUS_SERIES)
    queries = all_queries()
    assert len(queries) > 40, "the dashboard and rules were not read"
    unknown = [
        f"{where}: {name}" for where, query, _ in queries for name in sorted(query.metric_names) if name not in exported
    ]
    assert not unknown, "series mtad does not export (see mtad/observe/metrics.py):\n" + "\n".join(unknown)
    # and each expression names at least one series: the reader did not lose it
    assert not [where for where, query, _ in queries if not query.metric_names]


def test_dashboard_and_rules_cover_every_mtad_metric_family():
    """Not a requirement of Prometheus: a metric nobody looks at is a metric to remove or to chart."""
    used = {name for _, query, _ in all_queries() for name in query.metric_names}
    unused = [
        metric.describe()[0].name for metric in mtad_metric_objects()
        if not _series_of(metric.describe()[0].name, metric.describe()[0].type) & used
    ]
    assert not unused, f"metrics neither charted nor alerted on: {unused}"


# -- 2. labels ----------------------------------------------------------------------------------------

def test_every_label_used_exists_on_its_metric():
    labels = labels_by_series()
    wrong = []
    for where, query, extra in all_queries():
        for name, used in query.selectors:
            assert name, f"{where}: a selector without a metric name"
            for label in used:
                if label not in labels.get(name, set()):
                    wrong.append(f"{where}: {name} has no label {label!r} (it has {sorted(labels.get(name, ()))})")
        # by (...), on (...), legends and label_values() labels: on some metric of the expression
        available = set().union(*(labels.get(name, set()) for name in query.metric_names))
        for label in sorted(query.grouping_labels | set(extra)):
            if label not in available:
                wrong.append(f"{where}: label {label!r} is on none of {sorted(query.metric_names)}")
    assert not wrong, "\n".join(wrong)


# -- 3. rules -----------------------------------------------------------------------------------------

@needs_promtool
def test_promtool_accepts_the_alert_rules():
    result = run_promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_duration_a_severity_and_annotations():
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "MtadDown", "MtadNotReady", "MtadDatabaseUnreachable", "MtadEventLoopLagging", "MtadQueueAgeHigh",
        "MtadDeliveryStalled", "MtadBounceRateHigh", "MtadComplaintRateHigh", "MtadSiteDead",
    }
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), rule
        assert rule.get("severity") in ("critical", "warning"), rule
        assert rule.get("summary") and rule.get("description"), rule


def _unit_test_rules(tmp_path: Path) -> Path:
    """The alert rules without annotations (promtool's unit tests compare annotations too)."""
    groups = [{"name": "mtad", "rules": [
        {"alert": rule["alert"], "expr": rule["expr"], "for": rule["for"], "labels": {"severity": rule["severity"]}}
        for rule in alert_rules()
    ]}]
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": groups}))  # JSON is YAML
    return path


def _alerts(name: str, at: str, *labels: dict) -> dict:
    return {"alertname": name, "eval_time": at, "exp_alerts": [{"exp_labels": item} for item in labels]}


@needs_promtool
def test_the_alerts_fire_on_the_situations_they_describe(tmp_path):
    rules = _unit_test_rules(tmp_path)
    crit, warn = {"severity": "critical"}, {"severity": "warning"}
    node = {"job": "mtad", "instance": "n1:8025"}
    tests = [
        {   # a node answering, with deliveries flowing: nothing fires
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="mtad", instance="n1:8025"}', "values": "1x60"},
                {"series": 'mtad_ready{job="mtad", instance="n1:8025"}', "values": "1x60"},
                {"series": 'mtad_db_up{job="mtad", instance="n1:8025"}', "values": "1x60"},
                {"series": 'mtad_queue_recipients{job="mtad", instance="n1:8025", state="queued"}', "values": "50x60"},
                {"series": 'mtad_delivery_attempts_total{job="mtad", instance="n1:8025", provider="google",'
                           ' result="delivered"}', "values": "0+100x60"},
                {"series": 'mtad_feedback_complaints_total{job="mtad", instance="n1:8025"}', "values": "0x60"},
            ],
            "alert_rule_test": [_alerts(name, "55m") for name in (
                "MtadDown", "MtadNotReady", "MtadDatabaseUnreachable", "MtadDeliveryStalled",
                "MtadBounceRateHigh", "MtadComplaintRateHigh")],
        },
        {   # down, then gone; the database unreachable; mail waiting but nothing delivered
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="mtad", instance="n1:8025"}', "values": "1 0x5"},
                {"series": 'mtad_db_up{job="mtad", instance="n2:8025"}', "values": "1 0x5"},
                {"series": 'mtad_queue_recipients{job="mtad", instance="n2:8025", state="queued"}', "values": "7x40"},
                {"series": 'mtad_queue_recipients{job="mtad", instance="n3:8025", state="queued"}', "values": "7x40"},
                {"series": 'mtad_delivery_attempts_total{job="mtad", instance="n2:8025", provider="google",'
                           ' result="deferred"}', "values": "0+10x40"},
            ],
            "alert_rule_test": [
                _alerts("MtadDown", "2m"),
                _alerts("MtadDown", "4m", {**node, **crit}),
                _alerts("MtadDown", "15m", {"job": "mtad", **crit}),  # the series went stale: absent()
                _alerts("MtadDatabaseUnreachable", "4m", {"job": "mtad", "instance": "n2:8025", **crit}),
                _alerts("MtadDeliveryStalled", "3m"),
                _alerts("MtadDeliveryStalled", "10m", crit),  # the same 7 recipients, not 14
            ],
        },
        {   # 10 % bounces at google, 1 % at yahoo; complaints at 0.2 % of deliveries
            "interval": "1m",
            "input_series": [
                {"series": 'mtad_delivery_attempts_total{job="mtad", instance="n1:8025", provider="google",'
                           ' result="delivered"}', "values": "0+90x60"},
                {"series": 'mtad_delivery_attempts_total{job="mtad", instance="n1:8025", provider="google",'
                           ' result="bounced"}', "values": "0+10x60"},
                {"series": 'mtad_delivery_attempts_total{job="mtad", instance="n1:8025", provider="yahoo",'
                           ' result="delivered"}', "values": "0+99x60"},
                {"series": 'mtad_delivery_attempts_total{job="mtad", instance="n1:8025", provider="yahoo",'
                           ' result="bounced"}', "values": "0+1x60"},
                {"series": 'mtad_feedback_complaints_total{job="mtad", instance="n1:8025"}', "values": "0+0.4x60"},
            ],
            "alert_rule_test": [
                _alerts("MtadBounceRateHigh", "45m", {"provider": "google", **warn}),
                _alerts("MtadComplaintRateHigh", "45m", warn),
            ],
        },
        {   # a configured provider's site dead for 10 minutes; dead sites under "other" do not count
            "interval": "1m",
            "input_series": [
                {"series": 'mtad_delivery_site_backoff_state{job="mtad", instance="n1:8025", provider="yahoo",'
                           ' site="yahoo", state="dead"}', "values": "1x20"},
                {"series": 'mtad_delivery_site_backoff_state{job="mtad", instance="n1:8025", provider="other",'
                           ' site="other", state="dead"}', "values": "3x20"},
                {"series": 'mtad_queue_oldest_pending_age_seconds{job="mtad", instance="n1:8025"}',
                 "values": "3000+60x30"},
                {"series": 'mtad_process_event_loop_lag_seconds{job="mtad", instance="n1:8025"}', "values": "0.8x10"},
            ],
            "alert_rule_test": [
                _alerts("MtadSiteDead", "5m"),
                _alerts("MtadSiteDead", "12m", {"provider": "yahoo", "site": "yahoo", **warn}),
                _alerts("MtadQueueAgeHigh", "20m"),
                _alerts("MtadQueueAgeHigh", "27m", {"job": "mtad", **warn}),  # above 1 h from 11m on
                _alerts("MtadEventLoopLagging", "6m", {**node, **warn}),
            ],
        },
    ]
    spec = tmp_path / "rules_test.yml"
    spec.write_text(json.dumps({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}))
    result = run_promtool("test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


# -- 4. the real /metrics output ------------------------------------------------------------------------

SAMPLE_LABEL_VALUES = {
    "tenant": "demo", "result": "accepted", "source": "smtp", "category": "mailbox_full", "provider": "google",
    "kind": "connect", "tls": "TLSv1.3", "site": "google", "state": "queued", "method": "one_click",
    "node": "mx1:4242:a1b2c3", "worker": "0",
}


@needs_promtool
def test_promtool_accepts_the_metrics_mtad_serves():
    touched = []
    try:
        for metric in mtad_metric_objects():
            names = metric._labelnames
            if not names:
                continue
            missing = [name for name in names if name not in SAMPLE_LABEL_VALUES]
            assert not missing, f"add a sample value for label(s) {missing} to SAMPLE_LABEL_VALUES"
            values = {name: SAMPLE_LABEL_VALUES[name] for name in names}
            existed = any(sample.labels.items() >= values.items() for sample in metric.collect()[0].samples)
            metric.labels(**values)
            if not existed:
                touched.append((metric, [values[name] for name in names]))
        text = generate_latest(REGISTRY).decode()
    finally:
        for metric, values in touched:  # leave the registry as other tests in this process expect it
            metric.remove(*values)
    for metric in mtad_metric_objects():
        assert metric.describe()[0].name in text
    result = run_promtool("check", "metrics", stdin=text)
    problems = [
        line for line in (result.stdout + result.stderr).splitlines()
        if line.strip() and not any(re.search(pattern, line) for pattern in ACCEPTED_METRIC_LINTS)
    ]
    assert not problems, "promtool check metrics:\n" + "\n".join(problems)
    assert result.returncode == 0 or (result.stdout + result.stderr).strip(), "promtool failed without saying why"


# -- 5. the dashboard ---------------------------------------------------------------------------------

def test_the_dashboard_is_valid_and_every_panel_has_a_title_and_a_query():
    board = dashboard()
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    assert [item["name"] for item in board["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"  # lets a provisioned copy (no __inputs) resolve
    assert "label_values(mtad_delivery_attempts_total, provider)" in json.dumps(variables["provider"]["query"])
    panels = dashboard_panels(board)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    titles = [panel.get("title", "").strip() for panel in panels]
    assert all(titles), "a panel without a title"
    graphs = [panel for panel in panels if panel["type"] != "row"]  # rows only group panels
    assert len(graphs) >= 20
    for panel in graphs:
        exprs = [target.get("expr", "").strip() for target in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert all(target["datasource"]["uid"] == "${DS_PROMETHEUS}" for target in panel["targets"]), panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    assert len(titles) == len(set(titles)), "panel titles repeat"


@needs_promtool
def test_promtool_parses_every_dashboard_expression(tmp_path):
    """Loaded as recording rules, the dashboard's queries go through Prometheus's own PromQL parser."""
    board = dashboard()
    exprs = [query.concrete for _, query, _ in dashboard_queries(board)]
    exprs += [query.concrete for _, query, _ in variable_queries(board)]
    rules = [{"record": f"mtad_dashboard:query_{n}", "expr": expr} for n, expr in enumerate(exprs)]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
