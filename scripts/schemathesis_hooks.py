"""schemathesis hooks for scripts/schemathesis.sh (loaded through SCHEMATHESIS_HOOKS).

Idempotency keys are state: a key stored with one request and sent again with
another is refused with 422 idempotency_key_reused, by design (docs/API.md,
the IETF httpapi draft). schemathesis reuses generated values across requests
("0", "a", ...), so a schema-valid request would meet a key an earlier,
different request stored, and its 422 would look like a valid request
rejected. Before each call this hook makes every *valid* key unique (the
`Idempotency-Key` header and each batch item's `idempotency_key`), so it stays
schema-valid; malformed keys are left as generated, so their 400 is still
checked. Replays and reuse themselves are covered by tests/gateway/idempotency.rs.
"""

import re
import uuid

import schemathesis

VALID_KEY = re.compile(r"^[!-~]{1,255}$")


def unique(key):
    if isinstance(key, str) and VALID_KEY.match(key):
        return key[:200] + "." + uuid.uuid4().hex
    return key


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() == "idempotency-key":
            headers[name] = unique(headers[name])
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("events"), list):
        for item in body["events"]:
            if isinstance(item, dict) and "idempotency_key" in item:
                item["idempotency_key"] = unique(item["idempotency_key"])
