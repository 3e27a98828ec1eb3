"""Unit tests for extproc.config: layering, file format, validation, derived values."""

from __future__ import annotations

import inspect
import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest

from extproc.cli import build_parser, main
from extproc.config import (
    ConfigError,
    Settings,
    load_settings,
    read_config_file,
    settings_from_env,
    split_host_port,
)
from extproc.runtime import store_options
from store import open_store

Env = dict[str, str]


def write(tmp_path: Path, text: str, name: str = "sessiongate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(
    *,
    file: Path | None = None,
    env: Env | None = None,
    flags: dict[str, Any] | None = None,
    defaults: dict[str, Any] | None = None,
) -> Settings:
    return load_settings(file, flags or {}, environ=env or {}, defaults=defaults)


def error_of(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return str(info.value)


# --- layering --------------------------------------------------------------------------------


def test_builtin_defaults() -> None:
    s = load()
    assert s == Settings(state_dir=s.state_dir)
    assert s.listen == "127.0.0.1:8443"
    assert s.session_header == "x-session-id"
    assert s.identity_sources == ("jwt", "api-key")
    assert s.fail_open is True
    assert s.allow_anonymous is False


def test_environ_is_the_given_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSIONGATE_LISTEN", "127.0.0.1:1")
    assert load(env={}).listen == "127.0.0.1:8443"


def test_file_overrides_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\nlisten = "0.0.0.0:9000"\nfail_open = false\n')
    s = load(file=path)
    assert s.listen == "0.0.0.0:9000"
    assert s.fail_open is False
    assert s.grpc_listen == "127.0.0.1:50051"


def test_env_overrides_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\nlisten = "0.0.0.0:9000"\nlog_level = "debug"\n')
    s = load(file=path, env={"SESSIONGATE_LISTEN": "0.0.0.0:9001"})
    assert s.listen == "0.0.0.0:9001"
    assert s.log_level == "debug"


def test_flags_override_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\nlisten = "0.0.0.0:9000"\nmax_body_bytes = 4096\n')
    env = {"SESSIONGATE_LISTEN": "0.0.0.0:9001", "SESSIONGATE_MAX_BODY_BYTES": "8192"}
    s = load(file=path, env=env, flags={"listen": "0.0.0.0:9002"})
    assert s.listen == "0.0.0.0:9002"
    assert s.max_body_bytes == 8192


def test_none_flags_are_not_given(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\nlisten = "0.0.0.0:9000"\n')
    s = load(file=path, flags={"listen": None, "fail_open": None})
    assert s.listen == "0.0.0.0:9000"
    assert s.fail_open is True


def test_false_flag_is_given() -> None:
    assert load(env={"SESSIONGATE_TLS": "true"}, flags={"tls": False}).tls is False


@pytest.mark.parametrize("layers", list(itertools.product([False, True], repeat=4)))
def test_precedence_every_combination(
    layers: tuple[bool, bool, bool, bool], tmp_path: Path
) -> None:
    """Whichever layers set `grpc_listen`, the highest one wins."""
    use_defaults, use_file, use_env, use_flags = layers
    path = write(
        tmp_path, 'version = 1\ngrpc_listen = "127.0.0.1:2"\n' if use_file else "version = 1\n"
    )
    s = load(
        file=path,
        defaults={"grpc_listen": "127.0.0.1:1"} if use_defaults else None,
        env={"SESSIONGATE_GRPC_LISTEN": "127.0.0.1:3"} if use_env else {},
        flags={"grpc_listen": "127.0.0.1:4"} if use_flags else {},
    )
    expected = "127.0.0.1:50051"
    for used, port in ((use_defaults, 1), (use_file, 2), (use_env, 3), (use_flags, 4)):
        if used:
            expected = f"127.0.0.1:{port}"
    assert s.grpc_listen == expected


def test_defaults_parameter(tmp_path: Path) -> None:
    assert load(defaults={"grpc_listen": "127.0.0.1:0"}).grpc_listen == "127.0.0.1:0"
    path = write(tmp_path, 'version = 1\ngrpc_listen = "127.0.0.1:7"\n')
    assert load(file=path, defaults={"grpc_listen": "127.0.0.1:0"}).grpc_listen == "127.0.0.1:7"
    env = {"SESSIONGATE_GRPC_LISTEN": "127.0.0.1:8"}
    assert load(env=env, defaults={"grpc_listen": "127.0.0.1:0"}).grpc_listen == "127.0.0.1:8"
    flags = {"grpc_listen": "127.0.0.1:9"}
    assert load(flags=flags, defaults={"grpc_listen": "127.0.0.1:0"}).grpc_listen == "127.0.0.1:9"


def test_defaults_are_validated() -> None:
    assert "listen" in error_of(defaults={"listen": "nowhere"})


def test_config_file_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\nlisten = "0.0.0.0:9000"\n')
    assert load(env={"SESSIONGATE_CONFIG": str(path)}).listen == "0.0.0.0:9000"


def test_explicit_config_file_beats_env_config(tmp_path: Path) -> None:
    a = write(tmp_path, 'version = 1\nlisten = "0.0.0.0:1"\n', "a.toml")
    b = write(tmp_path, 'version = 1\nlisten = "0.0.0.0:2"\n', "b.toml")
    assert load(file=a, env={"SESSIONGATE_CONFIG": str(b)}).listen == "0.0.0.0:1"


def test_missing_config_file(tmp_path: Path) -> None:
    assert "not found" in error_of(file=tmp_path / "nope.toml")


def test_env_names() -> None:
    env = {
        "SESSIONGATE_REDIS_URL": "redis://localhost:6379/0",
        "SESSIONGATE_UNKNOWN_THING": "x",
        "SESSIONGATE_CONFIG": "/x.toml",
        "sessiongate_listen": "lower case is not ours",
        "LISTEN": "no prefix",
    }
    assert settings_from_env(env) == {"redis_url": "redis://localhost:6379/0"}


def test_env_types_coerced(tmp_path: Path) -> None:
    env = {
        "SESSIONGATE_MAX_BODY_BYTES": " 2048 ",
        "SESSIONGATE_FAIL_OPEN": "no",
        "SESSIONGATE_ALLOW_ANONYMOUS": "YES",
        "SESSIONGATE_IDENTITY_SOURCES": "mtls, api-key,",
        "SESSIONGATE_STATE_DIR": str(tmp_path / "state"),
        "SESSIONGATE_HMAC_KEY_FILE": str(tmp_path / "k"),
        "SESSIONGATE_REDIS_URL": "",
    }
    s = load(env=env)
    assert s.max_body_bytes == 2048
    assert s.fail_open is False
    assert s.allow_anonymous is True
    assert s.identity_sources == ("mtls", "api-key")
    assert s.state_dir == tmp_path / "state"
    assert s.hmac_key_path == tmp_path / "k"
    assert s.redis_url is None


def test_file_types(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "version = 1\n"
        'identity_sources = ["mtls", "jwt"]\n'
        "tls = false\n"
        "commit_interval_ms = 50\n"
        f'sqlite_path = "{tmp_path / "db.sqlite"}"\n',
    )
    s = load(file=path)
    assert s.identity_sources == ("mtls", "jwt")
    assert s.tls is False
    assert s.commit_interval_ms == 50
    assert s.sqlite_file == tmp_path / "db.sqlite"


def test_path_defaults_derive_from_state_dir(tmp_path: Path) -> None:
    s = load(flags={"state_dir": tmp_path})
    assert s.hmac_key_path == tmp_path / "hmac.key"
    assert s.sqlite_file == tmp_path / "sessions.db"


def test_empty_state_dir_rejected() -> None:
    """state_dir is not optional: an empty value is an error, not None."""
    assert error_of(env={"SESSIONGATE_STATE_DIR": ""}).startswith("state_dir")
    assert error_of(flags={"state_dir": ""}).startswith("state_dir")


# --- the file format -------------------------------------------------------------------------


def test_version_required(tmp_path: Path) -> None:
    msg = error_of(file=write(tmp_path, 'listen = "0.0.0.0:9000"\n'))
    assert "version = 1" in msg


@pytest.mark.parametrize("version", ["2", "0", '"1"', "-1", "1.0", "[1]"])
def test_wrong_version(tmp_path: Path, version: str) -> None:
    assert "version = 1" in error_of(file=write(tmp_path, f"version = {version}\n"))


def test_boolean_version_rejected(tmp_path: Path) -> None:
    """TOML `true` is Python True, which equals 1: still not `version = 1`."""
    assert "version = 1" in error_of(file=write(tmp_path, "version = true\n"))


def test_version_only_file_is_defaults(tmp_path: Path) -> None:
    assert load(file=write(tmp_path, "version = 1\n")) == load()


def test_unknown_keys_named(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\nlisten = "0.0.0.0:1"\nlistn = "x"\nzz_top = 1\n')
    msg = error_of(file=path)
    assert "unknown" in msg
    assert "listn" in msg and "zz_top" in msg
    assert "listen," not in msg


def test_unknown_table_named(tmp_path: Path) -> None:
    msg = error_of(file=write(tmp_path, "version = 1\n[redis]\nurl = 'redis://x'\n"))
    assert "redis" in msg


def test_invalid_toml(tmp_path: Path) -> None:
    assert "TOML" in error_of(file=write(tmp_path, "version = 1\nlisten = \n"))


def test_read_config_file_strips_version(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\nlisten = "0.0.0.0:9000"\n')
    assert read_config_file(path) == {"listen": "0.0.0.0:9000"}


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "api.openai.com",
        "ftp://api.openai.com",
        "https://",
        "http:///v1",
        "",
        "https://api.openai.com/v1?key=1",
        "https://api.openai.com/v1#frag",
    ],
)
def test_bad_upstream(url: str) -> None:
    assert error_of(flags={"upstream": url}).startswith("upstream")


def test_upstream_query_message() -> None:
    assert "query" in error_of(flags={"upstream": "https://a.example/v1?x=1"})


@pytest.mark.parametrize(
    "url", ["https://api.openai.com", "http://127.0.0.1:8080", "https://gw.example/openai/v1"]
)
def test_good_upstream(url: str) -> None:
    assert load(flags={"upstream": url}).upstream == url


@pytest.mark.parametrize("name", ["listen", "grpc_listen"])
@pytest.mark.parametrize(
    "value", ["127.0.0.1", "127.0.0.1:", ":8443", "localhost:http", "host:65536", "host:-1", ""]
)
def test_bad_listen(name: str, value: str) -> None:
    assert error_of(flags={name: value}).startswith(name)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("[::1]:0", ("::1", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_split_host_port(value: str, expected: tuple[str, int]) -> None:
    assert split_host_port(value, "listen") == expected


@pytest.mark.parametrize(
    "header", ["X-Session-Id", ":authority", "x session", "", "x/y", "é", "x-session-id\r"]
)
def test_bad_session_header(header: str) -> None:
    assert error_of(flags={"session_header": header}).startswith("session_header")


def test_session_header_trailing_newline_rejected() -> None:
    """A `$`-anchored `match` would accept a trailing newline; the check must not."""
    assert error_of(flags={"session_header": "x-session-id\n"}).startswith("session_header")


@pytest.mark.parametrize("header", ["x-session-id", "x-conversation", "session_id", "x.sid"])
def test_good_session_header(header: str) -> None:
    assert load(flags={"session_header": header}).session_header == header


@pytest.mark.parametrize("sources", ["jwt,oauth", "", " , ", "JWT", "api_key"])
def test_bad_identity_sources(sources: str) -> None:
    msg = error_of(env={"SESSIONGATE_IDENTITY_SOURCES": sources})
    assert msg.startswith("identity_sources")


def test_identity_sources_list_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\nidentity_sources = ["jwt", "kerberos"]\n')
    assert error_of(file=path).startswith("identity_sources")


def test_bad_redis_url() -> None:
    assert error_of(flags={"redis_url": "http://localhost"}).startswith("redis_url")


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (1023, False),
        (1024, True),
        (512 * 1024 * 1024, True),
        (512 * 1024 * 1024 + 1, False),
        (0, False),
        (-1, False),
    ],
)
def test_max_body_bytes_range(value: int, ok: bool) -> None:
    if ok:
        assert load(flags={"max_body_bytes": value}).max_body_bytes == value
    else:
        assert error_of(flags={"max_body_bytes": value}).startswith("max_body_bytes")


@pytest.mark.parametrize(
    ("timeout", "wait", "ok"),
    [
        (2000, 1599, True),
        (2000, 1600, False),
        (2000, 2000, False),
        (2000, 0, True),
        (2000, -1, False),
        (1000, 799, True),
        (1000, 800, False),
        (100, 79, True),
        (100, 80, False),
    ],
)
def test_pending_wait_below_80_percent(timeout: int, wait: int, ok: bool) -> None:
    flags = {"message_timeout_ms": timeout, "pending_wait_ms": wait}
    if ok:
        assert load(flags=flags).pending_wait_ms == wait
    else:
        assert error_of(flags=flags).startswith("pending_wait_ms")


def test_message_timeout_minimum() -> None:
    msg = error_of(flags={"message_timeout_ms": 99, "pending_wait_ms": 0})
    assert msg.startswith("message_timeout_ms")


def test_upstream_body_limit_not_below_body_limit() -> None:
    flags = {"max_body_bytes": 4096, "max_upstream_body_bytes": 4095}
    assert error_of(flags=flags).startswith("max_upstream_body_bytes")
    s = load(flags={"max_body_bytes": 4096, "max_upstream_body_bytes": 4096})
    assert s.upstream_body_limit == 4096


def test_bad_log_level() -> None:
    assert error_of(flags={"log_level": "verbose"}).startswith("log_level")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("yes", True),
        ("YES", True),
        ("true", True),
        ("on", True),
        ("1", True),
        (" True ", True),
        ("no", False),
        ("false", False),
        ("off", False),
        ("0", False),
        ("Off", False),
    ],
)
def test_bool_parsing(text: str, expected: bool) -> None:
    assert load(env={"SESSIONGATE_FAIL_OPEN": text}).fail_open is expected


@pytest.mark.parametrize("text", ["maybe", "2", "", "tru", "y e s", "-1"])
def test_bool_garbage(text: str) -> None:
    msg = error_of(env={"SESSIONGATE_ALLOW_ANONYMOUS": text})
    assert msg.startswith("allow_anonymous")


def test_bool_toml_int(tmp_path: Path) -> None:
    assert load(file=write(tmp_path, "version = 1\ntls = 0\n")).tls is False
    assert "tls" in error_of(file=write(tmp_path, "version = 1\ntls = 5\n"))


@pytest.mark.parametrize("text", ["abc", "", "1.5", "0x10", "12kb"])
def test_int_garbage(text: str) -> None:
    assert error_of(env={"SESSIONGATE_MAX_BODY_BYTES": text}).startswith("max_body_bytes")


def test_int_rejects_toml_bool(tmp_path: Path) -> None:
    path = write(tmp_path, "version = 1\ncommit_interval_ms = true\n")
    assert error_of(file=path).startswith("commit_interval_ms")


def test_int_garbage_in_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\nhot_max_bytes = "lots"\n')
    assert error_of(file=path).startswith("hot_max_bytes")


# --- redaction and derived values ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:s3cretpw@redis.local:6379/0", "redis://user:***@redis.local:6379/0"),
        ("redis://:s3cretpw@redis.local:6379", "redis://:***@redis.local:6379"),
        ("rediss://default:s3cretpw@r.example:6380/1", "rediss://default:***@r.example:6380/1"),
    ],
)
def test_redacted_hides_redis_password(url: str, shown: str) -> None:
    s = load(flags={"redis_url": url})
    out = s.redacted()
    assert out["redis_url"] == shown
    assert "s3cretpw" not in repr(out)
    assert s.redis_url == url  # the setting itself is untouched


def test_redacted_without_password() -> None:
    s = load(flags={"redis_url": "redis://redis.local:6379/0"}, env={})
    assert s.redacted()["redis_url"] == "redis://redis.local:6379/0"
    assert load().redacted()["redis_url"] is None


def test_redacted_is_plain_data(tmp_path: Path) -> None:
    out = load(flags={"state_dir": tmp_path}).redacted()
    assert out["state_dir"] == str(tmp_path)
    assert out["hmac_key_file"] is None
    assert out["listen"] == "127.0.0.1:8443"
    assert set(out) >= {"upstream", "max_body_bytes", "identity_sources", "redis_url"}


def test_upstream_body_limit() -> None:
    assert load(flags={"max_body_bytes": 4096}).upstream_body_limit == 4 * 4096
    s = load(flags={"max_body_bytes": 4096, "max_upstream_body_bytes": 10_000})
    assert s.upstream_body_limit == 10_000
    assert load().upstream_body_limit == 4 * 8 * 1024 * 1024


@pytest.mark.parametrize(
    ("timeout", "deadline"), [(2000, 1.6), (1000, 0.8), (100, 0.08), (60_000, 48.0)]
)
def test_server_deadline(timeout: int, deadline: float) -> None:
    s = load(flags={"message_timeout_ms": timeout, "pending_wait_ms": 0})
    assert s.server_deadline_s == pytest.approx(deadline)
    assert s.server_deadline_s < timeout / 1000


def test_server_deadline_floor() -> None:
    assert Settings(message_timeout_ms=10).server_deadline_s == pytest.approx(0.05)


# --- redis_urls: sessions sharded over several Redis nodes -----------------------------------

TWO = ("redis://10.0.0.1:6379/0", "redis://10.0.0.2:6379/0")


def test_redis_urls_from_every_layer(tmp_path: Path) -> None:
    path = write(tmp_path, f"version = 1\nredis_urls = {list(TWO)!r}\n".replace("'", '"'))
    assert load(file=path).redis_urls == TWO
    assert load(env={"SESSIONGATE_REDIS_URLS": ",".join(TWO)}).redis_urls == TWO
    assert load(env={"SESSIONGATE_REDIS_URLS": f" {TWO[0]} , {TWO[1]} ,"}).redis_urls == TWO
    # A repeated flag arrives as a list; each value may itself be comma-separated.
    three = [TWO[0], f"{TWO[1]},redis://10.0.0.3:6379/0"]
    assert load(flags={"redis_urls": three}).redis_urls == (*TWO, "redis://10.0.0.3:6379/0")
    assert load().redis_urls == ()


def test_redis_urls_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, f'version = 1\nredis_urls = ["{TWO[0]}"]\n')
    env = {"SESSIONGATE_REDIS_URLS": TWO[1]}
    assert load(file=path).redis_urls == (TWO[0],)
    assert load(file=path, env=env).redis_urls == (TWO[1],)
    assert load(file=path, env=env, flags={"redis_urls": list(TWO)}).redis_urls == TWO


def test_redis_urls_keep_the_host_lists_of_sentinel_and_cluster_urls() -> None:
    value = "redis+sentinel://:pw@s1:26379,s2:26379/main/0,redis+cluster://c1:7000,c2:7000"
    assert load(env={"SESSIONGATE_REDIS_URLS": value}).redis_urls == (
        "redis+sentinel://:pw@s1:26379,s2:26379/main/0",
        "redis+cluster://c1:7000,c2:7000",
    )


def test_redis_urls_join_hosts_only_within_one_value() -> None:
    """A host list continues the URL of its own value, never one from another flag or array
    item (there it is an error, not a silent extra host)."""
    assert "one host per redis:// URL" not in error_of(flags={"redis_urls": [TWO[0], "h:2"]})
    assert error_of(flags={"redis_urls": [TWO[0], "h:2"]}).startswith("redis_urls: expected")


def test_redis_url_and_redis_urls_are_exclusive(tmp_path: Path) -> None:
    msg = error_of(flags={"redis_url": TWO[0], "redis_urls": [TWO[1]]})
    assert msg.startswith("redis_urls") and "not both" in msg
    # Across layers too: the file's redis_url and the environment's redis_urls clash...
    path = write(tmp_path, f'version = 1\nredis_url = "{TWO[0]}"\n')
    assert "not both" in error_of(file=path, env={"SESSIONGATE_REDIS_URLS": TWO[1]})
    # ...unless a higher layer clears one with an empty value.
    env = {"SESSIONGATE_REDIS_URLS": TWO[1], "SESSIONGATE_REDIS_URL": ""}
    assert load(file=path, env=env).redis_urls == (TWO[1],)


@pytest.mark.parametrize(
    ("urls", "expected"),
    [
        (["http://10.0.0.1:6379"], "expected redis://"),
        ([TWO[0], "redis://u:pw@10.0.0.1:6379/0"], "10.0.0.1:6379/0 is listed twice"),
        (["redis://10.0.0.1:6379/0, 10.0.0.2:6379/0"], "one host per redis:// URL"),
    ],
)
def test_bad_redis_urls(urls: list[str], expected: str) -> None:
    msg = error_of(flags={"redis_urls": urls})
    assert msg.startswith("redis_urls") and expected in msg
    assert "pw" not in msg


def test_tenants_may_shard_too(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "version = 1\n"
        f'redis_url = "{TWO[0]}"\n'
        "[tenants.acme]\n"
        'redis_urls = ["redis://10.0.1.1:6379/0", "redis://10.0.1.2:6379/0"]\n'
        "[tenants.globex]\n"
        'redis_urls = "redis://10.0.2.1:6379/0,redis://10.0.2.2:6379/0"\n',
    )
    tenants = load(file=path).tenants
    assert tenants["acme"]["redis_urls"] == ("redis://10.0.1.1:6379/0", "redis://10.0.1.2:6379/0")
    assert tenants["globex"]["redis_urls"] == ("redis://10.0.2.1:6379/0", "redis://10.0.2.2:6379/0")


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (f'redis_url = "{TWO[0]}"\nredis_urls = ["{TWO[1]}"]\n', "tenants.acme.redis_urls"),
        ('redis_urls = ["http://x:1"]\n', "tenants.acme.redis_urls: expected"),
        ('redis_url = "http://x:1"\n', "tenants.acme.redis_url: expected"),
    ],
)
def test_bad_tenant_warm_tier(tmp_path: Path, table: str, expected: str) -> None:
    path = write(tmp_path, f"version = 1\n[tenants.acme]\n{table}")
    assert error_of(file=path).startswith(expected)


def test_redacted_hides_passwords_in_redis_urls_and_tenants(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "version = 1\n"
        'redis_urls = ["redis://:pw1secret@a:1/0", "redis://b:2/0"]\n'
        "[tenants.acme]\n"
        'redis_url = "rediss://u:pw2secret@c:3/0"\n'
        'postgres_dsn = "postgresql://sg:pw3secret@pg/db"\n'
        f'sqlite_path = "{tmp_path / "acme.db"}"\n',
    )
    out = load(file=path).redacted()
    assert out["redis_urls"] == ["redis://:***@a:1/0", "redis://b:2/0"]
    assert out["tenants"]["acme"]["redis_url"] == "rediss://u:***@c:3/0"
    assert out["tenants"]["acme"]["postgres_dsn"] == "postgresql://sg:***@pg/db"
    assert out["tenants"]["acme"]["sqlite_path"] == str(tmp_path / "acme.db")
    assert "secret" not in json.dumps(out)


# --- hot_ttl_s -----------------------------------------------------------------------------


def test_hot_ttl_default_is_no_expiry() -> None:
    assert load().hot_ttl_s == 0
    assert store_options(load())["hot_ttl_s"] is None


@pytest.mark.parametrize(("value", "seconds"), [("2.5", 2.5), ("300", 300.0), ("0", 0.0)])
def test_hot_ttl_parsing(value: str, seconds: float) -> None:
    settings = load(env={"SESSIONGATE_HOT_TTL_S": value})
    assert settings.hot_ttl_s == seconds
    assert store_options(settings)["hot_ttl_s"] == (seconds or None)


def test_hot_ttl_from_the_file(tmp_path: Path) -> None:
    assert load(file=write(tmp_path, "version = 1\nhot_ttl_s = 90\n")).hot_ttl_s == 90.0
    assert error_of(file=write(tmp_path, "version = 1\nhot_ttl_s = true\n")).startswith("hot_ttl_s")


@pytest.mark.parametrize("value", ["-1", "-0.5", "nan", "inf", "soon", ""])
def test_bad_hot_ttl(value: str) -> None:
    assert error_of(env={"SESSIONGATE_HOT_TTL_S": value}).startswith("hot_ttl_s")


def test_store_options_are_open_store_options() -> None:
    """What runtime hands to open_router: every key an open_store parameter, every setting
    that shapes the store present."""
    settings = load(flags={"redis_urls": list(TWO), "hot_ttl_s": 7})
    options = store_options(settings)
    assert set(options) <= set(inspect.signature(open_store).parameters)
    assert options["redis_urls"] == TWO and options["redis_url"] is None
    assert options["hot_ttl_s"] == 7.0
    assert options["sqlite_path"] == settings.sqlite_file


# --- JWT -------------------------------------------------------------------------------------

JWT = {"jwt_jwks_file": "/etc/sessiongate/jwks.json", "jwt_issuer": "https://idp.example"}


def test_jwt_settings() -> None:
    s = load(flags={**JWT, "jwt_audiences": ["a,b", "c"], "jwt_required": "yes"})
    assert s.jwt_jwks_file == Path("/etc/sessiongate/jwks.json")
    assert s.jwt_audiences == ("a", "b", "c")
    assert s.jwt_required is True
    assert s.jwt_header == "authorization"
    assert load().jwt_jwks_file is None and load().jwt_required is False


@pytest.mark.parametrize(
    "setting",
    [
        {"jwt_issuer": "https://idp.example"},
        {"jwt_audiences": "a"},
        {"jwt_required": "true"},
        {"jwt_header": "x-jwt"},
    ],
)
def test_jwt_settings_need_a_jwks_file(setting: dict[str, str]) -> None:
    name = next(iter(setting))
    assert error_of(flags=setting) == f"{name}: needs jwt_jwks_file (the JWKS that verifies tokens)"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"jwt_issuer": ""}, "jwt_issuer: required"),
        ({"jwt_metadata_namespace": "my.jwt"}, "jwt_metadata_namespace"),
        ({"identity_sources": "api-key"}, "identity_sources: add jwt"),
        ({"jwt_header": "Authorization"}, "jwt_header: not a lower-case header name"),
        ({"jwt_header": "x-session-id"}, "jwt_header: must differ"),
    ],
)
def test_bad_jwt_settings(extra: dict[str, str], expected: str) -> None:
    assert error_of(flags={**JWT, **extra}).startswith(expected)


# --- the command line ------------------------------------------------------------------------


def test_list_flags_repeat_and_split(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            *("config", "check", "--state-dir", str(tmp_path)),
            *("--redis-urls", TWO[0], "--redis-urls", TWO[1]),
            *("--identity-sources", "jwt", "--identity-sources", "api-key"),
            *("--ext-proc-endpoints", "h:1,h:2"),
        ]
    )
    assert args.redis_urls == list(TWO)
    settings = load(flags={k: v for k, v in vars(args).items() if k in dir(Settings)})
    assert settings.redis_urls == TWO
    assert settings.ext_proc_endpoints == ("h:1", "h:2")
    assert settings.identity_sources == ("jwt", "api-key")


def test_config_check_names_the_redis_clash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [k for k in os.environ if k.startswith("SESSIONGATE_")]:
        monkeypatch.delenv(name)
    argv = ["config", "check", "--redis-url", TWO[0], "--redis-urls", TWO[1]]
    assert main(argv) == 2
    assert "redis_urls: set either redis_url" in capsys.readouterr().err
    assert main(["config", "check", "--redis-urls", ",".join(TWO)]) == 0
    assert json.loads(capsys.readouterr().out)["redis_urls"] == list(TWO)


# --- context strategies and summaries --------------------------------------------------------


def test_context_strategy_settings(tmp_path: Path) -> None:
    key = write(tmp_path, "sk-x\n", "summarizer.key")
    s = load(
        file=write(
            tmp_path,
            'version = 1\ncontext_strategy = "relevance"\ncontext_summary_share = 0.1\n'
            'context_summarizer_url = "http://127.0.0.1:9/v1"\n'
            f'context_summarizer_api_key_file = "{key}"\n',
        ),
        env={"SESSIONGATE_CONTEXT_RELEVANCE_SHARE": "0.5"},
    )
    assert s.context_strategy == "relevance" and s.context_relevance_share == 0.5
    assert s.context_summarizer_api_key_file == key
    assert s.context_summarizer_model == "gpt-4o-mini"
    assert load().context_strategy == "auto" and load().context_summary_share == 0


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"context_strategy": "psychic"}, "context_strategy"),
        ({"context_relevance_share": 1.5}, "context_relevance_share"),
        ({"context_summary_share": 0.9}, "context_summary_share"),
        ({"context_summary_share": 0.45, "context_facts_share": 0.45}, "context_facts_share"),
        ({"context_summarizer_url": "ftp://x", "context_summary_share": 0.1}, "summarizer_url"),
        ({"context_summarizer_url": "http://x/v1"}, "context_summary_share"),
        ({"context_summarizer_api_key_file": "/nonexistent/key"}, "api_key_file"),
        ({"context_summarizer_timeout_s": 0}, "context_summarizer_timeout_s"),
    ],
)
def test_context_strategy_settings_checked(flags: dict[str, Any], named: str) -> None:
    assert named in error_of(defaults=flags)
