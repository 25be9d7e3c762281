#!/usr/bin/env bash
# Installs what `conclave bench` compares against and cargo does not provide:
# nats-server (Debian package `nats-server`) for the JetStream rows. The bench
# itself never installs software; without nats-server it stops and names this
# script (or run it with `--jetstream none`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/apt-install nats-server nats-server
