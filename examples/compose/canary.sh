#!/usr/bin/env bash
# Progressive canary behind switchyard: start the idle color, let the proxy roll it out step by
# step (STEPS, default the upstream's `steps`) while its error rate stays low. Promoted: drain
# and stop the old color (exit 0). Rolled back automatically: drain and stop the canary (exit 5).
# Never healthy: stop it (exit 4). Stopped by a human, refused, or an unclear outcome: both stay
# up and proxyctl's exit code is returned.
set -euo pipefail
: "${PROXYCTL:=docker compose exec -T switchyard proxyctl}" "${UPSTREAM:=app}"
: "${START:=docker compose up -d --no-deps app_\$COLOR}" "${STOP:=docker compose stop app_\$COLOR}"
# shellcheck disable=SC2034 # COLOR is read by the START/STOP command run by eval
run() { local COLOR=$2; eval "$1"; }
up() { $PROXYCTL --json status | jq -er --arg u "$UPSTREAM" ".result.upstreams[] | select(.name == \$u) | $1"; }
OLD=$(up .main) || { echo "canary.sh: cannot read upstream $UPSTREAM from proxyctl status (set UPSTREAM?)" >&2; exit 2; }
case $OLD in blue) NEXT=green ;; green) NEXT=blue ;; *) echo "canary.sh: $OLD serves, not blue or green" >&2; exit 2 ;; esac
[ "$(up ".weights.$NEXT // 0")" = 0 ] || { echo "canary.sh: $NEXT has traffic (a rollout?); not touched" >&2; exit 2; }
run "$START" "$NEXT"
rc=0
$PROXYCTL --upstream "$UPSTREAM" canary "$NEXT" --wait --wait-healthy "${HEALTHY_TIMEOUT:-120s}" \
  ${STEPS:+--steps "$STEPS"} ${INTERVAL:+--interval "$INTERVAL"} || rc=$?
# Decide from what the proxy serves now, not from the exit code alone.
MAIN=$(up .main) && NEXT_WEIGHT=$(up ".weights.$NEXT // 0") || exit "$rc"
if [ "$rc" = 0 ] && [ "$MAIN" = "$NEXT" ]; then GONE=$OLD                  # promoted
elif { [ "$rc" = 5 ] || [ "$rc" = 4 ]; } && [ "$MAIN" = "$OLD" ] && [ "$NEXT_WEIGHT" = 0 ]; then
  GONE=$NEXT                                                               # rolled back, or never healthy
else exit "$rc"; fi
$PROXYCTL --upstream "$UPSTREAM" drain "$GONE" --timeout "${DRAIN_TIMEOUT:-60s}"
run "$STOP" "$GONE"
exit "$rc"
