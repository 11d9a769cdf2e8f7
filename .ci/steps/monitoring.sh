#!/usr/bin/env bash
# CI step: the monitoring files shipped in packaging/monitoring/ are valid for Prometheus.
# `promtool check rules` (Debian's `prometheus` package, listed in .ci/packages.txt) checks
# the alert rule files and `promtool test rules` runs their test cases; the dashboard's
# queries are checked as recording rules in a temporary file (Grafana's $__rate_interval
# and $__interval read as 5m).
# That every query names only metrics the binaries export is the test
# tests/tests/metrics_catalogue.rs (run by the ordinary test command).
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v promtool >/dev/null; then
	echo "monitoring.sh: promtool not found (apt-get install prometheus)" >&2
	exit 1
fi

promtool check rules packaging/monitoring/*.rules.yml
# Each alert fires on the series it is meant for and not before its time (test cases in
# packaging/monitoring/tests/, not installed).
promtool test rules packaging/monitoring/tests/*.test.yml

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for dashboard in packaging/monitoring/*.dashboard.json; do
	rules=$tmp/$(basename "$dashboard" .json).rules.yml
	printf 'groups:\n  - name: dashboard\n    rules:\n' >"$rules"
	n=0
	while IFS= read -r expr; do
		if [[ $expr == *\\* ]]; then
			echo "monitoring.sh: $dashboard: a query with a JSON escape; this check reads plain strings only: $expr" >&2
			exit 1
		fi
		expr=${expr//\$__rate_interval/5m}
		expr=${expr//\$__interval/5m}
		n=$((n + 1))
		printf "      - record: dashboard:query_%d\n        expr: '%s'\n" "$n" "${expr//\'/\'\'}" >>"$rules"
	done < <(sed -n 's/^ *"expr": "\(.*\)",\{0,1\}$/\1/p' "$dashboard")
	if ((n == 0)); then
		echo "monitoring.sh: $dashboard: no queries found" >&2
		exit 1
	fi
	echo "$dashboard: $n queries"
	promtool check rules "$rules"
done
