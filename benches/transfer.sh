#!/usr/bin/env bash
# Export and import figures, each against a baseline measured in the same run:
#  1. N profiles (ten traits each) seeded through /v1/batch: the ingest baseline;
#  2. export of all of them as CSV and as JSONL over loopback, against paging the same
#     profiles out through GET /v1/profiles (the read API's way to get them all);
#  3. import of that CSV and that JSONL into a fresh server, against the seeding rate of 1.
# Usage: cargo build --release --bins && N=1000000 bash benches/transfer.sh
set -euo pipefail
BIN=${BIN:-target/release/user360}
LG=${LG:-target/release/loadgen}
N=${N:-1000000}
PAGED=${PAGED:-200000}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

start() {
  d=$(mktemp -d)
  USER360_LOG=${LOG:-warn} $BIN serve --listen 127.0.0.1:0 --data-dir "$d/data" > "$d/out" 2> "$d/err" &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$d/out" 2>/dev/null && break; sleep 0.1; done
  url=$(sed -n 's/listening on //p' "$d/out"); wk=$(sed -n 's/^write key: //p' "$d/err"); at=$(sed -n 's/^admin token: //p' "$d/err")
  for _ in $(seq 100); do curl -sf "$url/readyz" >/dev/null && break; sleep 0.1; done
}
stop() { kill -TERM "$pid"; wait "$pid" || true; rm -rf "$d"; }
rss() { curl -sf "$url/metrics" | sed -n 's/^user360_process_rss_bytes \([0-9.e+]*\)$/\1/p'; }
per_profile() { python3 -c "import sys; a, b, n = map(float, sys.argv[1:]); print(f'{(b - a) / n:,.0f} B/profile resident')" "$1" "$2" "$N"; }
rate() { python3 -c "import sys; n, s = float(sys.argv[1]), float(sys.argv[2]); print(f'{n / s:,.0f}/s ({s:.2f} s)')" "$1" "$2"; }

echo "== 1. seed $N profiles through /v1/batch (baseline)"
start
rss0=$(rss)
seed=$($LG --url "$url" --write-key "$wk" --seed-profiles "$N" --batch 1000 --connections 4 | grep '^seeded')
echo "$seed"
seed_rate=$(echo "$seed" | sed -n 's/.* \([0-9.]*\) events\/s.*/\1/p')
echo "after seeding: $(per_profile "$rss0" "$(rss)")"

echo "== 2. export"
for fmt in csv jsonl; do
  t=$(curl -sf -o "$WORK/export.$fmt" -w '%{time_total}' -H "Authorization: Bearer $at" "$url/v1/export/profiles?format=$fmt")
  rows=$(wc -l < "$WORK/export.$fmt")
  [ "$fmt" = csv ] && rows=$((rows - 1))
  [ "$rows" = "$N" ] || { echo "export $fmt: $rows rows, expected $N" >&2; exit 1; }
  echo "export $fmt: $(du -h "$WORK/export.$fmt" | cut -f1), $(rate "$rows" "$t")"
  eval "export_$fmt=$t"
done
# Baseline: the first PAGED profiles through GET /v1/profiles?limit=1000, one page at a time.
t0=$(date +%s.%N); cursor=""; got=0
while [ "$got" -lt "$PAGED" ]; do
  page=$(curl -sf -H "Authorization: Bearer $at" "$url/v1/profiles?limit=1000&cursor=$cursor")
  read -r n cursor < <(python3 -c 'import json,sys; v=json.load(sys.stdin); print(len(v["profiles"]), v.get("next_cursor") or "")' <<< "$page")
  got=$((got + n)); [ -z "$cursor" ] && break
done
t1=$(date +%s.%N)
paged_t=$(python3 -c "print($t1 - $t0)")
echo "baseline, paging GET /v1/profiles: $(rate "$got" "$paged_t")"
python3 -c "
n, p, pt = $N, $got, $paged_t
for f, t in (('csv', $export_csv), ('jsonl', $export_jsonl)):
    print(f'export {f} / paging: {(n / t) / (p / pt):.1f}x')"
stop

echo "== 3. import into a fresh server"
for fmt in csv jsonl; do
  start
  rss0=$(rss)
  t=$(curl -sf -o "$WORK/answer.json" -w '%{time_total}' -H "Authorization: Bearer $at" \
        -H 'content-type: text/plain' --data-binary "@$WORK/export.$fmt" "$url/v1/import/profiles?format=$fmt")
  imported=$(python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(v["imported"])' "$WORK/answer.json")
  [ "$imported" = "$N" ] || { echo "import $fmt: $(cat "$WORK/answer.json")" >&2; exit 1; }
  echo "import $fmt: $(rate "$imported" "$t"), $(python3 -c "print(f'{($N / $t) / $seed_rate:.2f}')")x the seeding rate; $(per_profile "$rss0" "$(rss)")"
  stop
done
