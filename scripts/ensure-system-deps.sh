#!/usr/bin/env bash
# Make sure the system binaries the tests need are installed (Debian packages):
#   redis-server, a Postgres server (initdb under /usr/lib/postgresql/*/bin), chromium,
#   promtool (prometheus), nginx, python3-venv for `make venv` (for Debian's own
#   /usr/bin/python3 too: tests/system/test_install.py builds a venv with it), and buildah and
#   debootstrap, which build the Docker image for real (tests/system/test_image.py), and git
#   (bench results record the commit they measured: tests/system/test_bench_smoke.py).
# As root, missing packages are installed with apt-get; otherwise the script names them and
# fails. It never starts system services: the tests start their own throwaway servers.
# Quiet and idempotent when everything is present.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" || -x "/usr/bin/$1" ]]; }

# Prints the Debian packages whose binaries are missing, one per line.
missing_packages() {
    have redis-server || echo redis-server
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || echo postgresql
    have pgbouncer || echo pgbouncer
    [[ -x /usr/bin/chromium ]] || echo chromium
    have promtool || echo prometheus
    have nginx || echo nginx
    have buildah || echo buildah
    have debootstrap || echo debootstrap
    have git || echo git
    if [[ -x /usr/bin/python3 ]]; then
        /usr/bin/python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || echo python3-venv
    else
        python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || echo python3-venv
    fi
}

mapfile -t missing < <(missing_packages)
if ((${#missing[@]} == 0)); then
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    echo "ensure-system-deps: missing Debian packages: ${missing[*]}" >&2
    echo "ensure-system-deps: as root run: apt-get install -y ${missing[*]}" >&2
    echo "ensure-system-deps: (or run \`make deps\` as root)" >&2
    exit 1
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-system-deps: missing ${missing[*]} and no apt-get to install them" >&2
    exit 1
fi

echo "ensure-system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${missing[@]}"

# a package that installed without the binary we look for is still a failure
mapfile -t still < <(missing_packages)
if ((${#still[@]} != 0)); then
    echo "ensure-system-deps: still missing after apt-get install: ${still[*]}" >&2
    exit 1
fi
