"""Settings mistakes told in the user's own terms.

pydantic reports a bad value as a field path and a paragraph per error; the user wrote an
environment variable or a key in a TOML file. ``explain`` turns a failed ``Settings()`` into one
or two lines that name what the user wrote (``STREAMREC_BATCH_SIZE``, or ``batch_size`` in
``s.toml``), the value given, what is expected and an example. ``unknown_variables`` catches the
typo pydantic-settings cannot see: a ``STREAMREC_*`` variable that matches no setting is ignored
by it, silently.

The valid names come from ``Settings.model_fields`` at run time, so a new setting needs no
change here.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from stream_app.config import URL_FIELDS, Settings, mask_url

PREFIX = "STREAMREC_"
# STREAMREC_* variables that are no setting but are read elsewhere: the settings file, and the
# Redis the integration tests use (tests/integration/conftest.py).
NOT_SETTINGS = frozenset({"STREAMREC_CONFIG", "STREAMREC_TEST_REDIS_URL"})
# Examples where the default makes a poor one.
EXAMPLES: dict[str, str] = {"event_types": '{"view": 1, "click": 3}'}
# Kubernetes sets <SERVICE>_SERVICE_HOST, <SERVICE>_PORT=tcp://..., <SERVICE>_PORT_80_TCP... for
# every Service in the namespace: a Service named streamrec-... would otherwise draw warnings.
_SERVICE_LINK = re.compile(r"_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)$")
_SECRET_NAME = re.compile(r"password|secret|token", re.IGNORECASE)
_NOUNS: dict[Any, str] = {float: "numbers", int: "integers", str: "strings", bool: "true/false values"}


def env_name(field: str) -> str:
    return PREFIX + field.upper()


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """One warning for each ``STREAMREC_*`` variable that is no setting, with the closest name."""
    env = os.environ if env is None else env
    valid = sorted(env_name(f) for f in Settings.model_fields)
    known = set(valid) | NOT_SETTINGS
    out = []
    for name in sorted(env):
        up = name.upper()  # pydantic-settings matches names case-insensitively
        if not up.startswith(PREFIX) or up in known or _service_link(up, env[name]):
            continue
        # compared without the prefix, which every name shares
        close = difflib.get_close_matches(up[len(PREFIX) :], [v[len(PREFIX) :] for v in valid], n=1, cutoff=0.6)
        hint = f"did you mean {PREFIX}{close[0]}?" if close else "ignored; streamrec.example.toml lists every setting"
        out.append(f"unknown setting {name} ({hint})")
    return out


def _service_link(name: str, value: str) -> bool:
    return bool(_SERVICE_LINK.search(name)) or (name.endswith("_PORT") and value.startswith(("tcp://", "udp://")))


def explain(exc: BaseException, env: Mapping[str, str] | None = None) -> str | None:
    """One or two lines for a failed ``Settings()``; None if ``exc`` is not about the settings."""
    env = os.environ if env is None else env
    src = _Sources(env)
    if isinstance(exc, SettingsError):  # a JSON value that does not parse
        m = re.search(r'field "(\w+)"', str(exc))
        if m is None or m.group(1) not in Settings.model_fields:
            return None
        return src.line(m.group(1), _expected(m.group(1), "json"))
    if not isinstance(exc, ValidationError) or exc.title != Settings.__name__:
        return None
    lines, names = [], []
    for err in exc.errors():
        loc = err["loc"]
        field = str(loc[0]) if loc else ""
        if err["type"] == "extra_forbidden":
            line, name = src.unknown(field), src.name(field)
        elif field not in Settings.model_fields:  # a check across settings: its message names them
            line, name = _validator_text(err), "settings"
        else:
            line, name = src.line(field, _expected(field, err)), src.name(field)
        if line not in lines:
            lines.append(line)
            names.append(name)
    if len(lines) > 1:
        return f"{lines[0]}\nalso invalid: {', '.join(names[1:])}"
    return lines[0] if lines else None


class _Sources:
    """Where a setting's value came from: the environment wins over the TOML file."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = {k.upper(): (k, v) for k, v in env.items() if k.upper().startswith(PREFIX)}
        self.toml_path = env.get("STREAMREC_CONFIG") or ""
        self.toml: dict[str, Any] = {}
        if self.toml_path:
            with contextlib.suppress(OSError, ValueError):  # Settings() itself reports a bad file
                self.toml = tomllib.loads(Path(self.toml_path).read_text())

    def name(self, field: str) -> str:
        if env_name(field) in self.env:
            return self.env[env_name(field)][0]
        if field in self.toml:
            return f"{field} in {self.toml_path}"
        return field

    def line(self, field: str, expected: str) -> str:
        example = _example(field) if "e.g." not in expected else None
        if env_name(field) in self.env:
            name, raw = self.env[env_name(field)]
            eg = f", e.g. {env_name(field)}={_shell(example)}" if example is not None else ""
            if _service_link(name.upper(), raw):
                eg += " (Kubernetes sets this for a Service of that name: rename it or set enableServiceLinks: false)"
            return f"{name}={_shown(field, raw)}: {expected}{eg}"
        if field in self.toml:
            if field in EXAMPLES:
                example = json.loads(EXAMPLES[field])
            eg = f", e.g. {field} = {_toml(example, field)}" if example is not None else ""
            v = self.toml[field]
            value = _toml(_shown(field, v) if isinstance(v, str) or _secret(field) else v, field)
            return f"{field} = {value} in {self.toml_path}: {expected}{eg}"
        eg = f", e.g. {example}" if example is not None else ""
        return f"setting {field}: {expected}{eg}"

    def unknown(self, key: str) -> str:
        close = difflib.get_close_matches(key, list(Settings.model_fields), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else "; streamrec.example.toml lists every setting"
        where = f" in {self.toml_path}" if key in self.toml else ""
        return f"unknown setting {key}{where}{hint}"


def _expected(field: str, err: Any) -> str:
    """What ``field`` accepts, in words: its kind and bounds, or its validator's own message."""
    if isinstance(err, dict):
        if err["type"] == "value_error":
            return _validator_text(err)
        if err["type"] == "literal_error":
            return "expected one of " + str(err.get("ctx", {}).get("expected", "")).replace("'", "")
    info = Settings.model_fields[field]
    kind = _kind(info.annotation)
    if err == "json":
        return f"not valid JSON; expected {kind} (keys in double quotes)"
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    lo = next(((op, bounds[k]) for k, op in (("ge", ">="), ("gt", ">")) if k in bounds), None)
    hi = next(((op, bounds[k]) for k, op in (("le", "<="), ("lt", "<")) if k in bounds), None)
    if lo and hi and (lo[0], hi[0]) == (">=", "<="):
        return f"expected {kind} from {_num(lo[1])} to {_num(hi[1])}"
    parts = [f"{b[0]} {_num(b[1])}" for b in (lo, hi) if b is not None]
    return f"expected {kind}" + (" " + " and ".join(parts) if parts else "")


def _validator_text(err: Any) -> str:
    return str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _kind(annotation: Any) -> str:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    origin = get_origin(annotation) or annotation
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(annotation))
    kinds: dict[Any, str] = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "text",
        SecretStr: "text",
        Path: "a path",
    }
    if origin is dict:
        value = get_args(annotation)[1:] or [Any]
        return "an object of names and " + _NOUNS.get(value[0], "values")
    if origin is list:
        return "a list"
    return kinds.get(origin, "a valid value")


def _example(field: str) -> Any:
    if field in EXAMPLES:
        return EXAMPLES[field]
    info = Settings.model_fields[field]
    if _secret(field):
        return None
    default = info.get_default(call_default_factory=True)
    return None if default in (None, "") else default


def _secret(field: str) -> bool:
    return Settings.model_fields[field].annotation is SecretStr or bool(_SECRET_NAME.search(field))


def _shown(field: str, raw: Any) -> str:
    """A value as it may appear in a message: no secret, no credentials, not too long."""
    if _secret(field):
        return "***"
    s = str(raw)
    if field in URL_FIELDS:
        # not a URL mask_url can take apart: keep the host, drop user info and query
        s = mask_url(s) if "://" in s else s.split("?")[0].rsplit("@", 1)[-1] + ("?***" if "?" in s else "")
    return s if len(s) <= 80 else s[:77] + "..."


def _num(v: Any) -> str:
    return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _shell(v: Any) -> str:
    s = _plain(v)
    return f"'{s}'" if re.search(r"[^\w@%+=:,./-]", s) else s


def _plain(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict | list):
        return json.dumps(v)
    return _num(v) if isinstance(v, float) else str(v)


def _toml(v: Any, field: str) -> str:
    """``v`` written as a TOML value."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml(x, field)}" for k, x in v.items()) + "}"
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    return _plain(v)
