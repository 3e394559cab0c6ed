"""Schemathesis hook: signs generated Belfry API requests the Pusher way.

Every positive case, and every other negative one, goes to the test app
with its key, a fresh `auth_timestamp`, `auth_version`, `body_md5` and a
valid `auth_signature`, so it reaches the route's own checks (signed
negative cases probe the body and parameter checks). The other negative
cases are sent as generated and probe the app lookup and the signature
checks. Loaded with SCHEMATHESIS_HOOKS.
"""

import hashlib
import hmac
import json
import os
import time
import urllib.parse
import zlib

import schemathesis
from schemathesis.core import NOT_SET

KEY = os.environ["BELFRY_API_KEY"]
SECRET = os.environ["BELFRY_API_SECRET"].encode()


@schemathesis.hook
def before_call(context, case, kwargs):
    if not case.path.startswith("/apps/"):
        return
    if case.query is None or case.query is NOT_SET:
        case.query = {}
    query = case.query if isinstance(case.query, dict) else None
    if query is None:
        return
    positive = str(case.meta.generation.mode) == "positive" if case.meta else True
    if not positive and zlib.crc32(repr((case.path_parameters, query, case.body)).encode()) % 2:
        return
    query["auth_key"] = KEY
    # Signed cases go to the app the key belongs to; unsigned ones keep
    # their generated app id and probe the 404.
    case.path_parameters["app_id"] = os.environ.get("BELFRY_API_APP", "api-app")
    body = b""
    if case.body is not NOT_SET and case.body is not None:
        # Sent as these exact bytes, so body_md5 is over what the server reads.
        body = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
        case.body = body
    query["auth_timestamp"] = str(int(time.time()))
    query["auth_version"] = "1.0"
    query.pop("auth_signature", None)
    if body:
        query["body_md5"] = hashlib.md5(body).hexdigest()
    else:
        query.pop("body_md5", None)
    signed = "&".join(
        f"{k.lower()}={v}" for k, v in sorted((str(k).lower(), str(v)) for k, v in query.items())
    )
    # The path exactly as requests will send it: path parameters percent-encoded.
    path = urllib.parse.quote(case.formatted_path, safe="/%:@!$&'()*+,;=-._~")
    message = f"{case.method.upper()}\n{path}\n{signed}".encode()
    query["auth_signature"] = hmac.new(SECRET, message, hashlib.sha256).hexdigest()
