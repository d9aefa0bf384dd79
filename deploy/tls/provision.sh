#!/usr/bin/env bash
# Everything the coordinator's operator needs before `fedbreast server start`, in one go:
# the CA, the SuperLink certificate and one key pair per site. Safe to run again (each step
# keeps what exists), e.g. to add a site.
#
#   deploy/tls/provision.sh OUT_DIR --host superlink.example.org [--host 10.0.0.5] SITE ...
#   -> OUT_DIR/ca.crt ca.key server.crt server.key, OUT_DIR/sites/SITE/site.key(.pub)
source "$(dirname "$0")/common.sh"
[[ $# -ge 1 ]] || die "usage: provision.sh OUT_DIR [--host NAME ...] SITE ..."
OUT="$1"; shift
HOSTS=(); SITES=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --host) [[ $# -ge 2 ]] || die "--host needs a value"; HOSTS+=("$2"); shift 2 ;;
        -*) die "unknown option $1" ;;
        *) SITES+=("$1"); shift ;;
    esac
done
HERE="$(dirname "$0")"
bash "$HERE/make-ca.sh" "$OUT"
bash "$HERE/make-server-cert.sh" "$OUT" "${HOSTS[@]}"
for s in "${SITES[@]}"; do bash "$HERE/make-site-key.sh" "$OUT/sites" "$s"; done
