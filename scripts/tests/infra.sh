#!/usr/bin/env bash
# The AWS foundations (pulumi/): the program type-checks, and its tests run it under Pulumi's
# mocks (no Pulumi CLI, no cloud) against the bus topology file and the least-privilege rules.
# Then the operators' observability files (docs/observability/): the alert rules and the Grafana
# dashboard name only series of the metric catalogue (scripts/tests/observability.py).
#
# The checks' Python is the infrastructure checks' virtualenv (tools/infra-requirements.txt),
# which scripts/bootstrap writes to .mira-test.env as MIRA_INFRA_PYTHON; without it, the one
# bootstrap makes, keyed by the requirements' sha256, once it finished installing.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "infra: $*" >&2; exit 1; }

python=${MIRA_INFRA_PYTHON:-}
if [ -z "$python" ]; then
  key=$(sha256sum tools/infra-requirements.txt | cut -c1-16)
  venv=${MIRA_INFRA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mira-infra-venv/$key}
  [ -e "$venv/.complete" ] || \
    fail "MIRA_INFRA_PYTHON is not set and $venv is not a finished virtualenv: run scripts/bootstrap"
  python=$venv/bin/python
  export MIRA_INFRA_PYTHON=$python
fi
[ -x "$python" ] || fail "MIRA_INFRA_PYTHON ($python) cannot be run"

(
  cd pulumi
  npm run --silent check
  npm test --silent
)
"$python" scripts/tests/observability.py
echo "infra: ok"
