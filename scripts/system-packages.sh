#!/usr/bin/env bash
# Debian packages the tests need: chromium (a real browser opens `groupflow report`'s page),
# prometheus (it scrapes a real run; the Grafana dashboard's queries run against it) and iproute2
# (`ip netns`: the two-host test).
set -euo pipefail
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
export DEBIAN_FRONTEND=noninteractive
updated=0
need() {  # need COMMAND PACKAGE [apt-get options]: install PACKAGE unless COMMAND is there
    local command=$1 package=$2; shift 2
    command -v "$command" >/dev/null && return 0
    if ! $SUDO apt-get install -y -qq "$@" "$package" >/dev/null; then
        [ $updated = 1 ] || { $SUDO apt-get update -qq; updated=1; }
        $SUDO apt-get install -y -qq "$@" "$package" >/dev/null
    fi
    echo "installed $package"
}
need chromium chromium                                  # with its recommended fonts
need prometheus prometheus --no-install-recommends      # the server alone, not the node exporters
need ip iproute2 --no-install-recommends
