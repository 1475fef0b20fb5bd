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
up() { $PROXYCTL --json status | jq -er --arg u "$UPSTREAM" ".result.upstreams[] | select(.name == \$u) | $1"; }
OLD=$(up .main) || { echo "deploy.sh: cannot read upstream $UPSTREAM from proxyctl status (set UPSTREAM?)" >&2; exit 2; }
case $OLD in blue) NEXT=green ;; green) NEXT=blue ;; *) echo "deploy.sh: $OLD serves, not blue or green" >&2; exit 2 ;; esac
[ "$(up ".weights.$NEXT // 0")" = 0 ] || { echo "deploy.sh: $NEXT has traffic (a canary?); not touched" >&2; exit 2; }
run "$START" "$NEXT"
rc=0; $PROXYCTL --upstream "$UPSTREAM" switch "$NEXT" --wait-healthy "${HEALTHY_TIMEOUT:-120s}" --drain "${DRAIN_TIMEOUT:-60s}" || rc=$?
if [ "$rc" = 0 ]; then run "$STOP" "$OLD"
elif [ "$rc" = 3 ]; then echo "deploy.sh: cannot reach switchyard; both colors left running" >&2; exit 3
elif [ "$(up .main)" = "$OLD" ]; then run "$STOP" "$NEXT"; echo "deploy.sh: $NEXT did not become healthy; $OLD still serves" >&2; exit 1
else echo "deploy.sh: $NEXT serves, but $OLD still has requests in flight; not stopped" >&2; exit 4
fi
