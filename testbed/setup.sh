#!/usr/bin/env bash
# Prepare the testbed: install Debian's Go toolchain, govmomi sources and redis-server when missing, then build the
# launcher (testbed/vcsim/*.go) offline in GOPATH mode into a cache directory keyed by the sources' hash.
# Idempotent. The binary's path is printed on the last line of stdout; progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
src="$here/vcsim"
packages=(golang-go golang-github-vmware-govmomi-dev redis-server postgresql chromium chromium-driver)

log() { printf 'testbed/setup.sh: %s\n' "$*" >&2; }

installed() {
    local status
    status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]]
}

missing=()
for pkg in "${packages[@]}"; do
    installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        sudo=(sudo)
    fi
    log "installing ${missing[*]}"
    "${sudo[@]}" apt-get update >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi

shopt -s nullglob
sources=("$src"/*.go)
shopt -u nullglob
if ((${#sources[@]} == 0)); then
    log "no Go sources in $src"
    exit 1
fi
# Hash names and contents, in a stable order, so renames and edits both produce a new binary.
digest="$(cd "$src" && LC_ALL=C ls -1 -- *.go | LC_ALL=C sort | while IFS= read -r f; do
    printf '%s\n' "$f"
    sha256sum -- "$f"
done | sha256sum | cut -c1-16)"

cache="${VSPHERE_PROXY_CACHE:-$HOME/.cache/vsphere-proxy}"
binary="$cache/vcsim-launcher-$digest"
if [[ ! -x "$binary" ]]; then
    mkdir -p "$cache"
    log "building $binary"
    tmp="$(mktemp "$cache/.vcsim-launcher-$digest.XXXXXX")"
    trap 'rm -f "$tmp"' EXIT
    (cd "$src" && GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= go build -o "$tmp" .) >&2
    chmod 0755 "$tmp"
    mv -f "$tmp" "$binary"  # atomic: concurrent runs never see a half-written binary
    trap - EXIT
fi
printf '%s\n' "$binary"
