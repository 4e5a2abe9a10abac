#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh Debian machine (as root) and run it.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  # gcc and python3-dev: pip compiles hatchway's hot modules (setup.py, mypyc).
  for pkg in gcc python3-dev openssh-server openssh-client iptables iproute2 curl procps tinyproxy-bin nginx chromium slapd ldap-utils; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[server,test,speedups]'

.venv/bin/ruff check src tests bench setup.py
.venv/bin/ruff format --check src tests bench setup.py
.venv/bin/mypy
.venv/bin/pytest -q "$@"
if [ $# -eq 0 ]; then
  # The same tests of the compiled modules again, on their Python source
  # (what a build without a C compiler runs).
  HATCHWAY_NO_EXTENSIONS=1 .venv/bin/pytest -q \
    tests/test_mux_frames.py tests/test_mux_session.py tests/test_web_framing.py \
    tests/test_tunnel_endpoint.py tests/test_web_repeat.py tests/test_web.py \
    tests/test_connection_memory.py tests/test_extensions.py
fi
