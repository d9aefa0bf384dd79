#!/usr/bin/env bash
# Register a site's public key with the running SuperLink under a stable name (run by the
# coordinator). The name is the site's identity in every report; the SuperNode presenting
# the matching private key is accepted, any other key is refused (exit code 305).
# Idempotent: a key that is already registered is reported, not registered twice.
#
#   deploy/tls/register-site.sh SITE_NAME PUBLIC_KEY [FEDERATION]
# FEDERATION is the connection name in $FLWR_HOME/config.toml (`fedbreast server start`
# writes it; default "fedbreast"). `flwr` is taken from PATH or FLWR_BIN.
source "$(dirname "$0")/common.sh"
[[ $# -ge 2 ]] || die "usage: register-site.sh SITE_NAME PUBLIC_KEY [FEDERATION]"
SITE="$1"; PUB="$2"; FED="${3:-fedbreast}"
FLWR="${FLWR_BIN:-flwr}"
need "$FLWR" "to talk to the SuperLink (pip install fedbreast)"
[[ -s "$PUB" ]] || die "public key $PUB not found"
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
set +e
OUTPUT="$("$FLWR" supernode register "$PUB" "$FED" --name "$SITE" --format json 2>&1)"
RC=$?
set -e
if [[ $RC -eq 0 ]] && grep -q '"success": *true' <<<"$OUTPUT"; then
    say "registered $SITE: $(grep -o '"node-id": *[0-9]*' <<<"$OUTPUT" | head -1)"
    exit 0
fi
if grep -qi "already" <<<"$OUTPUT"; then
    say "$SITE: this public key is already registered"
    exit 0
fi
echo "$OUTPUT" >&2
die "could not register $SITE (flwr exit code $RC)"
