#!/usr/bin/env bash
# Create the federation's certificate authority: OUT/ca.key (private, stays with the
# coordinator's operator) and OUT/ca.crt (given to every site as its root certificate).
# Idempotent: an existing CA is kept (re-issuing it would invalidate every certificate).
#
#   deploy/tls/make-ca.sh OUT_DIR [COMMON_NAME]
source "$(dirname "$0")/common.sh"
[[ $# -ge 1 ]] || die "usage: make-ca.sh OUT_DIR [COMMON_NAME]"
OUT="$1"; CN="${2:-fedbreast federation CA}"
need openssl "to create the CA"
mkdir -p "$OUT"
if [[ -s "$OUT/ca.key" && -s "$OUT/ca.crt" ]]; then
    say "kept existing CA $OUT/ca.crt ($(openssl x509 -in "$OUT/ca.crt" -noout -subject))"
    exit 0
fi
[[ -e "$OUT/ca.key" || -e "$OUT/ca.crt" ]] && die "$OUT holds only half a CA (ca.key or ca.crt); move it away first"
openssl ecparam -name secp384r1 -genkey -noout -out "$OUT/ca.key"
openssl req -x509 -new -key "$OUT/ca.key" -sha384 -days "$CERT_DAYS" -subj "/CN=$CN" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$OUT/ca.crt"
chmod 600 "$OUT/ca.key"; chmod 644 "$OUT/ca.crt"
say "created CA $OUT/ca.crt (keep $OUT/ca.key offline)"
