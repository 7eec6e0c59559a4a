// What the workflows under .github/workflows assume (issue 21): GitHub's OIDC provider, a deploy
// role for deploy.yml that can push the two images, run the migration task, roll the ECS
// services (the slide verifier's with the worker's image) and the worker Deployment, register
// the daily verification's task definition with the new image, publish the SPA and invalidate
// CloudFront, and nothing else; a read-only role for `pulumi preview` on pull requests; and the
// role `pulumi up` runs as on main. No long-lived keys anywhere.

import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import type { Compute } from "./compute";
import type { Edge } from "./edge";
import type { Fleet } from "./fleet";
import { type foundations, role, tags } from "./foundations";
import type { Verifier } from "./verifier";

type Found = ReturnType<typeof foundations>;

export type DeliveryConfig = {
  stack: string;
  region: string;
  /** `owner/name` of the repository whose workflows deploy (GitHub OIDC). */
  githubRepository: string;
  /** An existing GitHub OIDC provider in the account; without it, one is made. */
  githubOidcProviderArn?: string;
  /** The Pulumi state bucket (s3:// backend) and the alias of its secrets-provider key (awskms://). */
  pulumiStateBucket?: string;
  pulumiSecretsKeyAlias?: string;
};

const GITHUB = "token.actions.githubusercontent.com";

export function delivery(cfg: DeliveryConfig, f: Found, c: Compute, k: Fleet, e: Edge, v: Verifier) {
  const s = cfg.stack;
  const p = f.parts;
  const providerArn =
    cfg.githubOidcProviderArn ??
    new aws.iam.OpenIdConnectProvider("github-oidc", { url: `https://${GITHUB}`, clientIdLists: ["sts.amazonaws.com"], tags: tags(s, "delivery") }).arn;
  /** Trusts this repository's workflows, on `subjects` (main only, or pull requests too). */
  const github = (subjects: string[]) =>
    pulumi.output(providerArn).apply((arn) =>
      JSON.stringify({
        Version: "2012-10-17",
        Statement: [
          {
            Effect: "Allow",
            Principal: { Federated: arn },
            Action: "sts:AssumeRoleWithWebIdentity",
            Condition: {
              StringEquals: { [`${GITHUB}:aud`]: "sts.amazonaws.com" },
              StringLike: { [`${GITHUB}:sub`]: subjects.map((x) => `repo:${cfg.githubRepository}:${x}`) },
            },
          },
        ],
      }),
    );
  // Pushes to main only (the workflows use no GitHub environment, whose subject would differ).
  const onMain = ["ref:refs/heads/main"];
  /** Reading the stack's state: `pulumi stack output` and `pulumi preview` (which also takes the lock). */
  const state: { Effect: "Allow"; Action: string[]; Resource: pulumi.Input<string>[]; Condition?: object }[] = cfg.pulumiStateBucket
    ? [
        { Effect: "Allow", Action: ["s3:ListBucket"], Resource: [`arn:aws:s3:::${cfg.pulumiStateBucket}`] },
        { Effect: "Allow", Action: ["s3:GetObject"], Resource: [`arn:aws:s3:::${cfg.pulumiStateBucket}/.pulumi/*`] },
        ...(cfg.pulumiSecretsKeyAlias
          ? [
              {
                Effect: "Allow" as const,
                Action: ["kms:Decrypt"],
                // A key is named by its alias in a condition (an alias ARN does not grant Decrypt).
                Resource: ["*"],
                Condition: { "ForAnyValue:StringEquals": { "kms:ResourceAliases": cfg.pulumiSecretsKeyAlias } },
              },
            ]
          : []),
      ]
    : [];

  const repos = Object.values(p.repos);
  const deployRole = role("deploy", s, github(onMain), [
    { Effect: "Allow", Action: ["ecr:GetAuthorizationToken"], Resource: ["*"] },
    {
      Effect: "Allow",
      Action: [
        "ecr:BatchCheckLayerAvailability",
        "ecr:BatchGetImage",
        "ecr:CompleteLayerUpload",
        "ecr:DescribeImages",
        "ecr:InitiateLayerUpload",
        "ecr:PutImage",
        "ecr:UploadLayerPart",
      ],
      Resource: repos.map((r) => r.arn),
    },
    // Task-definition revisions cannot be scoped to a family by ARN.
    { Effect: "Allow", Action: ["ecs:DescribeTaskDefinition", "ecs:RegisterTaskDefinition", "ecs:TagResource"], Resource: ["*"] },
    {
      Effect: "Allow",
      Action: ["ecs:UpdateService", "ecs:DescribeServices"],
      Resource: [...Object.values(c.services), v.service].map((x) => x.id),
    },
    {
      Effect: "Allow",
      Action: ["ecs:RunTask"],
      Resource: [pulumi.interpolate`arn:aws:ecs:${cfg.region}:*:task-definition/${c.migrationTask.family}:*`],
    },
    { Effect: "Allow", Action: ["ecs:DescribeTasks"], Resource: ["*"] },
    // Registering a revision passes its roles: the services', the slide verifier's, the
    // migration's, and the daily verification's (deploy.yml registers its family with each new
    // image; the schedule runs it), each family's execution role with them.
    {
      Effect: "Allow",
      Action: ["iam:PassRole"],
      Resource: [
        ...Object.values(c.executionRoles).map((r) => r.arn),
        v.executionRole.arn,
        c.migrateRole.arn,
        c.verify.role.arn,
        v.role.arn,
        p.apiRole.arn,
        p.rolesRole.arn,
      ],
    },
    { Effect: "Allow", Action: ["eks:DescribeCluster"], Resource: [k.cluster.arn] },
    { Effect: "Allow", Action: ["s3:ListBucket"], Resource: [p.buckets.frontend.arn] },
    { Effect: "Allow", Action: ["s3:PutObject", "s3:DeleteObject"], Resource: [pulumi.interpolate`${p.buckets.frontend.arn}/*`] },
    { Effect: "Allow", Action: ["kms:GenerateDataKey", "kms:Decrypt"], Resource: [p.keys.s3Key.arn] },
    { Effect: "Allow", Action: ["cloudfront:CreateInvalidation", "cloudfront:GetInvalidation"], Resource: [e.distribution.arn] },
    { Effect: "Allow", Action: ["logs:GetLogEvents"], Resource: ["*"] },
    ...state,
  ]);
  // Kubernetes: the deploy role edits the mira namespace and nothing else.
  new aws.eks.AccessEntry("deploy-access", { clusterName: k.cluster.name, principalArn: deployRole.arn, type: "STANDARD" });
  new aws.eks.AccessPolicyAssociation("deploy-edit-mira", {
    clusterName: k.cluster.name,
    principalArn: deployRole.arn,
    policyArn: "arn:aws:eks::aws:cluster-access-policy/AmazonEKSEditPolicy",
    accessScope: { type: "namespace", namespaces: [k.namespace] },
  });

  const previewRole = new aws.iam.Role("infra-preview", {
    name: `mira-${s}-infra-preview`,
    // Pull requests' previews run in the GitHub environment `infra-preview` (required reviewers).
    assumeRolePolicy: github(["environment:infra-preview"]),
    tags: tags(s, "delivery"),
  });
  new aws.iam.RolePolicyAttachment("infra-preview-read", { role: previewRole.name, policyArn: "arn:aws:iam::aws:policy/ReadOnlyAccess" });
  if (cfg.pulumiStateBucket) {
    new aws.iam.RolePolicy("infra-preview-state", {
      role: previewRole.id,
      policy: JSON.stringify({
        Version: "2012-10-17",
        Statement: [
          ...state,
          { Effect: "Allow", Action: ["s3:PutObject", "s3:DeleteObject"], Resource: [`arn:aws:s3:::${cfg.pulumiStateBucket}/.pulumi/locks/*`] },
        ],
      }),
    });
  }
  // `pulumi up` runs in the GitHub environment `infra`, whose deployments only main may make.
  const infraRole = new aws.iam.Role("infra", { name: `mira-${s}-infra`, assumeRolePolicy: github(["environment:infra"]), tags: tags(s, "delivery") });
  // Kubernetes: the infra role applies everything; the preview role reads.
  for (const [name, r, policy] of [
    ["infra", infraRole, "AmazonEKSClusterAdminPolicy"],
    ["infra-preview", previewRole, "AmazonEKSViewPolicy"],
  ] as const) {
    new aws.eks.AccessEntry(`${name}-access`, { clusterName: k.cluster.name, principalArn: r.arn, type: "STANDARD" });
    new aws.eks.AccessPolicyAssociation(`${name}-${policy}`, {
      clusterName: k.cluster.name,
      principalArn: r.arn,
      policyArn: `arn:aws:eks::aws:cluster-access-policy/${policy}`,
      accessScope: { type: "cluster" },
    });
  }
  new aws.iam.RolePolicyAttachment("infra-admin", { role: infraRole.name, policyArn: "arn:aws:iam::aws:policy/AdministratorAccess" });

  return { deployRole, previewRole, infraRole };
}
