#!/usr/bin/env bash
# Debian packages the tests need: chromium (a real browser opens `groupflow report`'s page) and
# prometheus (it scrapes a real run; the Grafana dashboard's queries run against it).
set -euo pipefail
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
export DEBIAN_FRONTEND=noninteractive
updated=0
need() {  # need COMMAND [apt-get options]: install the package of that name unless it is there
    local name=$1; shift
    command -v "$name" >/dev/null && return 0
    if ! $SUDO apt-get install -y -qq "$@" "$name" >/dev/null; then
        [ $updated = 1 ] || { $SUDO apt-get update -qq; updated=1; }
        $SUDO apt-get install -y -qq "$@" "$name" >/dev/null
    fi
    echo "installed $name"
}
need chromium                               # with its recommended fonts
need prometheus --no-install-recommends     # the server alone, not the node exporters
