#!/usr/bin/env bash
# Blue/green deploy behind switchyard: start the idle color, switch to it once it is healthy,
# wait until the old color has no request in flight, stop it. If the new color never becomes
# healthy nothing was switched: stop it, the old one keeps serving (exit 1).
# START/STOP are shell commands run with $COLOR set; PROXYCTL reaches the proxy.
set -euo pipefail
: "${PROXYCTL:=docker compose exec -T switchyard proxyctl}" "${UPSTREAM:=app}"
: "${START:=docker compose up -d --no-deps app_\$COLOR}" "${STOP:=docker compose stop app_\$COLOR}"
# shellcheck disable=SC2034 # COLOR is read by the START/STOP command run by eval
run() { local COLOR=$2; eval "$1"; }
live() { $PROXYCTL --json status | jq -r --arg u "$UPSTREAM" '.result.upstreams[] | select(.name == $u) | .main'; }
OLD=$(live); NEXT=$([ "$OLD" = blue ] && echo green || echo blue)
run "$START" "$NEXT"
if $PROXYCTL --upstream "$UPSTREAM" switch "$NEXT" --wait-healthy "${HEALTHY_TIMEOUT:-120s}" --drain "${DRAIN_TIMEOUT:-60s}"; then
  run "$STOP" "$OLD"
elif [ "$(live)" = "$OLD" ]; then
  run "$STOP" "$NEXT"; echo "deploy.sh: $NEXT did not become healthy; $OLD still serves" >&2; exit 1
else
  echo "deploy.sh: $NEXT serves, but $OLD still has requests in flight; not stopped" >&2; exit 4
fi
