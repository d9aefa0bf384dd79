#!/usr/bin/env bash
# Create a site's SuperNode authentication key pair (ECDSA P-384, OpenSSH format, as
# Flower's SuperNode authentication requires): OUT/SITE/site.key (stays at the hospital)
# and OUT/SITE/site.key.pub (sent to the coordinator, who registers it under SITE).
# Idempotent: an existing key is kept; a site's identity IS its key, so never overwrite it.
#
#   deploy/tls/make-site-key.sh OUT_DIR SITE_NAME
source "$(dirname "$0")/common.sh"
[[ $# -eq 2 ]] || die "usage: make-site-key.sh OUT_DIR SITE_NAME"
OUT="$1"; SITE="$2"
[[ "$SITE" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "site name '$SITE': use letters, digits, '.', '_' or '-'"
need ssh-keygen "to create the site key (package openssh-client)"
DIR="$OUT/$SITE"
mkdir -p "$DIR"
if [[ -s "$DIR/site.key" ]]; then
    [[ -s "$DIR/site.key.pub" ]] || ssh-keygen -y -f "$DIR/site.key" >"$DIR/site.key.pub"
    say "kept existing key $DIR/site.key ($(ssh-keygen -l -f "$DIR/site.key.pub" | cut -d' ' -f2))"
    exit 0
fi
ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedbreast-$SITE" -f "$DIR/site.key"
chmod 600 "$DIR/site.key"; chmod 644 "$DIR/site.key.pub"
say "created $DIR/site.key; register $DIR/site.key.pub at the coordinator under the name $SITE"
