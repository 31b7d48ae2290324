#!/bin/sh
# The browser test (tests/test_browser.py) drives Debian's chromium with Playwright. Install it when it is missing.
# Where there is no apt-get (macOS, other distributions) say so and go on: that one test is then skipped.
command -v chromium >/dev/null 2>&1 && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium not found and no apt-get here: tests/test_browser.py will be skipped" >&2
    exit 0
fi
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
echo "installing Debian's chromium for the browser test" >&2
$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium >/dev/null
}
