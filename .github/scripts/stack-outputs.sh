# shellcheck shell=bash
# Sourced by the workflows' step `stack`, the one place they read the Pulumi stack's outputs:
# reads them once ($PULUMI_STACK, from $PULUMI_BACKEND_URL), then each `output NAME 'JQ PATH'`
# line of the step writes one value to the step's outputs, or fails naming the path when the
# stack has no such output (or an empty one). pulumi/tests/workflows.test.ts reads those lines
# and checks every path against the program's exports.
stack_json=$RUNNER_TEMP/stack.json
pulumi stack output --json --stack "$PULUMI_STACK" > "$stack_json"

output() {
  local value
  if ! value=$(jq -er "$2" "$stack_json") || [ -z "$value" ]; then
    echo "::error::the stack $PULUMI_STACK has no output $2"
    exit 1
  fi
  echo "$1=$value" >> "$GITHUB_OUTPUT"
}
