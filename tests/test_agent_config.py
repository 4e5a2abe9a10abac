"""The agent's configuration: TOML file, flags on top, and clear errors."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import pytest

from hatchway.agent.config import (
    ServiceTarget,
    load_agent_config,
    parse_host_port,
    parse_service,
)
from hatchway.agent.runner import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    Agent,
    AgentTunnel,
    goaway_text,
    reconnect_delay,
)
from hatchway.errors import ConfigError
from hatchway.mux.frames import GoAwayReason
from hatchway.tunnel.connect import (
    ConnectError,
    ProxyConfig,
    proxy_from_environment,
    relay_websocket_url,
)


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent reads HTTPS_PROXY and NO_PROXY: the tests' own environment must not count."""
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_text("  s3cret-value \n")
    path.chmod(0o600)
    return path


def test_toml_file_with_relative_paths(tmp_path: Path, secret: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'server = "https://relay.example.com:8443"\ndevice = "plc-7"\n'
        'secret_file = "secret"\nca_file = "ca.pem"\nproxy = "http://u:p%40ss@proxy:3128"\n'
        '[services]\nssh = "localhost:22"\nhttp = "192.168.1.20:80"\nv6 = "[::1]:5900"\n'
    )
    config = load_agent_config(config_file=cfg)
    assert config.server == "https://relay.example.com:8443"
    assert config.device == "plc-7"
    assert config.secret == "s3cret-value"
    assert config.ca_file == tmp_path / "ca.pem"
    assert config.services == {
        "ssh": ServiceTarget("ssh", "localhost", 22),
        "http": ServiceTarget("http", "192.168.1.20", 80),
        "v6": ServiceTarget("v6", "::1", 5900),
    }
    assert config.services["http"].is_gateway and not config.services["ssh"].is_gateway
    assert config.proxy == ProxyConfig("proxy", 3128, "Basic dTpwQHNz")  # u:p@ss
    assert config.tunnel_url == "wss://relay.example.com:8443/api/v1/tunnel"


def test_flags_win_over_the_file(tmp_path: Path, secret: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'server = "https://a:1"\ndevice = "one"\nsecret_file = "secret"\n'
        '[services]\nssh = "localhost:22"\n'
    )
    config = load_agent_config(
        config_file=cfg, server="https://b:2", device="two", services=["ssh=127.0.0.1:2222"]
    )
    assert (config.server, config.device) == ("https://b:2", "two")
    assert config.services["ssh"] == ServiceTarget("ssh", "127.0.0.1", 2222)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"server": None}, "no relay given"),
        ({"server": "http://relay:80"}, "must start with https://"),
        ({"device": None}, "no device id given"),
        ({"device": "Bad_ID"}, "invalid device id"),
        ({"services": []}, "no service exposed"),
        ({"services": ["ssh"]}, "expected NAME=HOST:PORT"),
        ({"services": ["ssh=host"]}, "expected HOST:PORT"),
        ({"services": ["ssh=host:0"]}, "out of range"),
        ({"services": ["ssh=a:22", "ssh=b:22"]}, "service ssh is given twice"),
        ({"services": ["ssh=host:70000"]}, "out of range"),
        ({"services": ["Bad Name=host:1"]}, "invalid service name"),
        ({"proxy": "socks5://p:1"}, "unsupported proxy scheme"),
    ],
)
def test_errors_are_clear(secret: Path, kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "server": "https://relay:8443",
        "device": "dev1",
        "secret_file": secret,
        "services": ["ssh=localhost:22"],
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        load_agent_config(**args)  # type: ignore[arg-type]


def test_file_errors(tmp_path: Path, secret: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_agent_config(config_file=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("server = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_agent_config(config_file=bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('srever = "https://x:1"\n')
    with pytest.raises(ConfigError, match="unknown settings srever"):
        load_agent_config(config_file=unknown)
    empty = tmp_path / "empty-secret"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_agent_config(server="https://r:1", device="d", secret_file=empty, services=["s=h:1"])
    with pytest.raises(ConfigError, match="cannot read the secret file"):
        load_agent_config(
            server="https://r:1", device="d", secret_file=tmp_path / "nope", services=["s=h:1"]
        )


def test_host_port_and_service_parsing() -> None:
    assert parse_host_port("[fe80::1]:22", "x") == ("fe80::1", 22)
    assert parse_service("web=10.0.0.5:8080") == ServiceTarget("web", "10.0.0.5", 8080)
    with pytest.raises(ConfigError):
        parse_host_port("::1:22", "x")


def test_proxy_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:8080")
    monkeypatch.setenv("NO_PROXY", "internal.example")
    assert proxy_from_environment("relay.example.com") == ProxyConfig("proxy.local", 8080)
    assert proxy_from_environment("internal.example") is None
    monkeypatch.delenv("HTTPS_PROXY")
    assert proxy_from_environment("relay.example.com") is None


def test_relay_websocket_url() -> None:
    assert relay_websocket_url("https://r.example:8443/", "/p") == "wss://r.example:8443/p"
    with pytest.raises(ConfigError, match="TLS is required"):
        relay_websocket_url("ws://r:1", "/p")


def test_tls_services_and_host_header(tmp_path: Path, secret: Path) -> None:
    ca = tmp_path / "device-ca.pem"
    ca.write_text("x")
    target = parse_service(f"https=tls://192.168.1.10:443?ca={ca}&name=cam.local&host=cam.local")
    assert target == ServiceTarget("https", "192.168.1.10", 443, True, ca, "cam.local", "cam.local")
    assert target.verified and target.advertised() == {"host": "cam.local"}
    plain = parse_service("http=192.168.1.10:80?host=cam.local:8080")
    assert not plain.tls and plain.advertised() == {"host": "cam.local:8080"}
    unverified = parse_service("https=tls://[fd00::1]:443")
    assert unverified.tls and not unverified.verified and unverified.advertised() == {}
    for spec, message in [
        ("https=tls://h:443?verify=no", "unknown option"),
        ("https=tls://h:443?ca=", "unknown option"),
        ("http=h:80?ca=x.pem", "need TLS"),
        ("https=tls://h:443?ca=/nonexistent.pem", "no CA file"),
        ("http=h:80?host=bad host", "invalid host header"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_service(spec)
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        'server = "https://relay.example.com"\ndevice = "cam-1"\nsecret_file = "secret"\n'
        "[services]\n"
        'ssh = "localhost:22"\n'
        'https = { address = "192.168.1.10:443", tls = true, ca_file = "device-ca.pem", '
        'server_name = "cam.local", host_header = "cam.local" }\n'
    )
    (tmp_path / "secret").write_text(secret.read_text())
    (tmp_path / "secret").chmod(0o600)
    config = load_agent_config(config_file=cfg)
    assert config.services["https"] == target
    cfg.write_text(
        'server = "https://relay.example.com"\ndevice = "cam-1"\nsecret_file = "secret"\n'
        '[services]\nhttps = { address = "h:443", tls = "yes" }\n'
    )
    with pytest.raises(ConfigError, match="tls = true"):
        load_agent_config(config_file=cfg)


def test_proxy_messages_never_show_credentials() -> None:
    for url, message in [
        ("http://alice:pw-1@:3128", r"proxy URL http://\*\*\*@:3128: no host"),
        ("http://alice:pw-1@p:65536", "port 65536 out of range"),
        ("http://alice:pw-1@p:3x", "invalid port '3x'"),
        ("socks5://alice:pw-1@p:1", "unsupported proxy scheme 'socks5'"),
        ("alice:pw-1@p:0", "port 0 out of range"),
        ("http://alice:pw/1@p:1", r"http://\*\*\*@p:1: percent-encode the user name"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            ProxyConfig.parse(url)
        assert "pw" not in str(info.value) and "alice" not in str(info.value)
    assert ProxyConfig.parse("[fd00::1]:8080") == ProxyConfig("fd00::1", 8080)
    assert ProxyConfig.parse("[fd00::1]:8080").address() == "[fd00::1]:8080"


def test_config_types_and_encodings_are_checked(tmp_path: Path, secret: Path) -> None:
    cfg = tmp_path / "agent.toml"
    base = 'server = "https://relay:8443"\ndevice = "dev1"\nsecret_file = "secret"\n'
    for extra, message in [
        ('proxy = 3128\n[services]\nssh = "localhost:22"\n', "proxy must be a string"),
        ('[services]\nw = { address = "h:80", host_header = 5 }\n', "host_header must be a str"),
        ('[services]\nw = { address = "h:80", host_header = "a b" }\n', "invalid host header"),
    ]:
        cfg.write_text(base + extra)
        with pytest.raises(ConfigError, match=message):
            load_agent_config(config_file=cfg)
    cfg.write_bytes(base.encode() + b"# \xe9t\xe9\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_agent_config(config_file=cfg)
    cfg.write_text('server = 5\ndevice = "dev1"\n')
    with pytest.raises(ConfigError, match="server must be a string"):
        load_agent_config(config_file=cfg)
    secret.write_bytes(b"\xff\xfe\xfd")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_agent_config(server="https://r:1", device="d", secret_file=secret, services=["s=h:1"])


def test_the_environments_proxy_is_checked_at_start(
    secret: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args: dict[str, object] = {
        "server": "https://relay.example:8443",
        "device": "dev1",
        "secret_file": secret,
        "services": ["ssh=localhost:22"],
    }
    monkeypatch.setenv("HTTPS_PROXY", "https://u:pw-2@proxy:3128")
    with pytest.raises(ConfigError, match=r"HTTPS_PROXY .*unsupported proxy scheme") as info:
        load_agent_config(**args)  # type: ignore[arg-type]
    assert "pw-2" not in str(info.value)
    monkeypatch.setenv("HTTPS_PROXY", "http://u:pw-2@proxy:3128")
    config = load_agent_config(**args)  # type: ignore[arg-type]
    assert config.proxy is not None and config.proxy.host == "proxy"
    monkeypatch.setenv("NO_PROXY", "relay.example")
    assert load_agent_config(**args).proxy is None  # type: ignore[arg-type]
    # A configured proxy wins over the environment.
    config = load_agent_config(**args, proxy="http://other:1")  # type: ignore[arg-type]
    assert config.proxy == ProxyConfig("other", 1)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("https://[::1", "invalid IPv6 address"),
        ("https://localhost:99999", "port 99999 out of range"),
        ("https://localhost:abc", "invalid port 'abc'"),
        ("https://localhost:0", "port 0 out of range"),
        ("https://", "no host"),
        ("https://re lay", "may not contain spaces"),
        ("https://u:p@relay", "no user name or password"),
        ("https://relay/x?y", "without a path"),
    ],
)
def test_relay_urls_are_checked(server: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        relay_websocket_url(server, "/api/v1/tunnel")
    assert relay_websocket_url("https://[::1]:8443/", "/p") == "wss://[::1]:8443/p"


def test_reconnect_delays_are_jittered_within_bounds() -> None:
    rng = random.Random(7)
    for attempt in range(40):
        for _ in range(200):
            delay = reconnect_delay(attempt, rng.uniform)
            assert BACKOFF_MIN <= delay <= BACKOFF_MAX
    # Every delay is random, the first one too, and they grow to the cap.
    assert len({round(reconnect_delay(0, rng.uniform), 6) for _ in range(50)}) > 40
    assert [reconnect_delay(n, lambda lo, hi: lo) for n in range(7)] == [1, 2, 4, 8, 15, 15, 15]
    assert [reconnect_delay(n, lambda lo, hi: hi) for n in range(7)] == [2, 4, 8, 16, 30, 30, 30]


def test_agent_waits_the_jittered_delays_between_attempts(
    secret: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconnect loop itself, with a relay that is never there and no real sleep."""
    config = load_agent_config(
        server="https://relay:8443", device="dev1", secret_file=secret, services=["s=h:1"]
    )
    agent = Agent(config)
    delays: list[float] = []

    async def refuse() -> AgentTunnel:
        raise ConnectError("cannot reach relay:8443")

    async def no_sleep(delay: float) -> None:
        delays.append(delay)
        if len(delays) == 8:
            raise asyncio.CancelledError

    monkeypatch.setattr(agent, "connect_once", refuse)
    monkeypatch.setattr(asyncio, "sleep", no_sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(agent.run())
    ceilings = [2, 4, 8, 16, 30, 30, 30, 30]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert delays[0] != 1.0


def test_every_goaway_reason_reads_as_a_sentence() -> None:
    """What the agent logs when the relay ends its tunnel, for each reason the protocol
    has (and one it does not know yet)."""
    texts = {reason: goaway_text(reason, "detail") for reason in GoAwayReason}
    assert texts[GoAwayReason.AUTH_FAILED] == (
        "the relay refused this device's credentials (detail)"
    )
    assert texts[GoAwayReason.SHUTDOWN] == "the relay is shutting down (detail)"
    assert len(set(texts.values())) == len(texts)  # each reason its own words
    assert goaway_text(99, "") == "the relay closed the tunnel"
