#!/usr/bin/env bash
# Registers a new revision of an ECS task definition family: the family's latest revision with
# IMAGE in its container named `mira` (every Mira task definition names it so), everything else
# kept. Prints the new revision's ARN. Used by .github/workflows/deploy.yml; by hand, it needs
# the aws CLI (with AWS_REGION) and jq.
#
#   .github/scripts/register-revision.sh FAMILY IMAGE
#
# It starts from the family's latest revision, not from the revision a service runs: when
# `pulumi up` changed the task definition (a new setting), its revision is the latest, and the
# next deploy carries the change with the new image.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 FAMILY IMAGE" >&2; exit 2; }
family=$1 image=$2

current=$(aws ecs describe-task-definition --task-definition "$family" --include TAGS --output json)
# describe-task-definition returns fields that register-task-definition refuses: drop them.
next=$(jq --arg image "$image" '
  (.tags // []) as $tags
  | .taskDefinition
  | if any(.containerDefinitions[]; .name == "mira") then .
    else error("task definition \(.family) has no container named mira") end
  | .containerDefinitions |= map(if .name == "mira" then .image = $image else . end)
  | del(.taskDefinitionArn, .revision, .status, .requiresAttributes, .compatibilities,
        .registeredAt, .registeredBy, .deregisteredAt)
  | if ($tags | length) > 0 then .tags = $tags else . end' <<<"$current")
aws ecs register-task-definition --cli-input-json "$next" \
  --query taskDefinition.taskDefinitionArn --output text
