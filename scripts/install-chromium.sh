#!/usr/bin/env bash
# Debian's Chromium, which one test uses to render the HTML report headless. Idempotent; uses sudo
# when not root. On a machine without apt, install Chromium yourself (any recent version).
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: no apt-get here; install Chromium (a 'chromium' on PATH) yourself" >&2
    exit 1
fi
as_root=""
if [ "$(id -u)" -ne 0 ]; then
    as_root="sudo"
fi
$as_root apt-get update -qq
DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium >/dev/null
command -v chromium
