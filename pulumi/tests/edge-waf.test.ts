// ADR 0037, the edge: a WAF on CloudFront, one Content-Security-Policy (the gateway's), a NAT
// gateway per AZ. Each check on the program and on broken copies, with exact problem lists.

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { describe, it } from "node:test";
import { gatewayCsp, stackConnectOrigins, WAF_MANAGED_GROUPS } from "../src/edge";
import { edgeProblems, natProblems } from "./checks";
import { CONFIG, ofType, type Recorded, run, value } from "./harness";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));
const WEB_RS = path.resolve(__dirname, "../../../gateway/src/api/web.rs");

/** The policy `content_security_policy` in web.rs writes for `origins`: its format string, read from the source. */
function rustCsp(origins: string[]): string {
  const src = fs.readFileSync(WEB_RS, "utf8");
  const body = src.slice(src.indexOf("pub fn content_security_policy"));
  const literal = body.slice(body.indexOf("format!("));
  const m = /"((?:[^"\\]|\\[\s\S])*)"/.exec(literal);
  assert.ok(m, "no format string in content_security_policy");
  // A backslash before a newline drops the newline and the next line's leading spaces.
  const text = m![1].replace(/\\\n\s*/g, "");
  assert.equal((text.match(/\{\}/g) ?? []).length, 1, text);
  assert.match(body.slice(0, body.indexOf("format!(")), /vec!\["'self'"\.to_owned\(\)\]/, "connect-src no longer starts with 'self'");
  return text.replace("{}", ["'self'", ...origins].join(" "));
}

describe("the edge", () => {
  it("gives CloudFront the gateway's Content-Security-Policy, word for word", () => {
    const origins = ["https://mira-test.auth.eu-west-1.amazoncognito.com", "https://*.amazonaws.com"];
    assert.equal(gatewayCsp(origins), rustCsp(origins));
    assert.equal(gatewayCsp([]), rustCsp([]));
  });

  it("puts a WAF in front of CloudFront and adds no looser policy", async () => {
    const { out, resources } = await run();
    const csp = gatewayCsp(stackConnectOrigins(await value(out.settings.api.Web__CognitoDomain)));
    assert.deepEqual(edgeProblems(resources, csp, WAF_MANAGED_GROUPS), []);
    const acl = ofType(resources, "aws:wafv2/webAcl:WebAcl")[0];
    assert.equal(acl.inputs.rules.find((r: any) => r.statement.rateBasedStatement).statement.rateBasedStatement.limit, CONFIG.wafRateLimit);
    // Broken: CloudFront's policy as it was (inline styles, any wss:, any *.amazonaws.com images,
    // replacing the gateway's).
    const old = clone(resources);
    ofType(old, "aws:cloudfront/responseHeadersPolicy:ResponseHeadersPolicy")[0].inputs.securityHeadersConfig.contentSecurityPolicy = {
      contentSecurityPolicy:
        "default-src 'self'; connect-src 'self' wss: https://*.amazonaws.com https://*.amazoncognito.com; img-src 'self' data: blob: https://*.amazonaws.com; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'self'; object-src 'none'",
      override: true,
    };
    assert.deepEqual(edgeProblems(old, csp, WAF_MANAGED_GROUPS), [
      "response policy security-headers: 'unsafe-inline'",
      "response policy security-headers: any wss: origin",
      "response policy security-headers: not the gateway's Content-Security-Policy",
      "response policy security-headers: replaces the gateway's Content-Security-Policy",
    ]);
    // Broken: the common rule set only counting, no rate limit; then no web ACL at all.
    const weak = clone(resources);
    const rules = ofType(weak, "aws:wafv2/webAcl:WebAcl")[0].inputs;
    rules.rules = rules.rules.filter((r: any) => !r.statement.rateBasedStatement);
    rules.rules.find((r: any) => r.name === "AWSManagedRulesCommonRuleSet").overrideAction = { count: {} };
    assert.deepEqual(edgeProblems(weak, csp, WAF_MANAGED_GROUPS), ["web ACL waf: AWSManagedRulesCommonRuleSet only counts", "web ACL waf: no blocking rate limit"]);
    const none = clone(resources);
    delete ofType(none, "aws:cloudfront/distribution:Distribution")[0].inputs.webAclId;
    assert.deepEqual(edgeProblems(none, csp, WAF_MANAGED_GROUPS), ["distribution cdn: no web ACL"]);
  });

  it("sends each AZ's private subnets through a NAT gateway in that AZ", async () => {
    const { resources } = await run();
    assert.deepEqual(natProblems(resources), []);
    assert.equal(ofType(resources, "aws:ec2/natGateway:NatGateway").length, CONFIG.azs.length);
    // Broken: one NAT for both AZs, as before.
    const one = clone(resources);
    for (const a of ofType(one, "aws:ec2/routeTableAssociation:RouteTableAssociation")) if (a.inputs.routeTableId === "private-routes-1-id") a.inputs.routeTableId = "private-routes-id";
    assert.deepEqual(natProblems(one), ["subnet data-1 (eu-west-1b): through the NAT in eu-west-1a", "subnet compute-1 (eu-west-1b): through the NAT in eu-west-1a"]);
  });
});
