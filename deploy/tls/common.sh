# Shared helpers for the deploy/tls scripts (sourced, not run).
set -euo pipefail
umask 077

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
say() { echo "$(basename "$0"): $*"; }

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed (needed: $2)"; }

# Days a certificate is valid; override with FEDBREAST_CERT_DAYS.
CERT_DAYS="${FEDBREAST_CERT_DAYS:-825}"
