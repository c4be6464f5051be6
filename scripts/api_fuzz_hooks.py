"""Schemathesis hooks for scripts/api-fuzz.sh.

One rule of the API depends on the node's clock, so the schema cannot state it: an
event's `ts` may not be more than `journal.max_future_skew_secs` after the node's clock
(nor before 1970, which the schema does state for integers but not for date-time
strings). Generated events get a `ts` inside that range; nothing else is changed, so
negative cases stay negative.
"""

import datetime
import time

import schemathesis


def _in_range(ev):
    if not isinstance(ev, dict) or "ts" not in ev:
        return ev
    ts = ev["ts"]
    now = int(time.time() * 1000)
    if isinstance(ts, int) and not isinstance(ts, bool):
        if ts > now:
            ev["ts"] = ts % (now + 1)
    elif isinstance(ts, float):
        if ts.is_integer() and ts > now:
            ev["ts"] = float(int(ts) % (now + 1))
    elif isinstance(ts, str):
        try:
            ms = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1000
        except ValueError:
            return ev  # not a date-time: a negative case, left as it is
        if ms < 0 or ms > now:
            ev["ts"] = "2024-02-29T12:00:00Z"
    return ev


@schemathesis.hook
def map_body(context, body):
    operation = getattr(context, "operation", None)
    if operation is None or operation.path != "/v1/events":
        return body
    if isinstance(body, list):
        return [_in_range(e) for e in body]
    return _in_range(body)


@schemathesis.hook
def before_call(context, case, kwargs):
    # The coverage phase builds its boundary cases without the generation hooks above.
    if case.operation.path != "/v1/events" or case.method.upper() != "POST":
        return
    body = case.body
    if isinstance(body, list):
        case.body = [_in_range(e) for e in body]
    elif isinstance(body, dict):
        case.body = _in_range(body)
