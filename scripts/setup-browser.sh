#!/usr/bin/env bash
# Install Debian's chromium for the server's browser test (tests/test_server_browser.py), which
# Playwright drives with that executable: Playwright's own browser download cannot run here.
# Idempotent and never fatal: without apt, root or the network it says so and the test skips.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: no apt-get here, so no chromium: the browser test will be skipped" >&2
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup: not root, so chromium is not installed (sudo apt-get install chromium);" \
        "the browser test will be skipped" >&2
    exit 0
fi
echo "setup: installing chromium for the browser test (apt-get) ..." >&2
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
    >/tmp/mmret-apt-chromium.log 2>&1; then
    echo "setup: apt-get could not install chromium (see /tmp/mmret-apt-chromium.log);" \
        "the browser test will be skipped" >&2
fi
exit 0
