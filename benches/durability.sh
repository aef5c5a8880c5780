#!/usr/bin/env bash
# Sync vs relaxed durability, each measured with the load generator against the no-op
# baseline in the same run (set EXTRA=--baseline). Usage: cargo build --release --bins &&
#   SECS=10 EXTRA=--baseline bash benches/durability.sh
set -euo pipefail
BIN=${BIN:-target/release/user360}
LG=${LG:-target/release/loadgen}
for mode in sync relaxed; do
  d=$(mktemp -d)
  USER360_DURABILITY=$mode USER360_LOG=warn $BIN serve --listen 127.0.0.1:0 --data-dir "$d/data" > "$d/out" 2> "$d/err" &
  pid=$!
  for i in $(seq 100); do grep -q listening "$d/out" 2>/dev/null && break; sleep 0.1; done
  url=$(sed -n 's/listening on //p' "$d/out"); wk=$(sed -n 's/write key: //p' "$d/err")
  for i in $(seq 100); do curl -sf "$url/readyz" >/dev/null && break; sleep 0.1; done
  echo "== durability=$mode"
  $LG --url "$url" --write-key "$wk" --connections "${CONN:-64}" --seconds "${SECS:-10}" --batch "${BATCH:-100}" ${EXTRA:-}
  kill -TERM $pid; wait $pid || true
  rm -rf "$d"
done
