#!/usr/bin/env bash
# Issue the SuperLink's TLS certificate, signed by the CA in OUT_DIR: OUT/server.key and
# OUT/server.crt. Subject alternative names: localhost, 127.0.0.1, ::1 (Flower's own
# runtime processes connect on loopback) plus every HOSTNAME given, which must include the
# name or address sites use in their `superlink` address.
# Idempotent: an existing certificate that is still valid for all those names and signed
# by this CA is kept; otherwise it is re-issued.
#
#   deploy/tls/make-server-cert.sh OUT_DIR [HOSTNAME_OR_IP ...]
#   (FEDBREAST_SERVER_NAMES="a.example.org 10.0.0.5" works too)
source "$(dirname "$0")/common.sh"
[[ $# -ge 1 ]] || die "usage: make-server-cert.sh OUT_DIR [HOSTNAME_OR_IP ...]"
OUT="$1"; shift
need openssl "to issue the server certificate"
[[ -s "$OUT/ca.key" && -s "$OUT/ca.crt" ]] || die "no CA in $OUT: run make-ca.sh $OUT first"

NAMES=(localhost 127.0.0.1 ::1 "$@")
# shellcheck disable=SC2206
[[ -n "${FEDBREAST_SERVER_NAMES:-}" ]] && NAMES+=(${FEDBREAST_SERVER_NAMES})

is_ip() { [[ "$1" =~ ^[0-9.]+$ || "$1" == *:* ]]; }

covers_all() {
    openssl verify -CAfile "$OUT/ca.crt" "$OUT/server.crt" >/dev/null 2>&1 || return 1
    openssl x509 -in "$OUT/server.crt" -noout -checkend 2592000 >/dev/null || return 1  # 30 days left
    local n
    for n in "${NAMES[@]}"; do
        if is_ip "$n"; then
            openssl x509 -in "$OUT/server.crt" -noout -checkip "$n" | grep -q "does match" || return 1
        else
            openssl x509 -in "$OUT/server.crt" -noout -checkhost "$n" | grep -q "does match" || return 1
        fi
    done
}

if [[ -s "$OUT/server.crt" && -s "$OUT/server.key" ]] && covers_all; then
    say "kept existing $OUT/server.crt (valid for: ${NAMES[*]})"
    exit 0
fi

SAN=""
for n in "${NAMES[@]}"; do
    if is_ip "$n"; then SAN+="IP:$n,"; else SAN+="DNS:$n,"; fi
done
SAN="${SAN%,}"
EXT="$(mktemp)"; trap 'rm -f "$EXT" "$OUT/server.csr"' EXIT
cat >"$EXT" <<CONF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SAN
CONF
openssl ecparam -name secp384r1 -genkey -noout -out "$OUT/server.key"
openssl req -new -key "$OUT/server.key" -subj "/CN=${NAMES[3]:-localhost}" -out "$OUT/server.csr"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -days "$CERT_DAYS" -sha384 -extfile "$EXT" -out "$OUT/server.crt" 2>/dev/null
chmod 600 "$OUT/server.key"; chmod 644 "$OUT/server.crt"
openssl verify -CAfile "$OUT/ca.crt" "$OUT/server.crt" >/dev/null
say "issued $OUT/server.crt for $SAN"
