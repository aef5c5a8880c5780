#!/usr/bin/env python3
"""Read back, through the admin API, what the SDK smoke drivers sent, and check it was stored.

usage: sdk_readback.py --url URL --token ADMIN_TOKEN --driver-output FILE

FILE is the stdout of shared/tools/sdk-smoke/run.sh: one JSON line per driver
({"sdk": ..., "user_id": ..., "anonymous_id": ..., "group_id": ..., ...}) among other lines.
For every driver except posthog-py (PostHog's own protocol) it checks the profile (traits,
identity merge) and the stored events (batch completeness without duplicates, the fixed-time
order, page, screen, group, identify). Prints `PASS <sdk>: <check>` or
`FAIL <sdk>: <check>: <details>` per check and, last, `sdk-readback: N passed, N failed`.
Exits 1 if any check failed or no driver line was found. Standard library only.
"""

import argparse
import datetime as dt
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

SKIP_SDKS = {"posthog-py"}
BATCH = 200
BATCH_EVENT = "Smoke Batch Event"
ORDER_TS = dt.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=dt.timezone.utc)
ORDER_TS_TOLERANCE_S = 5.0
MAX_PAGES = 1000


class ApiError(Exception):
    """A request that did not answer 200 with JSON."""

    def __init__(self, method, url, status, body):
        self.status = status
        text = body if len(body) <= 400 else body[:400] + "..."
        super().__init__("%s %s -> %s %s" % (method, url, status, text))


class Api:
    def __init__(self, base, token, timeout, page_size=1000):
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.page_size = page_size

    def get(self, path, params=None):
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
        req = urllib.request.Request(url, headers={"Authorization": "Bearer " + self.token,
                                                   "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                status, body = resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read().decode("utf-8", "replace")
        except (urllib.error.URLError, OSError) as e:
            raise ApiError("GET", url, "no answer", str(e)) from None
        if status != 200:
            raise ApiError("GET", url, status, body)
        try:
            return json.loads(body)
        except ValueError:
            raise ApiError("GET", url, "200 but not JSON", body) from None

    def events(self, key, **params):
        """Every event of the profile `key` matching params, following next_cursor."""
        path = "/v1/profiles/%s/events" % urllib.parse.quote(key, safe=":")
        params = dict(params, limit=self.page_size)
        out, cursor = [], None
        for _ in range(MAX_PAGES):
            q = dict(params, cursor=cursor) if cursor else params
            page = self.get(path, q)
            events = page.get("events")
            if not isinstance(events, list):
                raise ApiError("GET", path, 200, "no events list in " + json.dumps(page)[:300])
            out.extend(events)
            cursor = page.get("next_cursor")
            if cursor is None:
                return out
            if not events:
                raise ApiError("GET", path, 200, "empty page with next_cursor %r" % cursor)
        raise ApiError("GET", path, 200, "still a next_cursor after %d pages" % MAX_PAGES)


def parse_time(s):
    if not isinstance(s, str):
        return None
    try:
        t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else None


def short(v, n=300):
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= n else s[:n] + "..."


def ranges(nums):
    """[0,1,2,5,7,8] -> '0-2,5,7-8' (for short messages about missing values)."""
    nums, parts, i = sorted(nums), [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else "%s-%s" % (nums[i], nums[j]))
        i = j + 1
    return ",".join(parts)


def check_driver(api, d):
    """Runs every check for one driver line; returns [(check, None | failure details)]."""
    sdk, uid, anon, gid = d.get("sdk"), d.get("user_id"), d.get("anonymous_id"), d.get("group_id")
    results = []

    def record(name, fn):
        try:
            err = fn()
        except ApiError as e:
            err = str(e)
        except Exception as e:  # a malformed answer must not hide the other checks
            err = "unexpected %s: %s" % (type(e).__name__, e)
        results.append((name, err))

    if not all(isinstance(v, str) and v for v in (uid, anon, gid)):
        results.append(("driver line", "needs user_id, anonymous_id and group_id: " + short(d)))
        return results

    ukey, akey = "user_id:" + uid, "anonymous_id:" + anon
    state = {}

    def profile():
        p = api.get("/v1/profiles/" + urllib.parse.quote(ukey, safe=":"))
        if not isinstance(p, dict) or not isinstance(p.get("traits"), dict):
            return "no traits object in " + short(p)
        state["profile"] = p
        return None

    record("profile by user_id", profile)

    def trait(name, want):
        def fn():
            p = state.get("profile")
            if p is None:
                return "no profile (see 'profile by user_id')"
            got = p["traits"].get(name, "<missing>")
            if got != want:
                return "traits.%s is %s, want %s (traits: %s)" % (
                    name, short(got), short(want), short(p["traits"]))
            return None
        return fn

    record("traits.plan == enterprise", trait("plan", "enterprise"))
    record("traits.lastSeenVia == %s" % sdk, trait("lastSeenVia", sdk))
    record("traits.name == Ada Lovelace", trait("name", "Ada Lovelace"))

    def anon_profile():
        p = api.get("/v1/profiles/" + urllib.parse.quote(akey, safe=":"))
        mine = state.get("profile", {}).get("id")
        if mine is None:
            return "user profile unknown; anonymous_id profile is %s" % short(p.get("id"))
        if p.get("id") != mine:
            return "anonymous_id:%s is profile %s, user_id:%s is profile %s" % (
                anon, short(p.get("id")), uid, short(mine))
        return None

    record("anonymous_id resolves to the same profile", anon_profile)

    def batch():
        evs = api.events(ukey, name=BATCH_EVENT)
        seen, bad, dups = {}, [], []
        for e in evs:
            i = (e.get("properties") or {}).get("i")
            if not isinstance(i, int) or isinstance(i, bool):
                bad.append(short(e.get("properties"), 80))
                continue
            if i in seen:
                dups.append(i)
            seen[i] = True
        problems = []
        if len(evs) != BATCH:
            problems.append("%d events, want %d" % (len(evs), BATCH))
        missing = sorted(set(range(BATCH)) - set(seen))
        extra = sorted(set(seen) - set(range(BATCH)))
        if missing:
            problems.append("missing i: " + ranges(missing))
        if extra:
            problems.append("unexpected i: " + ranges(extra))
        if dups:
            problems.append("duplicated i: " + ranges(sorted(set(dups))))
        if bad:
            problems.append("%d events without an integer properties.i (e.g. %s)" % (len(bad), bad[0]))
        return "; ".join(problems) or None

    record("%d '%s' events, i = 0..%d exactly once" % (BATCH, BATCH_EVENT, BATCH - 1), batch)

    def order():
        evs = [e for e in api.events(ukey, type="track") if e.get("event") == "Order Completed"]
        if not evs:
            return "no track event named 'Order Completed'"
        if len(evs) != 1:
            return "%d 'Order Completed' events, want 1" % len(evs)
        e, problems = evs[0], []
        if e.get("properties") != {"revenue": 42.5}:
            problems.append("properties %s, want {\"revenue\": 42.5}" % short(e.get("properties")))
        t = parse_time(e.get("timestamp"))
        if t is None:
            problems.append("timestamp %s is not an RFC 3339 time" % short(e.get("timestamp")))
        elif abs((t - ORDER_TS).total_seconds()) > ORDER_TS_TOLERANCE_S:
            problems.append("timestamp %s, want 2024-05-06T07:08:09.123Z (+-%gs)" % (
                e.get("timestamp"), ORDER_TS_TOLERANCE_S))
        return "; ".join(problems) or None

    record("'Order Completed' with revenue 42.5 at 2024-05-06T07:08:09.123Z", order)

    def page():
        evs = api.events(ukey, type="page")
        ok = [e for e in evs if e.get("event") == "Page Viewed"
              and (e.get("properties") or {}).get("name") == "Pricing"]
        if not ok:
            return "%d page events, none with event 'Page Viewed' and properties.name 'Pricing': %s" % (
                len(evs), short([{k: e.get(k) for k in ("event", "name", "properties")} for e in evs]))
        return None

    record("page 'Page Viewed' named Pricing", page)

    def screen():
        evs = api.events(ukey, type="screen")
        if not any(e.get("event") == "Screen Viewed" for e in evs):
            return "%d screen events, none with event 'Screen Viewed': %s" % (
                len(evs), short([{k: e.get(k) for k in ("event", "name")} for e in evs]))
        return None

    record("screen 'Screen Viewed'", screen)

    def group():
        evs = api.events(ukey, type="group")
        if not any(e.get("group_id") == gid for e in evs):
            return "%d group events, none with group_id %s: %s" % (
                len(evs), gid, short([e.get("group_id") for e in evs]))
        return None

    record("group with group_id %s" % gid, group)

    def identify():
        evs = api.events(ukey, type="identify")
        if len(evs) != 3:
            return "%d identify events, want 3: %s" % (
                len(evs), short([e.get("traits") for e in evs], 500))
        return None

    record("3 identify events", identify)
    return results


def read_drivers(path):
    drivers = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict) and isinstance(d.get("sdk"), str):
                drivers.append(d)
    return drivers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8080")
    ap.add_argument("--token", required=True, help="admin token (sent as Authorization: Bearer)")
    ap.add_argument("--driver-output", required=True, help="stdout of sdk-smoke/run.sh")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per HTTP request")
    ap.add_argument("--settle", type=float, default=10.0,
                    help="if a driver's checks fail, retry them for up to this many seconds "
                         "(a note is printed when a retry was needed)")
    ap.add_argument("--page-size", type=int, default=1000,
                    help="limit per events request (small values exercise cursor paging)")
    args = ap.parse_args()
    api = Api(args.url, args.token, args.timeout, args.page_size)

    passed = failed = 0
    try:
        drivers = read_drivers(args.driver_output)
    except OSError as e:
        print("FAIL readback: driver output: %s" % e)
        drivers = None
    checked = [d for d in drivers or [] if d["sdk"] not in SKIP_SDKS]
    for d in drivers or []:
        if d["sdk"] in SKIP_SDKS:
            print("skip %s: not a Segment-spec SDK" % d["sdk"])
    if drivers is not None and not checked:
        print("FAIL readback: no driver lines (JSON with \"sdk\") to check in %s" % args.driver_output)
    if not checked:
        print("sdk-readback: %d passed, %d failed" % (passed, failed + 1))
        return 1

    for d in checked:
        sdk = d["sdk"]
        if d.get("ok") is False:
            print("note %s: the driver reported SDK errors: %s" % (sdk, short(d.get("errors"))))
        start = time.monotonic()
        results = check_driver(api, d)
        while any(err for _, err in results) and time.monotonic() - start < args.settle:
            time.sleep(1.0)
            results = check_driver(api, d)
        if time.monotonic() - start >= 1.0 and not any(err for _, err in results):
            print("note %s: checks passed only after retrying for %.1fs" % (sdk, time.monotonic() - start))
        for name, err in results:
            if err:
                failed += 1
                print("FAIL %s: %s: %s" % (sdk, name, err))
            else:
                passed += 1
                print("PASS %s: %s" % (sdk, name))
        sys.stdout.flush()
    print("sdk-readback: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
