"""The agent's configuration: TOML file, flags on top, and clear errors."""

from __future__ import annotations

import asyncio
import base64
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
from tests.procs import Env


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
        ("http://alice:pw-1@p:65536", r"p:65536: port 65536 out of range \(1-65535\)$"),
        ("http://alice:pw-1@p:3x", r"p:3x: invalid port \(expected 1-65535\)$"),
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


# --- NO_PROXY entries with a port ------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "exempt"),
    [
        ("relay.example.com:8443", "relay.example.com", 8443, True),
        ("relay.example.com:8443", "relay.example.com", 443, False),
        ("relay.example.com:8443", "relay.example.com", None, False),
        ("other.example:1, RELAY.example.com:8443", "relay.example.com", 8443, True),
        ("relay.example.com", "relay.example.com", 8443, True),
        ("relay.example.com", "relay.example.com", None, True),
        (".example.com", "relay.example.com", 8443, True),
        ("example.com", "relay.example.com", 8443, True),
        ("example.com:8443", "relay.example.com", 8443, True),
        ("example.com:8443", "relay.example.com", 9443, False),
        ("ample.com", "relay.example.com", 8443, False),
        ("*", "relay.example.com", 8443, True),
        ("::1", "::1", 8443, True),
        ("[::1]:8443", "::1", 8443, True),
        ("[::1]:8443", "::1", 443, False),
        ("relay.example.com:8443", "relay.example.co", 8443, False),
    ],
)
def test_no_proxy_entries_with_a_port(
    monkeypatch: pytest.MonkeyPatch, no_proxy: str, host: str, port: int | None, exempt: bool
) -> None:
    """``relay.example.com:8443`` (what urllib and curl take) exempts that host on that
    port; a bare host any port; suffixes and ``*`` as before."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:8080")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    expected = None if exempt else ProxyConfig("proxy.local", 8080)
    assert proxy_from_environment(host, port) == expected


def test_the_agent_honours_a_no_proxy_entry_with_the_relays_port(
    secret: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://u:pw@proxy.local:3128")
    args: dict[str, object] = {
        "device": "dev1",
        "secret_file": secret,
        "services": ["ssh=localhost:22"],
    }
    for server, no_proxy, proxied in [
        ("https://relay.example.com:8443", "relay.example.com:8443", False),
        ("https://relay.example.com:8443", "relay.example.com:443", True),
        ("https://relay.example.com", "relay.example.com:443", False),  # the default port
        ("https://[::1]:8443", "[::1]:8443", False),
    ]:
        monkeypatch.setenv("NO_PROXY", no_proxy)
        config = load_agent_config(server=server, **args)  # type: ignore[arg-type]
        assert (config.proxy is not None) is proxied, (server, no_proxy)


# --- proxy URLs whose user name or password hold '@' with '/', '?' or '#' --------------

PERCENT_ENCODE = (
    "percent-encode the user name and password ('@' as %40, ':' as %3A, '/' as %2F, "
    "'?' as %3F, '#' as %23)"
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # An e-mail address as the user name, a '#' in the password: the password was
        # taken as the port and printed ("invalid port 'Summer2024'").
        (
            "http://alice@corp.example:Summer2024#Secret@proxy.corp.example:3128",
            "http://***@proxy.corp.example:3128",
        ),
        # '@' then '#' in the password: the password's tail became the proxy host.
        (
            "http://bob:hunter2@TopSecret#1@proxy.corp.example:3128",
            "http://***@proxy.corp.example:3128",
        ),
        ("http://bob:hunter2@Top?Secret@proxy:3128", "http://***@proxy:3128"),
        ("http://bob:hunter2@Top/Secret@proxy:3128", "http://***@proxy:3128"),
        ("http://bob@home:hunter2@proxy:3128", "http://***@proxy:3128"),  # two '@'
        ("bob:hunter2@Top#Secret@proxy:3128", "***@proxy:3128"),
        # What looks like "SCHEME://" inside a password is no scheme to show.
        ("bob:hunter2://Secret@proxy:3128", "***@proxy:3128"),
    ],
)
def test_proxy_credentials_that_cannot_be_split_safely_are_refused(url: str, shown: str) -> None:
    with pytest.raises(ConfigError) as info:
        ProxyConfig.parse(url)
    assert str(info.value) == f"proxy URL {shown}: {PERCENT_ENCODE}"
    for secret_part in ("alice", "bob", "hunter2", "Summer2024", "Secret", "corp.example:S"):
        assert secret_part not in str(info.value)


def test_percent_encoded_credentials_still_work() -> None:
    proxy = ProxyConfig.parse("http://alice%40corp.example:Summer%232024%40x@proxy:3128")
    assert proxy.host == "proxy" and proxy.port == 3128
    assert (
        proxy.authorization
        == "Basic " + base64.b64encode(b"alice@corp.example:Summer#2024@x").decode()
    )


def test_relay_urls_with_an_at_sign_show_nothing_before_it() -> None:
    for server in ("https://u:pw#x@relay:8443", "https://u:pw@relay:x", "https://u@v:pw@relay"):
        with pytest.raises(ConfigError) as info:
            relay_websocket_url(server, "/p")
        shown = "https://***@" + server.rpartition("@")[2]
        assert str(info.value) == (
            f"relay URL {shown}: a relay URL carries no user name or password"
        )


# --- host names IDNA cannot encode ---------------------------------------------------

LONG_LABEL = "a" * 64
LONG_NAME = ".".join(["a" * 63] * 4)  # 255 characters
HOST_RULE = (
    "(expected dot-separated labels of 1-63 letters, digits, '-' or '_', at most 253 "
    "characters in all)"
)


@pytest.mark.parametrize(
    "host", ["relay..example.com", f"{LONG_LABEL}.example.com", LONG_NAME, ".relay", "a..", "é..x"]
)
def test_host_names_idna_cannot_encode_are_refused_at_start(
    secret: Path, tmp_path: Path, host: str
) -> None:
    """getaddrinfo raised UnicodeError (no OSError) for these at every connect: the
    agent logged a traceback forever, a service's channel went unanswered."""
    args: dict[str, object] = {
        "server": "https://relay.example.com:8443",
        "device": "dev1",
        "secret_file": secret,
        "services": ["ssh=localhost:22"],
    }
    cases: list[tuple[dict[str, object], str]] = [
        ({"server": f"https://{host}:8443"}, f"relay URL https://{host}:8443"),
        ({"proxy": f"http://{host}:3128"}, f"proxy URL http://{host}:3128"),
        ({"services": [f"bad={host}:22"]}, "service bad"),
        ({"services": [f"bad=tls://localhost:22?name={host}"]}, "service bad: TLS name"),
    ]
    for change, what in cases:
        with pytest.raises(ConfigError) as info:
            load_agent_config(**{**args, **change})  # type: ignore[arg-type]
        assert str(info.value) == f"{what}: invalid host name {host!r} {HOST_RULE}"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'server = "https://relay:8443"\ndevice = "dev1"\nsecret_file = "{secret}"\n'
        f'[services]\nweb = {{ address = "{host}:80" }}\n'
    )
    with pytest.raises(ConfigError) as info:
        load_agent_config(config_file=cfg)
    assert str(info.value) == f"service web: invalid host name {host!r} {HOST_RULE}"


def test_valid_host_names_are_still_taken(secret: Path) -> None:
    for host in (
        "relay.example.com.",
        f"{'a' * 63}.example.com",
        "bücher.example",
        "my_host",
        "10.0.0.1",
    ):
        assert parse_host_port(f"{host}:22", "x") == (host, 22)
        assert relay_websocket_url(f"https://{host}:8443", "/p") == f"wss://{host}:8443/p"
        assert ProxyConfig.parse(f"http://{host}:3128").host == host


def test_the_agent_exits_2_with_a_sentence_for_a_bad_host_name(secret: Path, env: Env) -> None:
    out = env.hatchway(
        "agent", "--server", "https://relay..example.com:8443", "--device", "dev1",
        "--secret-file", str(secret), "--service", "ssh=localhost:22",
        check=False, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.decode() == (
        "hatchway agent: relay URL https://relay..example.com:8443: invalid host name "
        f"'relay..example.com' {HOST_RULE}\n"
    )


# --- a service CA file that is no PEM --------------------------------------------------


def test_a_service_ca_that_is_no_pem_stops_the_agent_at_start(
    secret: Path, tmp_path: Path, env: Env
) -> None:
    """It passed the start check (a file) and made every channel to the service wait
    15 s for the relay's timeout."""
    notpem = tmp_path / "notpem.pem"
    notpem.write_text("this is not a certificate\n")
    out = env.hatchway(
        "agent", "--server", "https://relay:8443", "--device", "dev1",
        "--secret-file", str(secret), "--service", f"badca=tls://127.0.0.1:9?ca={notpem}",
        check=False, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    err = out.stderr.decode()
    assert err.startswith(
        f"hatchway agent: service badca: cannot load CA certificates from {notpem}: "
    )
    assert err.count("\n") == 1 and "Traceback" not in err


# --- [services] keys are service names --------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ('"ssh=evil"', '"localhost:22"'),
        ('" web "', '"localhost:80"'),
        ('"Web"', '"localhost:80"'),
        ('" web "', '{ address = "localhost:80" }'),
    ],
)
def test_toml_service_keys_are_checked_as_names(
    secret: Path, tmp_path: Path, key: str, value: str
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'server = "https://relay:8443"\ndevice = "dev1"\nsecret_file = "{secret}"\n'
        f"[services]\n{key} = {value}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_agent_config(config_file=cfg)
    assert str(info.value) == (
        f"invalid service name {key.strip(chr(34))!r}: use 1-32 of a-z, 0-9, '-' and '_', "
        "starting with a letter or digit"
    )


def test_toml_service_values_are_not_reparsed_as_specs(secret: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    base = f'server = "https://relay:8443"\ndevice = "dev1"\nsecret_file = "{secret}"\n'
    cfg.write_text(base + '[services]\nssh = "evil=localhost:22"\n')
    with pytest.raises(ConfigError) as info:
        load_agent_config(config_file=cfg)
    assert str(info.value) == f"service ssh: invalid host name 'evil=localhost' {HOST_RULE}"
    cfg.write_text(base + '[services]\nweb-1 = "localhost:80"\nv6 = "[fd00::1]:22"\n')
    assert load_agent_config(config_file=cfg).services == {
        "web-1": ServiceTarget("web-1", "localhost", 80),
        "v6": ServiceTarget("v6", "fd00::1", 22),
    }


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("evil=localhost:22", f"x: invalid host name 'evil=localhost' {HOST_RULE}"),
        ("a/b:22", f"x: invalid host name 'a/b' {HOST_RULE}"),
        ("a%b:22", f"x: invalid host name 'a%b' {HOST_RULE}"),
        ("[fe80:::1]:22", "x: invalid IPv6 address 'fe80:::1'"),
    ],
)
def test_host_port_takes_host_name_characters_only(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_host_port(value, "x")
    assert str(info.value) == message
    assert parse_host_port("[::1]:22", "x") == ("::1", 22)
    assert parse_host_port("[::ffff:10.0.0.1]:22", "x") == ("::ffff:10.0.0.1", 22)
