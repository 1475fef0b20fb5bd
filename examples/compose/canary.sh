#!/usr/bin/env bash
# Progressive canary behind switchyard: start the idle color, let the proxy roll it out step by
# step (STEPS, default the upstream's `steps`) while its error rate stays low. Promoted: drain
# and stop the old color (exit 0). Rolled back automatically: drain and stop the canary (exit 5).
# Never healthy: stop it (exit 4). Stopped by a human or refused: both stay up, proxyctl's exit
# code is returned.
set -euo pipefail
: "${PROXYCTL:=docker compose exec -T switchyard proxyctl}" "${UPSTREAM:=app}"
: "${START:=docker compose up -d --no-deps app_\$COLOR}" "${STOP:=docker compose stop app_\$COLOR}"
# shellcheck disable=SC2034 # COLOR is read by the START/STOP command run by eval
run() { local COLOR=$2; eval "$1"; }
live() { $PROXYCTL --json status | jq -r --arg u "$UPSTREAM" '.result.upstreams[] | select(.name == $u) | .main'; }
OLD=$(live); NEXT=$([ "$OLD" = blue ] && echo green || echo blue)
run "$START" "$NEXT"
rc=0
$PROXYCTL --upstream "$UPSTREAM" canary "$NEXT" --wait --wait-healthy "${HEALTHY_TIMEOUT:-120s}" \
  ${STEPS:+--steps "$STEPS"} ${INTERVAL:+--interval "$INTERVAL"} || rc=$?
case $rc in
  0) GONE=$OLD ;;              # promoted
  5) GONE=$NEXT ;;             # rolled back automatically
  4) run "$STOP" "$NEXT"; exit 4 ;;   # never healthy: nothing was rolled out
  *) exit "$rc" ;;             # stopped by a human, or refused: both stay up
esac
$PROXYCTL --upstream "$UPSTREAM" drain "$GONE" --timeout "${DRAIN_TIMEOUT:-60s}"
run "$STOP" "$GONE"
exit "$rc"
