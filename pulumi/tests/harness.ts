// Runs the program under Pulumi's mocks (no CLI, no cloud) and records every resource with
// its inputs, so the tests can read what would be created.

import * as pulumi from "@pulumi/pulumi";

export type Recorded = { type: string; name: string; inputs: Record<string, any>; state: Record<string, any> };

export const ACCOUNT = "123456789012";
export const REGION = "eu-west-1";

export const recorded: Recorded[] = [];

pulumi.runtime.setMocks(
  {
    newResource(a: pulumi.runtime.MockResourceArgs) {
      const name = a.inputs.name ?? a.inputs.bucket ?? a.inputs.identifier ?? a.name;
      const service = a.type.split(":")[1].split("/")[0];
      const state: Record<string, any> = { ...a.inputs, name, arn: `arn:aws:${service}:${REGION}:${ACCOUNT}:${name}` };
      if (a.type === "aws:sqs/queue:Queue") state.url = `https://sqs.${REGION}.amazonaws.com/${ACCOUNT}/${name}`;
      if (a.type === "aws:kms/key:Key") state.keyId = `${a.name}-key-id`;
      if (a.type === "aws:ecr/repository:Repository") state.repositoryUrl = `${ACCOUNT}.dkr.ecr.${REGION}.amazonaws.com/${name}`;
      if (a.type === "aws:rds/instance:Instance") {
        state.endpoint = `${name}.cluster.${REGION}.rds.amazonaws.com:5432`;
        state.masterUserSecrets = [{ secretArn: `arn:aws:secretsmanager:${REGION}:${ACCOUNT}:secret:rds-master` }];
      }
      recorded.push({ type: a.type, name: a.name, inputs: a.inputs, state });
      return { id: `${a.name}-id`, state };
    },
    call(a: pulumi.runtime.MockCallArgs) {
      if (a.token === "aws:index/getCallerIdentity:getCallerIdentity") {
        return { accountId: ACCOUNT, arn: `arn:aws:iam::${ACCOUNT}:user/test`, userId: "test", id: ACCOUNT };
      }
      return a.inputs;
    },
  },
  "mira",
  "test",
  false,
);

export function value<T>(o: pulumi.Output<T> | T): Promise<T> {
  return pulumi.Output.isInstance(o) ? new Promise((ok) => (o as pulumi.Output<T>).apply(ok)) : Promise.resolve(o as T);
}

/** Runs the program once; later calls return the same records. */
let ran: Promise<{ out: any; resources: Recorded[] }> | null = null;
export function run() {
  ran ??= (async () => {
    const { foundations } = await import("../src/foundations");
    const out = foundations({
      stack: "test",
      region: REGION,
      appOrigin: "https://mira.example.org",
      cognitoDomainPrefix: "mira-test",
      multiAz: true,
      deletionProtection: true,
      dbInstanceClass: "db.r7g.large",
      witnessRetentionDays: 2555,
      ecrKeepImages: 30,
      azs: [`${REGION}a`, `${REGION}b`],
    });
    const settings = {
      api: await resolveMap(out.settings.api),
      roles: await resolveMap(out.settings.roles),
      worker: await resolveMap(out.settings.worker),
    };
    // Let every resource registration finish.
    await new Promise((r) => setTimeout(r, 200));
    return { out: { ...out, settings }, resources: recorded };
  })();
  return ran;
}

async function resolveMap(m: Record<string, pulumi.Output<string>>): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(m)) out[k] = await value(v);
  return out;
}

export const ofType = (rs: Recorded[], type: string) => rs.filter((r) => r.type === type);
