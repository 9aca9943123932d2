#!/usr/bin/env bash
# The demo on the embedded default: install what is missing, start vcsim with the testbed topology,
# and run vsphere-proxy against it. Works on a fresh Debian machine (apt + pip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash testbed/setup.sh >/dev/null
python3 -m pip install -q -e . 2>&1 | grep -v -E "^(WARNING|DEPRECATION)" || true
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
python3 -m testbed demo --config-out "$workdir/vsphere-proxy.yaml" "$@"
