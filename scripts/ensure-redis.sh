#!/usr/bin/env bash
# Makes sure `redis-server` is on PATH: installs Debian's package when it is missing and we can
# (root with apt-get); otherwise says exactly what to run. Sourced by the other scripts.
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server missing: installing Debian's redis-server package" >&2
    apt-get update -qq >/dev/null || echo "apt-get update failed; trying the install anyway" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing: run 'sudo apt-get install -y redis-server' (Debian/Ubuntu) and retry" >&2
    exit 1
  fi
fi
