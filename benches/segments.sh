#!/usr/bin/env bash
# Whole-server segment figures, each against a baseline measured in the same run:
#  1. backfill: N profiles (ten traits each), then a new trait segment, an identity segment
#     and an event segment (which reads retained timelines), timed until `ready`;
#  2. ingest with 100 active segments (half trait, half event rules) vs none, same workload.
# Usage: cargo build --release --bins && N=1000000 SECS=10 bash benches/segments.sh
# (ONLY=backfill or ONLY=ingest runs one part; MIX=broad for the broad segment mix.)
set -euo pipefail
BIN=${BIN:-target/release/user360}
LG=${LG:-target/release/loadgen}
N=${N:-1000000}
SECS=${SECS:-10}
CONN=${CONN:-16}
BATCH=${BATCH:-100}

start() {
  d=$(mktemp -d)
  USER360_LOG=${LOG:-info} $BIN serve --listen 127.0.0.1:0 --data-dir "$d/data" > "$d/out" 2> "$d/err" &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$d/out" 2>/dev/null && break; sleep 0.1; done
  url=$(sed -n 's/listening on //p' "$d/out"); wk=$(sed -n 's/^write key: //p' "$d/err"); at=$(sed -n 's/^admin token: //p' "$d/err")
  for _ in $(seq 100); do curl -sf "$url/readyz" >/dev/null && break; sleep 0.1; done
}
stop() { kill -TERM "$pid"; wait "$pid" || true; rm -rf "$d"; }
now_ms() { date +%s%3N; }
# Creates a segment and prints the ms until it is ready.
timed_segment() {
  local t0; t0=$(now_ms)
  curl -sf -H "Authorization: Bearer $at" "$url/v1/segments" -d "$1" > /dev/null
  local id; id=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$1")
  until curl -sf -H "Authorization: Bearer $at" "$url/v1/segments/$id" | grep -q '"status":"ready"'; do sleep 0.02; done
  local t1; t1=$(now_ms)
  local count; count=$(curl -sf -H "Authorization: Bearer $at" "$url/v1/segments/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])')
  echo "segment $id: ready in $((t1 - t0)) ms, $count members"
}

if [ "${ONLY:-backfill}" = backfill ] || [ -z "${ONLY:-}" ]; then
echo "== 1. backfill over $N profiles"
start
$LG --url "$url" --write-key "$wk" --seed-profiles "$N" --batch 1000 --connections 4
echo "rss: $(curl -sf "$url/metrics" | sed -n 's/^user360_process_rss_bytes //p')"
timed_segment '{"id":"pro-in","name":"Pro in India","rule":{"all":[{"trait":"plan","op":"eq","value":"pro"},{"trait":"country","op":"eq","value":"IN"}]}}'
timed_segment '{"id":"score","name":"High score","rule":{"trait":"score","op":"gte","value":50}}'
timed_segment '{"id":"known","name":"Known users","rule":{"identity":"user_id","op":"exists"}}'
timed_segment '{"id":"new-users","name":"Created in the last 30 days","rule":{"event":"user.created","within":{"days":30}}}'
timed_segment '{"id":"went-pro","name":"Changed plan to pro","rule":{"event":"user.updated","where":[{"property":"changes.plan.to","op":"eq","value":"pro"}]}}'
grep "segment backfill finished" "$d/err" | sed 's/.*INFO //' || true
stop
fi

echo "== 2. ingest with 0 vs 100 segments (${MIX:-selective} mix; $SECS s, $CONN connections, batches of $BATCH)"
# 100 segments, half trait and half event rules. MIX=selective (default): each matches a
# part of the users, as audiences do; MIX=broad: many match every new profile ("not on a
# plan", "no page view in N days"), so most new profiles enter dozens of segments.
segments100() {
  for i in $(seq 0 49); do
    if [ "${MIX:-selective}" = broad ]; then
      case $((i % 5)) in
        0) r='{"trait":"plan","op":"eq","value":"pro"}' ;;
        1) r="{\"all\":[{\"trait\":\"logins\",\"op\":\"gte\",\"value\":$i},{\"trait\":\"email\",\"op\":\"exists\"}]}" ;;
        2) r='{"any":[{"trait":"name","op":"starts_with","value":"User 1"},{"identity":"email","op":"exists"}]}' ;;
        3) r="{\"trait\":\"logins\",\"op\":\"between\",\"value\":[$i,99]}" ;;
        *) r='{"not":{"trait":"plan","op":"in","value":["free","enterprise"]}}' ;;
      esac
    else
      plans=(free pro enterprise)
      case $((i % 5)) in
        0) r="{\"trait\":\"plan\",\"op\":\"eq\",\"value\":\"${plans[$((i / 5 % 3))]}\"}" ;;
        1) r="{\"all\":[{\"trait\":\"logins\",\"op\":\"gte\",\"value\":$((50 + i))},{\"trait\":\"email\",\"op\":\"exists\"}]}" ;;
        2) r="{\"trait\":\"name\",\"op\":\"starts_with\",\"value\":\"User $((i / 5 + 1))\"}" ;;
        3) r="{\"trait\":\"logins\",\"op\":\"between\",\"value\":[$i,$((i + 10))]}" ;;
        *) r="{\"all\":[{\"trait\":\"plan\",\"op\":\"eq\",\"value\":\"pro\"},{\"trait\":\"logins\",\"op\":\"lt\",\"value\":$((i + 10))}]}" ;;
      esac
    fi
    curl -sf -H "Authorization: Bearer $at" "$url/v1/segments" -d "{\"id\":\"t$i\",\"name\":\"t$i\",\"rule\":$r}" > /dev/null
  done
  for i in $(seq 0 49); do
    case $((i % 5)) in
      0) r="{\"event\":\"Product Viewed\",\"count\":{\"gte\":$((i % 7 + 2))},\"within\":{\"days\":7},\"per\":\"product_id\"}" ;;
      1) r="{\"event\":\"Order Completed\",\"count\":{\"gte\":$((i % 4 + 1))},\"within\":{\"days\":30}}" ;;
      2) r="{\"event\":\"Export Used\",\"count\":{\"gt\":$((i % 9))}}" ;;
      3) r="{\"event\":\"Product Viewed\",\"where\":[{\"property\":\"quantity\",\"op\":\"gte\",\"value\":$((i % 4 + 1))}],\"within\":{\"hours\":24}}" ;;
      *) if [ "${MIX:-selective}" = broad ]; then
           r="{\"event\":\"Page Viewed\",\"count\":{\"eq\":0},\"within\":{\"days\":$((i % 10 + 1))}}"
         else
           r="{\"all\":[{\"identity\":\"email\",\"op\":\"exists\"},{\"event\":\"Order Completed\",\"count\":{\"eq\":0},\"within\":{\"days\":$((i % 10 + 1))}}]}"
         fi ;;
    esac
    curl -sf -H "Authorization: Bearer $at" "$url/v1/segments" -d "{\"id\":\"e$i\",\"name\":\"e$i\",\"rule\":$r}" > /dev/null
  done
  until [ "$(curl -sf -H "Authorization: Bearer $at" "$url/v1/segments?limit=1000" | grep -o '"status":"backfilling"' | wc -l)" = 0 ]; do sleep 0.1; done
}
[ "${ONLY:-}" = backfill ] && exit 0
for round in 1 2; do
  start
  echo "-- round $round, no segments"
  $LG --url "$url" --write-key "$wk" --connections "$CONN" --seconds "$SECS" --batch "$BATCH" | grep '^user360'
  stop
  start
  segments100
  echo "-- round $round, 100 segments"
  $LG --url "$url" --write-key "$wk" --connections "$CONN" --seconds "$SECS" --batch "$BATCH" | grep '^user360'
  curl -sf "$url/metrics" | grep -E '^user360_(segment_changes_total|events_stored_total|profiles) ' || true
  curl -sf "$url/metrics" | grep -E '^user360_segment_changes_total' || true
  stop
done
