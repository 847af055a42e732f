#!/usr/bin/env bash
# The short fault campaign for CI (`make chaos-ci`): two fixed seeds and one random seed, about
# a minute of faults each (setup, drain, cleanup and checks make it about 3 minutes in all).
# Every run prints its seed; a failing one prints `make chaos SEED=<n> DURATION=<d>` to replay.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${CHAOS_CI_DURATION:-45s}
scripts/testbed.sh up >/dev/null
eval "$(scripts/testbed.sh env)"
cargo build --release --locked --bin muvee-agent --example chaos
status=0
for seed in 11 29 random; do
  target/release/examples/chaos --seed "$seed" --duration "$duration" || status=1
done
exit $status
