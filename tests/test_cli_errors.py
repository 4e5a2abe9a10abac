"""Mistakes in what the user or the device's operator gives the client and the agent:
each is one sentence and a non-zero exit status, at once, never a traceback, and never
a proxy password."""

from __future__ import annotations

import base64
import json
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import HATCHWAY, Env, device_online, free_port, wait_for
from tests.test_client_streams import ConnectProxy, Service

pytestmark = pytest.mark.timeout(120)

PASSWORD = "S3cret-pw"


def _one_sentence(out: subprocess.CompletedProcess[bytes], status: int) -> str:
    err = out.stderr.decode()
    assert out.returncode == status, (out.returncode, err)
    assert "Traceback" not in err and PASSWORD not in err, err
    assert len(err.strip().splitlines()) == 1, err
    return err


def _run(
    args: list[str], environ: dict[str, str], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(args, input=stdin, capture_output=True, env=environ, timeout=60)


def _agent(env: Env, tmp_path: Path, *extra: str, environ: dict[str, str] | None = None) -> str:
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_text("s3cret\n")
        secret.chmod(0o600)
    args = [*HATCHWAY, "agent", "--device", "dev1", "--secret-file", str(secret)]
    if "--config" not in extra:
        args += ["--server", "https://localhost:8443", "--service", "ssh=localhost:22"]
    out = _run([*args, *extra], environ or env.environ())
    return _one_sentence(out, 2)


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ("https://[::1", "invalid IPv6 address"),
        ("https://localhost:99999", "port 99999 out of range"),
        ("https://localhost:abc", "invalid port 'abc'"),
        ("https://relay example.com", "may not contain spaces"),
        ("https://relay/some/path", "without a path"),
    ],
)
def test_bad_relay_urls_are_refused_at_start(
    env: Env, tmp_path: Path, server: str, message: str
) -> None:
    assert message in _agent(env, tmp_path, "--server", server)
    out = _run([*HATCHWAY, "login", server, "--user", "u", "--password-stdin"], env.environ())
    assert message in _one_sentence(out, 1)


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        (f"http://alice:{PASSWORD}@:3128", "proxy URL http://***@:3128: no host"),
        (f"http://alice:{PASSWORD}@proxy:99999", "port 99999 out of range"),
        (f"http://alice:{PASSWORD}@proxy:abc", "proxy:abc: invalid port (expected 1-65535)"),
        (f"https://alice:{PASSWORD}@proxy:3128", "unsupported proxy scheme 'https'"),
        (f"http://alice:{PASSWORD}@[::1:3128", "invalid IPv6 address"),
    ],
)
def test_bad_proxies_are_refused_at_start_without_their_password(
    env: Env, tmp_path: Path, proxy: str, message: str
) -> None:
    assert message in _agent(env, tmp_path, "--proxy", proxy)
    environ = env.environ()
    environ["HTTPS_PROXY"] = proxy
    err = _agent(env, tmp_path, environ=environ)
    assert message.replace("proxy URL", "HTTPS_PROXY") in err
    # The client checks HTTPS_PROXY the same way, for API calls and streams.
    env.config_dir.mkdir(mode=0o700, exist_ok=True)
    login = {"server": f"https://localhost:{free_port()}", "user": "u", "token": "t"}
    (env.config_dir / "login.json").write_text(json.dumps(login))
    for args in (["devices"], ["proxy", "dev1", "ssh"], ["forward", "dev1", "ssh", "--no-mux"]):
        out = _run([*HATCHWAY, *args], environ)
        assert "HTTPS_PROXY" in _one_sentence(out, 1)


def test_agent_config_mistakes_are_sentences(env: Env, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    base = 'server = "https://relay:8443"\ndevice = "dev1"\nsecret_file = "secret"\n'
    config.write_text(base + 'proxy = 3128\n[services]\nssh = "localhost:22"\n')
    assert "proxy must be a string" in _agent(env, tmp_path, "--config", str(config))
    config.write_text(base + '[services]\nweb = { address = "h:80", host_header = 5 }\n')
    assert "host_header must be a string" in _agent(env, tmp_path, "--config", str(config))
    config.write_bytes(b'server = "https://relay:8443"\n# caf\xe9\n')
    assert "is not UTF-8 text" in _agent(env, tmp_path, "--config", str(config))
    (tmp_path / "secret").write_bytes(b"\xff\xfe")
    assert "secret file" in _agent(env, tmp_path)
    help_text = _run([*HATCHWAY, "agent", "--help"], env.environ()).stdout.decode()
    assert "process list" in " ".join(help_text.split())


@pytest.fixture
def online(env: Env) -> Iterator[tuple[Env, Service, str]]:
    """dev1 exposes ssh and http (both the echo service), dev2 only echo, dev3 is
    registered and never connects."""
    echo = Service("echo")
    _, port, password = env.start_relay()
    assert password is not None
    url = f"https://localhost:{port}"
    target = f"127.0.0.1:{echo.port}"
    env.start_agent(url, "dev1", env.add_device("dev1"), [f"ssh={target}", f"http={target}"])
    env.start_agent(url, "dev2", env.add_device("dev2"), [f"echo={target}"])
    env.add_device("dev3")
    env.login(url, "admin", password)
    for device in ("dev1", "dev2"):
        wait_for(lambda d=device: device_online(env, d), 20, f"{device} online")
    try:
        yield env, echo, url
    finally:
        echo.close()


def test_agent_never_logs_its_proxy_password(online: tuple[Env, Service, str]) -> None:
    env, echo, url = online
    proxy = ConnectProxy()
    agent = env.start_agent(
        url,
        "dev1",
        env.root / "dev1.secret",
        [f"echo=127.0.0.1:{echo.port}"],
        extra=["--proxy", f"http://alice:Wrong-{PASSWORD}@127.0.0.1:{proxy.port}", "-v"],
    )
    agent.wait_output("the proxy refused CONNECT: HTTP/1.1 407", timeout=20)
    out = agent.output()
    assert PASSWORD not in out and "Traceback" not in out
    assert base64.b64encode(f"alice:Wrong-{PASSWORD}".encode()).decode() not in out
    proxy.close()


def _fake_ssh(tmp_path: Path) -> dict[str, str]:
    """An ``ssh`` that records its arguments and runs the ProxyCommand through the
    shell as OpenSSH does (after its %-expansion), feeding it a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "ssh"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, subprocess, sys\n"
        "args = sys.argv[1:]\n"
        "json.dump(args, open(os.environ['FAKE_SSH_ARGS'], 'w'))\n"
        "options = [args[i + 1] for i, a in enumerate(args) if a == '-o']\n"
        "command = next(o for o in options if o.startswith('ProxyCommand='))\n"
        "command = command.split('=', 1)[1].replace('%%', '%')\n"
        "done = subprocess.run(['/bin/sh', '-c', 'exec ' + command],\n"
        "                      input=b'through the ProxyCommand', capture_output=True)\n"
        "sys.stdout.buffer.write(done.stdout)\n"
        "sys.stderr.buffer.write(done.stderr)\n"
        "sys.exit(done.returncode)\n"
    )
    script.chmod(0o755)
    environ = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SSH_ARGS": str(tmp_path / "a")}
    return environ


def test_ssh_quotes_its_proxy_command_and_checks_names(
    online: tuple[Env, Service, str], tmp_path: Path
) -> None:
    env, _, _ = online
    environ = env.environ() | _fake_ssh(tmp_path)
    # A Python whose path holds a space and a %-token OpenSSH would expand.
    venv = tmp_path / "my venv %h"
    venv.symlink_to(sys.prefix, target_is_directory=True)
    python = str(venv / "bin" / Path(sys.executable).name)
    out = _run([python, "-m", "hatchway", "ssh", "root@dev1", "-p", "22", "true"], environ)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"through the ProxyCommand"
    args = json.loads((tmp_path / "a").read_text())
    command = args[args.index("-o") + 1].split("=", 1)[1].replace("%%", "%")
    assert shlex.split(command) == [python, "-P", "-m", "hatchway", "proxy", "dev1", "ssh"]
    assert args[4:] == ["-l", "root", "dev1", "-p", "22", "true"]
    # Names that are not a device id or a service name never reach the shell.
    planted = tmp_path / "planted"
    for ssh_args, message in [
        (["--service", f"ssh$(touch {planted})", "dev1"], "invalid service name"),
        (["root@dev1;touch${IFS}x"], "invalid device id"),
        (["root@-oProxyCommand=sh"], "invalid device id"),
        (["root@"], "expected [USER@]DEVICE"),
    ]:
        out = _run([*HATCHWAY, "ssh", *ssh_args], environ)
        err = out.stderr.decode()
        assert out.returncode != 0 and message in err and "Traceback" not in err, err
    assert not planted.exists()
    # What no connection could get past is said before OpenSSH starts.
    (tmp_path / "a").unlink()
    for target, message in [
        ("dev3", "device dev3 is offline"),
        ("nope", "no device nope you may see"),
        ("dev2", "service ssh is not exposed by dev2"),
    ]:
        out = _run([*HATCHWAY, "ssh", target, "true"], environ)
        assert message in _one_sentence(out, 1)
    assert not (tmp_path / "a").exists()  # ssh never ran


def test_ssh_never_runs_a_hatchway_from_the_current_directory(
    online: tuple[Env, Service, str], tmp_path: Path
) -> None:
    """OpenSSH runs the ProxyCommand in the user's current directory, and ``python -m``
    would put that first on sys.path: a ./hatchway package (a cloned repository, a
    download folder) ran instead of the installed one, with the user's token at hand."""
    env, _, _ = online
    environ = env.environ() | _fake_ssh(tmp_path)
    untrusted = tmp_path / "checkout"
    (untrusted / "hatchway").mkdir(parents=True)
    (untrusted / "hatchway" / "__init__.py").write_text("")
    ran = tmp_path / "ran"
    (untrusted / "hatchway" / "__main__.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('ran')\n"
    )
    (untrusted / "hatchway.py").write_text(f"open({str(ran)!r}, 'w').write('ran')\n")
    # The outer command is the console script's equivalent: nothing from the cwd.
    out = subprocess.run(
        [sys.executable, "-P", "-m", "hatchway", "ssh", "dev1", "true"],
        cwd=untrusted,
        capture_output=True,
        env=environ,
        timeout=60,
    )
    assert (out.returncode, out.stderr) == (0, b"")
    assert out.stdout == b"through the ProxyCommand"  # the real proxy, to the echo service
    assert not ran.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dev3"], "device dev3 is offline"),
        (["dev1", "--service", "vnc"], "service vnc is not exposed by dev1"),
        (["dev2"], "dev2 exposes no web UI"),
        (["nope"], "no device nope you may"),
    ],
)
def test_open_checks_the_device_first(
    online: tuple[Env, Service, str], args: list[str], message: str
) -> None:
    env, _, _ = online
    for extra in (["--print-url"], []):
        out = env.hatchway("open", *args, *extra, check=False)
        assert message in _one_sentence(out, 1)
        assert out.stdout == b""
    url = env.hatchway("open", "dev1", "--print-url").stdout.decode()
    assert "grant=" in url
    # Unless told not to check: the relay's page then says what is wrong.
    if args[0] != "nope":
        url = env.hatchway("open", *args, "--print-url", "--no-check").stdout.decode()
        assert "grant=" in url


def test_forward_checks_the_target_before_listening(online: tuple[Env, Service, str]) -> None:
    """What no connection could get past is one sentence at start, and nothing listens;
    an offline device is only noted (it may come back while forward runs)."""
    env, _, _ = online
    for args, message in [
        (["nope", "ssh"], "no device nope you may see"),
        (["dev1", "vnc"], "service vnc is not exposed by dev1"),
        (["dev1", "bad!svc"], "invalid service name"),
        (["dev1", "ssh", "--bind", ""], "--bind: give an address"),
    ]:
        out = env.hatchway("forward", *args, check=False, timeout=30)
        assert message in _one_sentence(out, 1)
        assert out.stdout == b""
    offline = env.spawn("forward-dev3", [*HATCHWAY, "forward", "dev3", "ssh"])
    offline.wait_output(r"listening on 127\.0\.0\.1:\d+")
    assert "device dev3 is offline for now" in offline.output()
    offline.stop()


def test_forward_says_why_it_cannot_listen(online: tuple[Env, Service, str]) -> None:
    """A port in use, an address not on this host, a name that does not resolve: the
    system's reason in a sentence, not asyncio's wrapping of it."""
    env, _, _ = online
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for args, message in [
            (
                ["--local-port", str(port)],
                f"cannot listen on 127.0.0.1:{port}: address already in use",
            ),
            (
                ["--bind", "192.0.2.1"],
                "cannot listen on 192.0.2.1: cannot assign requested address",
            ),
            (["--bind", "nohost.invalid"], "cannot listen on nohost.invalid: host not found"),
        ]:
            out = env.hatchway("forward", "dev1", "ssh", *args, check=False, timeout=30)
            assert _one_sentence(out, 1) == f"hatchway: {message}\n"
            assert out.stdout == b""


def test_closed_standard_streams_are_not_a_crash(online: tuple[Env, Service, str]) -> None:
    """Started with standard input or output closed (``<&-``, ``>&-``): no traceback
    and no abort from libuv; a forward whose output pipe is gone says so."""
    env, _, _ = online
    environ = env.environ()
    # Standard input closed, or /dev/null: nothing to send, the device's half-close
    # comes back (the echo service), and proxy ends cleanly.
    for redirect in ("<&-", "</dev/null"):
        command = f'exec "$@" {redirect}'
        out = _run(["bash", "-c", command, "sh", *HATCHWAY, "proxy", "dev1", "ssh"], environ)
        assert (out.returncode, out.stdout, out.stderr) == (0, b"", b""), (redirect, out)
    out = _run(
        ["bash", "-c", 'exec "$@" </dev/zero', "sh", *HATCHWAY, "proxy", "dev1", "ssh"], environ
    )
    assert "standard input must be a pipe" in _one_sentence(out, 1)
    port = free_port()
    forward = subprocess.Popen(
        [
            "bash",
            "-c",
            'exec "$@" >&-',
            "sh",
            *HATCHWAY,
            "forward",
            "dev1",
            "ssh",
            "--local-port",
            str(port),
        ],
        env=environ,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: _connects(port), 20, "forward listening with stdout closed")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"ping")
            assert conn.recv(4) == b"ping"
        assert forward.poll() is None
    finally:
        forward.terminate()
        _, err = forward.communicate(timeout=30)
    assert b"Traceback" not in err and b"Assertion" not in err, err
    # A pipe whose reader is gone: the port cannot be told, so forward stops.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        out = subprocess.run(
            [*HATCHWAY, "forward", "dev1", "ssh"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=environ,
            timeout=30,
        )
    finally:
        os.close(write_end)
    assert "cannot write the listening address" in _one_sentence(out, 1)


def test_login_with_an_empty_password_on_stdin_asks_nothing_of_the_relay(
    online: tuple[Env, Service, str],
) -> None:
    env, _, url = online
    out = env.hatchway(
        "login", url, "--user", "admin", "--password-stdin", "--ca-file", str(env.ca_file),
        input=b"", check=False,
    )  # fmt: skip
    assert "no password on standard input" in _one_sentence(out, 1)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
