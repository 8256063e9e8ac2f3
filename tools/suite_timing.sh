#!/bin/bash
# The test suite before and after a change, side by side on one machine: the suite of REV (in a
# temporary worktree) and of this checkout start together, one per core, each with an empty
# compilation cache as on CI, under `CI=true`; wall time from /usr/bin/time.
#   bash tools/suite_timing.sh REV [VENV]     # VENV: .venv (default) or .venv-oldest
# Logs: /tmp/suite-{before,after}-VENV.log (pytest's summary and --durations=15, then the time).
# PYTEST_ARGS overrides `--durations=15` (e.g. `-k layout` to try the script itself).
set -u
rev=$1
venv=${2:-.venv}
root=$(cd "$(dirname "$0")/.." && pwd)
before=$(mktemp -d /tmp/suite-before-XXXX)
git -C "$root" worktree add -q --detach "$before" "$rev"
for side in before after; do
  dir=$before; [ $side = after ] && dir=$root
  cache=/tmp/suite-cache-$side-$venv; rm -rf "$cache"; mkdir -p "$cache"
  # `python -m` puts the worktree first on sys.path: each side imports its own qnet.
  ( cd "$dir" && CI=true QNET_TEST_JAX_CACHE=$cache /usr/bin/time -f "%e s wall, %U s user, %S s sys" \
      "$root/$venv/bin/python" -m pytest ${PYTEST_ARGS:---durations=15} \
      > /tmp/suite-$side-$venv.log 2>&1 ) &
done
wait
git -C "$root" worktree remove --force "$before"
for side in before after; do echo "$side: $(tail -2 /tmp/suite-$side-$venv.log | tr '\n' ' ')"; done
