#!/usr/bin/env bash
# The test suite: install what is missing (apt packages, the vcsim launcher build, the Python project
# with its test extra), then run every test. Fails on any failure, and when no test ran.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash testbed/setup.sh >/dev/null
python3 -m pip install -q -e '.[test]' 2>&1 | grep -v -E "^(WARNING|DEPRECATION)" || true
ruff check .
status=0
VSPHERE_PROXY_REQUIRE_SERVICES=1 python3 -m pytest -q "$@" || status=$?
if ((status == 5)); then
    echo "scripts/test.sh: pytest collected no tests" >&2
fi
exit "$status"
