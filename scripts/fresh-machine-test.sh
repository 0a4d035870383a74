#!/usr/bin/env bash
# The proof that the README's two commands need nothing but what they install themselves.
#
# A fresh Debian 12 root file system (debootstrap, from the mirror apt uses here) gets a clean
# clone of this repository (its committed HEAD), and inside it, with
# `buildah run --isolation chroot --network host`, runs what the README tells a stranger on a
# fresh Debian 12 machine, as root and on Debian's own Python:
#
#   apt-get update && apt-get install -y make     # the README's "On a fresh Debian 12"
#   make test
#   make run                                      # until GET /healthz answers 200
#
# Nothing of this machine goes in but what any machine of this workplace has and no project
# installs: its way to the registries (the CA bundle of its TLS proxy, /etc/hosts, apt's
# sources and their Acquire settings, PIP_CERT). Services are not started by apt in the
# root file system (policy-rc.d, as in every Debian container): the tests start their own.
#
# Not part of `make test` (it runs it). Needs root, buildah, debootstrap and git; about half
# an hour on 2 cores, most of it the suite and apt. Usage:
#
#   scripts/fresh-machine-test.sh            # FRESH_DIR: where it works (kept on failure)
#
# The pristine debootstrap output is kept in ${CHATSERVER_TEST_CACHE:-~/.cache/chatserver-tests}
# (fresh-debian12-*.tar, named by mirror, architecture and debootstrap version), so a second
# run starts from the same fresh system without debootstrapping again; delete it to rebuild.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUITE=bookworm
CACHE=${CHATSERVER_TEST_CACHE:-${HOME:-/root}/.cache/chatserver-tests}
FRESH_DIR=${FRESH_DIR:-/var/tmp/chatserver-fresh-$$}
RUN_PORT=${RUN_PORT:-18080}
START=$(date +%s)

say() { printf 'fresh-machine-test [%4ds] %s\n' "$(($(date +%s) - START))" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (debootstrap, buildah)"
for tool in buildah debootstrap git tar capsh; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] || die "$tool is not installed"
done
PATH=$PATH:/usr/sbin:/sbin

# The Debian archive apt uses here (a source of bookworm's main, not the security one).
MIRROR=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' \
    | awk -v s="$SUITE" '$2 == s && $1 !~ /security/ {print $1; exit}')
[[ -n $MIRROR ]] || die "no Debian $SUITE mirror among apt's sources"
ARCH=$(dpkg --print-architecture)
KEY=$(printf '%s %s %s' "$MIRROR" "$ARCH" "$(debootstrap --version)" | sha256sum | cut -c1-16)
BASE=$CACHE/fresh-debian12-$KEY.tar

mkdir -p "$FRESH_DIR" "$CACHE"
BUILDAH=(buildah --root "$FRESH_DIR/storage" --runroot "$FRESH_DIR/run" --storage-driver vfs)
CONTAINER=""
cleanup() {
    local status=$?
    if ((status == 0)); then
        if [[ -n $CONTAINER ]]; then
            "${BUILDAH[@]}" umount "$CONTAINER" >/dev/null 2>&1 || true
            "${BUILDAH[@]}" rm "$CONTAINER" >/dev/null 2>&1 || true
        fi
        rm -rf "$FRESH_DIR"
    else
        say "left for a look: $FRESH_DIR (its log: $FRESH_DIR/log); inside:" \
            "${BUILDAH[*]} run --isolation chroot --network host $CONTAINER -- bash;" \
            "then ${BUILDAH[*]} rm $CONTAINER && rm -rf $FRESH_DIR"
    fi
}
trap cleanup EXIT

# 1. A fresh Debian 12: debootstrap's default variant (Debian's required and important
#    packages), nothing else.
if [[ ! -f $BASE ]]; then
    say "debootstrap $SUITE from $MIRROR"
    rootfs=$FRESH_DIR/debootstrap
    debootstrap --arch="$ARCH" "$SUITE" "$rootfs" "$MIRROR" >"$FRESH_DIR/debootstrap.log" 2>&1 \
        || die "debootstrap failed: $(tail -5 "$FRESH_DIR/debootstrap.log")"
    tar -C "$rootfs" --numeric-owner --xattrs -cf "$BASE.part" .
    mv "$BASE.part" "$BASE"
    rm -rf "$rootfs"
fi
CONTAINER=$("${BUILDAH[@]}" from --name "chatserver-fresh-$$" scratch)
ROOT=$("${BUILDAH[@]}" mount "$CONTAINER")
tar -C "$ROOT" --numeric-owner --xattrs -xf "$BASE"
say "fresh Debian 12 root file system ready ($(du -sh "$ROOT" | cut -f1))"

# 2. What every machine of this workplace has, no project installs: the way to the
#    registries. (A machine with open access would need none of it.)
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    install -d "$ROOT/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi
cp /etc/hosts "$ROOT/etc/hosts"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
rm -f "$ROOT/etc/apt/sources.list"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] && install -D -m 0644 "$f" "$ROOT$f"
done
for f in /etc/apt/apt.conf.d/*; do  # the mirror's Acquire settings (a snapshot's dates)
    grep -q '^Acquire::Check' "$f" 2>/dev/null && install -m 0644 "$f" "$ROOT$f"
done
# apt starts no service here: the tests start their own throwaway servers.
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 0755 "$ROOT/usr/sbin/policy-rc.d"

# 3. A clean clone of what is committed.
git clone --quiet --no-hardlinks "$REPO" "$ROOT/root/chatserver"
git -C "$ROOT/root/chatserver" checkout --quiet "$(git -C "$REPO" rev-parse HEAD)"
say "clean clone of $(git -C "$REPO" rev-parse --short HEAD) in /root/chatserver"

# 4. The README's commands, inside, with the capabilities of a root shell here (the tests
#    mount, chroot and build an image): every one this process may hand on.
CAPS=()
bounding=$((16#$(awk '/^CapBnd:/ {print $2}' /proc/self/status)))
last_cap=$(cat /proc/sys/kernel/cap_last_cap)
for ((cap = 0; cap <= last_cap; cap++)); do
    if (((bounding >> cap) & 1)); then
        name=$(capsh --decode=$(printf '%x' $((1 << cap))) | cut -d= -f2)
        CAPS+=(--cap-add "${name^^}")
    fi
done
inside() {
    "${BUILDAH[@]}" run --isolation chroot --network host "${CAPS[@]}" \
        --env HOME=/root --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --workingdir /root/chatserver "$CONTAINER" -- bash -euo pipefail -c "$1"
}
LOG=$FRESH_DIR/log
FAILED=()
phase() {  # phase NAME COMMAND [SHOWN]: run COMMAND inside, its output to the log, timed
    local name=$1 began=$(date +%s)
    say "$name: ${3:-$2}"
    if ! inside "$2" >>"$LOG" 2>&1; then
        tail -40 "$LOG" >&2
        say "$name: FAILED after $(($(date +%s) - began)) s"
        FAILED+=("$name")
        return 1
    fi
    say "$name: done in $(($(date +%s) - began)) s"
}

phase prerequisites 'apt-get update -q && apt-get install -y -q make' || die "no make"
# make run goes on after a failed make test: one flaky test must not hide whether it works.
phase "make test" 'make test' || true
SUMMARY=$(grep -E '^=+ .*(passed|failed).* =+$' "$LOG" | tail -1 | tr -d '=' | xargs || true)
grep -E '^(FAILED|ERROR|SKIPPED) ' "$LOG" | sed 's/^/    /' >&2 || true
phase "make run" "
    setsid make run ARGS='--port $RUN_PORT' >/tmp/run.log 2>&1 &
    server=\$!
    for _ in \$(seq 300); do
        if python3 -c 'import sys, urllib.request
sys.exit(urllib.request.urlopen(\"http://127.0.0.1:$RUN_PORT/healthz\", timeout=2).status != 200)' 2>/dev/null
        then
            echo 'GET /healthz: 200'
            grep -m1 'listening' /tmp/run.log
            kill -TERM -- -\$server
            wait \$server || true
            exit 0
        fi
        kill -0 \$server 2>/dev/null || { cat /tmp/run.log; exit 1; }
        sleep 1  # the pace of the looks: /healthz is polled, with a deadline
    done
    kill -TERM -- -\$server; cat /tmp/run.log; exit 1" "make run, until GET /healthz answers 200" || true
grep -A1 'GET /healthz: 200' "$LOG" | sed 's/^/    /' >&2
WALL="wall time $(($(date +%s) - START)) s"
if ((${#FAILED[@]})); then
    die "${FAILED[*]} (make test: ${SUMMARY:-no summary line}); $WALL"
fi
say "PASSED: make test (${SUMMARY:-no summary line}), make run answered /healthz; $WALL"
