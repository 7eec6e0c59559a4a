#!/usr/bin/env bash
# The AWS foundations (pulumi/): the program type-checks, and its tests run it under Pulumi's
# mocks (no Pulumi CLI, no cloud) against the bus topology file and the least-privilege rules.
set -euo pipefail
cd "$(dirname "$0")/../../pulumi"
npm run --silent check
npm test --silent
echo "infra: ok"
