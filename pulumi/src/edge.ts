// CloudFront in front of everything (issue 20): the SPA from the frontend bucket through origin
// access control, `/api/*` and `/ws` to the ALB uncached (WebSocket upgrades pass), security
// headers on every answer. Paths without a file extension get the SPA's index.html from a
// viewer-request function, not from an error page, so the API's own 403s and 404s stay theirs.

import * as aws from "@pulumi/aws";
import * as pulumi from "@pulumi/pulumi";
import { API_PATHS, ORIGIN_HEADER } from "./compute";
import { type foundations, tags, tlsOnly } from "./foundations";

type Found = ReturnType<typeof foundations>;

export type EdgeConfig = {
  stack: string;
  /** The name on the ALB's certificate that resolves to the ALB: CloudFront's API origin. */
  albDomain: string;
  originVerifySecret: pulumi.Input<string>;
  /** CloudFront's own names and certificate (ACM in us-east-1); without them, the default *.cloudfront.net name. */
  cdnAliases: string[];
  cdnCertificateArn?: string;
  /** Requests one address may make in five minutes before the WAF blocks it (ADR 0037). */
  wafRateLimit: number;
};

/**
 * The gateway's Content-Security-Policy, as `content_security_policy` in gateway/src/api/web.rs
 * writes it for `connectOrigins` (a test reads that function and holds the two equal). CloudFront
 * adds this one where the origin sent none (the SPA's files from S3) and never replaces the
 * gateway's: one policy, the gateway's (ADR 0037).
 */
export function gatewayCsp(connectOrigins: string[]): string {
  return [
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",
    "font-src 'self'",
    `connect-src ${["'self'", ...connectOrigins].join(" ")}`,
    "worker-src 'self' blob:",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
    "object-src 'none'",
  ].join("; ");
}

/**
 * The connect origins the gateway gives itself in a stack (gateway/src/server.rs): Cognito's
 * hosted UI, and S3's presigned URLs (`Storage__Provider` S3); no WebSocket URL of its own (the
 * SPA's socket is this origin's `/ws`).
 */
export const stackConnectOrigins = (cognitoDomain: string) => [cognitoDomain, "https://*.amazonaws.com"];

/** The AWS managed rule groups the web ACL runs, in order (ADR 0037). */
export const WAF_MANAGED_GROUPS = ["AWSManagedRulesAmazonIpReputationList", "AWSManagedRulesCommonRuleSet", "AWSManagedRulesKnownBadInputsRuleSet"];

/** AWS's managed policies (the same ids in every account). */
export const MANAGED = {
  cachingOptimized: "658327ea-f89d-4fab-a63d-7e88639e58f6",
  cachingDisabled: "4135ea2d-6df8-44a3-9df3-4b5a84be39ad",
  allViewerExceptHostHeader: "b689b0a8-53d0-40ab-baf2-68738e2966ac",
};

/** The SPA's router: a path without a file extension is a page of the app. */
export const SPA_ROUTER = `function handler(event) {
  var r = event.request;
  if (!/\\.[A-Za-z0-9]+$/.test(r.uri)) { r.uri = "/index.html"; }
  return r;
}`;

export function edge(cfg: EdgeConfig, f: Found) {
  const s = cfg.stack;
  const frontend = f.parts.buckets.frontend;
  const oac = new aws.cloudfront.OriginAccessControl("frontend-oac", {
    name: `mira-${s}-frontend`,
    description: "CloudFront reads Mira's SPA from the frontend bucket",
    originAccessControlOriginType: "s3",
    signingBehavior: "always",
    signingProtocol: "sigv4",
  });
  const headers = new aws.cloudfront.ResponseHeadersPolicy("security-headers", {
    name: `mira-${s}-security-headers`,
    securityHeadersConfig: {
      strictTransportSecurity: { accessControlMaxAgeSec: 63_072_000, includeSubdomains: true, preload: true, override: true },
      contentTypeOptions: { override: true },
      frameOptions: { frameOption: "DENY", override: true },
      referrerPolicy: { referrerPolicy: "strict-origin-when-cross-origin", override: true },
      // The gateway's own policy (gatewayCsp), added where the origin sent none: S3 sends none
      // with the SPA's files; the gateway's stays as it wrote it.
      contentSecurityPolicy: {
        contentSecurityPolicy: pulumi.output(f.settings.api.Web__CognitoDomain).apply((d) => gatewayCsp(stackConnectOrigins(d))),
        override: false,
      },
    },
  });
  // The WAF in front of CloudFront (ADR 0037): AWS's managed rule groups (addresses known for
  // abuse, the common exploits, known bad inputs) and a rate limit per address. A CloudFront
  // web ACL lives in us-east-1. SizeRestrictions_BODY (8 KB) only counts: the API takes larger
  // JSON bodies (a report), and the slides go to S3 directly.
  const usEast1 = new aws.Provider("us-east-1", { region: "us-east-1" });
  const visibility = (metricName: string) => ({ cloudwatchMetricsEnabled: true, sampledRequestsEnabled: true, metricName });
  const waf = new aws.wafv2.WebAcl(
    "waf",
    {
      name: `mira-${s}`,
      description: "Mira: AWS managed rules and a rate limit in front of CloudFront",
      scope: "CLOUDFRONT",
      defaultAction: { allow: {} },
      rules: [
        ...WAF_MANAGED_GROUPS.map((name, i) => ({
          name,
          priority: i + 1,
          overrideAction: { none: {} },
          statement: {
            managedRuleGroupStatement: {
              vendorName: "AWS",
              name,
              ...(name === "AWSManagedRulesCommonRuleSet" ? { ruleActionOverrides: [{ name: "SizeRestrictions_BODY", actionToUse: { count: {} } }] } : {}),
            },
          },
          visibilityConfig: visibility(`mira-${s}-${name}`),
        })),
        {
          name: "rate-per-address",
          priority: WAF_MANAGED_GROUPS.length + 1,
          action: { block: {} },
          statement: { rateBasedStatement: { limit: cfg.wafRateLimit, aggregateKeyType: "IP", evaluationWindowSec: 300 } },
          visibilityConfig: visibility(`mira-${s}-rate-per-address`),
        },
      ],
      visibilityConfig: visibility(`mira-${s}-waf`),
      tags: tags(s, "edge"),
    },
    { provider: usEast1 },
  );
  const router = new aws.cloudfront.Function("spa-router", {
    name: `mira-${s}-spa-router`,
    runtime: "cloudfront-js-2.0",
    comment: "Mira's SPA: pages without a file extension are index.html",
    publish: true,
    code: SPA_ROUTER,
  });

  const api = (pathPattern: string) => ({
    pathPattern,
    targetOriginId: "api",
    viewerProtocolPolicy: "https-only",
    allowedMethods: ["GET", "HEAD", "OPTIONS", "PUT", "POST", "PATCH", "DELETE"],
    cachedMethods: ["GET", "HEAD"],
    cachePolicyId: MANAGED.cachingDisabled,
    // Every header but Host (so Upgrade and Sec-WebSocket-* reach the ALB), every cookie and query.
    originRequestPolicyId: MANAGED.allViewerExceptHostHeader,
    responseHeadersPolicyId: headers.id,
    compress: false,
  });
  const distribution = new aws.cloudfront.Distribution("cdn", {
    enabled: true,
    isIpv6Enabled: true,
    httpVersion: "http2and3",
    comment: `Mira ${s}`,
    aliases: cfg.cdnAliases.length ? cfg.cdnAliases : undefined,
    defaultRootObject: "index.html",
    priceClass: "PriceClass_100",
    webAclId: waf.arn,
    // Every request, to the log bucket (ADR 0037), without cookies (they carry sessions).
    loggingConfig: { bucket: f.parts.logBucket.bucketDomainName, prefix: "cloudfront/", includeCookies: false },
    origins: [
      { originId: "spa", domainName: frontend.bucketRegionalDomainName, originAccessControlId: oac.id },
      {
        originId: "api",
        domainName: cfg.albDomain,
        customOriginConfig: {
          httpPort: 80,
          httpsPort: 443,
          originProtocolPolicy: "https-only",
          originSslProtocols: ["TLSv1.2"],
          // WebSocket connections stay open: CloudFront's longest origin wait.
          originReadTimeout: 60,
          originKeepaliveTimeout: 60,
        },
        customHeaders: [{ name: ORIGIN_HEADER, value: cfg.originVerifySecret }],
      },
    ],
    defaultCacheBehavior: {
      targetOriginId: "spa",
      viewerProtocolPolicy: "redirect-to-https",
      allowedMethods: ["GET", "HEAD"],
      cachedMethods: ["GET", "HEAD"],
      cachePolicyId: MANAGED.cachingOptimized,
      responseHeadersPolicyId: headers.id,
      compress: true,
      functionAssociations: [{ eventType: "viewer-request", functionArn: router.arn }],
    },
    orderedCacheBehaviors: API_PATHS.map(api),
    restrictions: { geoRestriction: { restrictionType: "none" } },
    viewerCertificate: cfg.cdnCertificateArn
      ? { acmCertificateArn: cfg.cdnCertificateArn, sslSupportMethod: "sni-only", minimumProtocolVersion: "TLSv1.2_2021" }
      : { cloudfrontDefaultCertificate: true },
    tags: tags(s, "edge"),
  });
  // The frontend bucket's one policy: plain HTTP refused, and reads by this distribution only.
  new aws.s3.BucketPolicy("frontend-tls-only", {
    bucket: frontend.id,
    policy: pulumi.jsonStringify({
      Version: "2012-10-17",
      Statement: [
        tlsOnly(frontend),
        {
          Sid: "CloudFrontReads",
          Effect: "Allow",
          Principal: { Service: "cloudfront.amazonaws.com" },
          Action: "s3:GetObject",
          Resource: pulumi.interpolate`${frontend.arn}/*`,
          Condition: { StringEquals: { "AWS:SourceArn": distribution.arn } },
        },
      ],
    }),
  });
  const publicUrl = cfg.cdnAliases.length ? pulumi.output(`https://${cfg.cdnAliases[0]}`) : pulumi.interpolate`https://${distribution.domainName}`;
  return { distribution, publicUrl, outputs: { distributionId: distribution.id, domainName: distribution.domainName, publicUrl, webAclArn: waf.arn } };
}

export type Edge = ReturnType<typeof edge>;
