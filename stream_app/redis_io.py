"""Redis clients built from the settings: the one place that applies ``redis_username``,
``redis_password`` and ``redis_ca_cert`` to ``redis_url``.

redis-py lets credentials in a URL win over keyword arguments, so the URL is taken apart here:
its user and password (in the user info or the ``username``/``password`` query values) are
removed and passed as arguments, the settings' own winning. The URL a client is built from
then carries no secret, and neither does anything that logs it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import redis

from stream_app.config import Settings
from stream_app.errors import ServiceUnreachable


def redis_connection(s: Settings) -> tuple[str, dict[str, Any]]:
    """``redis_url`` without credentials, and the keyword arguments that carry them (and the CA)."""
    parts = urlsplit(s.redis_url)
    username: str | None = None
    password: str | None = None
    query = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k == "username":
            username = v or None
        elif k == "password":
            password = v or None
        else:
            query.append((k, v))
    if parts.username:  # as redis-py reads a URL: the user info beats the query
        username = unquote(parts.username)
    if parts.password:
        password = unquote(parts.password)
    username = s.redis_username or username
    password = s.redis_password.get_secret_value() or password
    host = parts.netloc.rpartition("@")[2]
    url = f"{parts.scheme}://{host}{parts.path}" + (f"?{urlencode(query)}" if query else "")
    kwargs: dict[str, Any] = {}
    if username:
        kwargs["username"] = username
    if password:
        kwargs["password"] = password
    if s.redis_ca_cert:
        kwargs["ssl_ca_certs"] = s.redis_ca_cert
    return url, kwargs


def redis_client(s: Settings, **kwargs: Any) -> redis.Redis:
    """A client of the configured Redis (TLS with ``rediss://``), authenticated as configured.
    ``kwargs`` go to redis-py (timeouts, say). Connects lazily, on the first command."""
    url, auth = redis_connection(s)
    return redis.Redis.from_url(url, **auth, **kwargs)


def redis_address(s: Settings) -> str:
    """Where Redis is, for messages: ``host:port`` (or the socket path), never credentials."""
    parts = urlsplit(s.redis_url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    return f"{f'[{host}]' if ':' in host else host}:{parts.port or 6379}"


def check_redis(s: Settings, timeout: float = 5.0) -> None:
    """Ping Redis once; a refusal or an unreachable server becomes a one-line ServiceUnreachable
    that says what to set. The message names the server, never a credential."""
    client = redis_client(s, socket_connect_timeout=timeout, socket_timeout=timeout)
    where = redis_address(s)
    try:
        client.ping()
    except redis.AuthenticationError:
        _, auth = redis_connection(s)
        if "password" not in auth:
            raise ServiceUnreachable(
                f"Redis at {where} requires a password; set STREAMREC_REDIS_PASSWORD "
                "(and STREAMREC_REDIS_USERNAME for an ACL user)"
            ) from None
        raise ServiceUnreachable(
            f"Redis at {where} refused the credentials (STREAMREC_REDIS_PASSWORD / STREAMREC_REDIS_USERNAME)"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ServiceUnreachable(
            f"cannot reach Redis at {where}: {reason}; check STREAMREC_REDIS_URL (rediss:// for TLS, "
            "STREAMREC_REDIS_CA_CERT for a private CA)"
        ) from None
    finally:
        client.close()
