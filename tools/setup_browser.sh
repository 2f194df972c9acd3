#!/usr/bin/env bash
# Debian's chromium for the demo's headless-browser test. Installs it with apt when it is missing and we are root;
# otherwise says what to do (the test then fails, naming the fix: it is never skipped).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -n "${CHROMIUM:-}" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  chromium --version 2>/dev/null | head -1 || true
else
  echo "chromium is missing: install it (apt-get install chromium) or set CHROMIUM=/path/to/chromium" >&2
fi
