"""The keys both sides of SecAgg+ agree on (server/secure_aggregation.py, client/secure_aggregation.py).

Flower's SecAgg+ speaks the legacy FitIns/FitRes format, which has no array names and no
"site" record; these two keys carry them.
"""

ARRAY_NAMES_KEY = "fedbreast-array-names"  # FitIns config: the arrays' names, newline-joined
SITE_NAME_KEY = "fedbreast-site-name"  # FitRes metrics: the site's name
