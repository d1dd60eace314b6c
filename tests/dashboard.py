"""The metric names a Grafana dashboard queries, so tests can hold them against what the code exports.

A histogram is queried through its ``_bucket``/``_sum``/``_count`` series; those map back to the
base name prometheus-client registers, so one set compares with the documented names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# PromQL words that look like identifiers but are not metric names (functions are recognised by
# the "(" that follows them; aggregation modifiers' label lists are removed before this applies).
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
# Grafana's label_values(metric, label): the second argument is a label name.
_LABEL_VALUES = re.compile(r"\blabel_values\s*\(([^,()]*(?:\{[^}]*\})?)\s*,\s*\w+\s*\)")
_DURATION = re.compile(r"(?<![\w:.])(?:\d+(?:ms|[smhdwy]))+(?![\w:])")
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
_IDENT = re.compile(r"(?<![\w:.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def base_name(series: str) -> str:
    """The metric a series belongs to: a histogram's ``_bucket``/``_sum``/``_count`` series map to it.

    >>> base_name("streamrec_block_seconds_bucket"), base_name("streamrec_events_processed_total")
    ('streamrec_block_seconds', 'streamrec_events_processed_total')
    """
    for suffix in HISTOGRAM_SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def promql_metrics(expr: str) -> set[str]:
    """Base metric names one PromQL expression selects (not functions, keywords, labels or variables).

    >>> sorted(promql_metrics(
    ...     'histogram_quantile(0.99, sum by (stage, le) (rate(streamrec_block_seconds_bucket{stage="user"}'
    ...     '[$__rate_interval]))) / on (stage) group_left sum(streamrec_up offset 1h30m) > bool 1e3'))
    ['streamrec_block_seconds', 'streamrec_up']
    >>> promql_metrics('label_values(streamrec_consumer_lag{stage="user"}, partition)')
    {'streamrec_consumer_lag'}
    """
    text = _STRING.sub(" ", expr)
    text = _VARIABLE.sub(" ", text)
    text = _LABEL_VALUES.sub(r"(\1)", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _DURATION.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(base_name(name))
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_exprs(path: str | Path) -> list[str]:
    """Every PromQL expression of a dashboard JSON: panel targets and query variables."""
    dash = json.loads(Path(path).read_text())
    exprs = [t["expr"] for p in _panels(dash.get("panels", [])) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if var.get("type") == "query" and query:
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def dashboard_metrics(path: str | Path) -> set[str]:
    """Every base metric name the dashboard at ``path`` queries."""
    names: set[str] = set()
    for expr in dashboard_exprs(path):
        names |= promql_metrics(expr)
    return names
