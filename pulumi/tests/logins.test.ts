// Each process connects to the database as its own login (mira_svc_<process>): one secret per
// login, DATABASE_URL from the process's own, every login for `mira migrate` to make, and no
// task able to read another process's login.

import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { DB_LOGINS } from "../src/foundations";
import { ofType, type Recorded, run, stackOutputs } from "./harness";
import { K, LOGINS, loginSecretProblems, masterSecretArn, migrationLoginProblems, secretAccessProblems, serviceLoginProblems } from "./operations";

const clone = (rs: Recorded[]): Recorded[] => JSON.parse(JSON.stringify(rs));
const taskDef = (rs: Recorded[], family: string) => ofType(rs, K.taskDef).find((t) => t.inputs.family === family)!;
const secretArn = (rs: Recorded[], login: string) => ofType(rs, K.secret).find((x) => x.name === `db-login-${login}`)!.state.arn;
/** The `mira` container's secrets, by name. */
const secretsOf = (td: Recorded): Record<string, string> =>
  Object.fromEntries(JSON.parse(td.inputs.containerDefinitions).find((c: any) => c.name === "mira").secrets.map((x: any) => [x.name, x.valueFrom]));
/** Edits the `mira` container of a task definition in place. */
const editMira = (td: Recorded, f: (c: any) => void) => {
  const cs = JSON.parse(td.inputs.containerDefinitions);
  f(cs.find((c: any) => c.name === "mira"));
  td.inputs.containerDefinitions = JSON.stringify(cs);
};
const rolePolicy = (rs: Recorded[], name: string) => ofType(rs, K.rolePolicy).find((x) => x.name === `${name}-policy`)!;
const addStatement = (rs: Recorded[], role: string, statement: object) => {
  const pol = rolePolicy(rs, role);
  pol.inputs.policy = JSON.stringify({ Statement: [...JSON.parse(pol.inputs.policy).Statement, statement] });
};

describe("the database logins", () => {
  it("keep one secret per process's login, under the RDS key, and no shared one", async () => {
    const { resources } = await run();
    assert.deepEqual([...DB_LOGINS], Object.keys(LOGINS));
    assert.deepEqual(loginSecretProblems(resources), []);
    assert.deepEqual(
      ofType(resources, K.secret).filter((x) => x.name.startsWith("db-login-")).map((x) => x.inputs.name),
      ["api", "relay", "projector", "handlers", "worker"].map((l) => `mira-test/database/login/${l}`),
    );
    // Broken: the worker's secret gone, the API's under the buckets' key, the one shared secret back.
    const broken = clone(resources).filter((r) => r.name !== "db-login-worker");
    const s3Key = ofType(broken, "aws:kms/key:Key").find((k) => k.name === "s3-key")!.state.arn;
    ofType(broken, K.secret).find((x) => x.name === "db-login-api")!.inputs.kmsKeyId = s3Key;
    broken.push({
      type: K.secret,
      name: "db-app",
      inputs: { name: "mira-test/database/app" },
      state: { name: "mira-test/database/app", arn: "arn:aws:secretsmanager:eu-west-1:123456789012:mira-test/database/app" },
    });
    assert.deepEqual(loginSecretProblems(broken), [
      "the api login's secret is not under the RDS key",
      "no secret for the worker login",
      "secret mira-test/database/app is no process's login: a copy of a credential?",
    ]);
    // Broken: the hand-made copy of the master password back (the owner's connection, which
    // RDS's rotation leaves stale within a week).
    const copy = clone(resources);
    copy.push({
      type: K.secret,
      name: "db-migration",
      inputs: { name: "mira-test/database/migration" },
      state: { name: "mira-test/database/migration", arn: "arn:aws:secretsmanager:eu-west-1:123456789012:mira-test/database/migration" },
    });
    assert.deepEqual(loginSecretProblems(copy), ["secret mira-test/database/migration is no process's login: a copy of a credential?"]);
  });

  it("export each login's secret as database.loginSecretArns", async () => {
    const { resources } = await run();
    const out = await stackOutputs();
    assert.deepEqual(out.database.loginSecretArns, Object.fromEntries(Object.keys(LOGINS).map((l) => [l, secretArn(resources, l)])));
    assert.ok(!("appSecretArn" in out.database), JSON.stringify(Object.keys(out.database)));
  });

  it("give each service DATABASE_URL from its own login's secret", async () => {
    const { resources } = await run();
    assert.deepEqual(serviceLoginProblems(resources), []);
    for (const service of ["api", "relay", "projector", "handlers"]) {
      assert.equal(secretsOf(taskDef(resources, `mira-test-${service}`)).DATABASE_URL, secretArn(resources, service), service);
    }
    // Broken: the API and the relay swapped; the projector given its URL as plain text.
    const broken = clone(resources);
    editMira(taskDef(broken, "mira-test-api"), (c) => (c.secrets = [{ name: "DATABASE_URL", valueFrom: secretArn(broken, "relay") }]));
    editMira(taskDef(broken, "mira-test-relay"), (c) => (c.secrets = [{ name: "DATABASE_URL", valueFrom: secretArn(broken, "api") }]));
    editMira(taskDef(broken, "mira-test-projector"), (c) => {
      c.secrets = [];
      c.environment.push({ name: "DATABASE_URL", value: "postgres://mira_svc_projector:x@db/mira" });
    });
    assert.deepEqual(serviceLoginProblems(broken).sort(), [
      "service mira-test-api: DATABASE_URL is the relay login's secret, not the api login's secret",
      "service mira-test-projector: DATABASE_URL is postgres://mira_svc_projector:x@db/mira, not the projector login's secret",
      "service mira-test-relay: DATABASE_URL is the api login's secret, not the relay login's secret",
    ]);
    // Broken: the handlers' service also running the relay, so no one login fits it.
    const twice = clone(resources);
    editMira(taskDef(twice, "mira-test-handlers"), (c) => {
      for (const e of c.environment) if (e.name === "Roles__Enabled") e.value = "handlers,relay";
    });
    assert.deepEqual(serviceLoginProblems(twice), [
      "service mira-test-handlers: runs handlers, relay, more than one process's login",
      "no service runs the handlers",
    ]);
  });

  it("give mira migrate the owner's credentials from RDS's master secret, which RDS rotates, every login's, and no DATABASE_URL", async () => {
    const { resources } = await run();
    assert.deepEqual(migrationLoginProblems(resources), []);
    const migrate = taskDef(resources, "mira-test-migrate");
    const master = masterSecretArn(resources)!;
    assert.equal(master, "arn:aws:secretsmanager:eu-west-1:123456789012:secret:rds-master");
    assert.deepEqual(secretsOf(migrate), {
      PGUSER: `${master}:username::`,
      PGPASSWORD: `${master}:password::`,
      ...Object.fromEntries(Object.entries(LOGINS).map(([l, setting]) => [setting, secretArn(resources, l)])),
    });
    const env = Object.fromEntries(JSON.parse(migrate.inputs.containerDefinitions)[0].environment.map((e: any) => [e.name, e.value]));
    assert.equal(
      env.Database__MigrationUrl,
      "postgres://mira-test.cluster.eu-west-1.rds.amazonaws.com:5432/mira?sslmode=verify-full&sslrootcert=/usr/share/mira/rds-global-bundle.pem",
    );
    // Broken: DATABASE_URL back, the worker's login missing, the handlers' login under a wrong name.
    const broken = clone(resources);
    editMira(taskDef(broken, "mira-test-migrate"), (c) => {
      c.secrets = c.secrets
        .filter((x: any) => x.name !== "Database__Logins__Worker")
        .map((x: any) => (x.name === "Database__Logins__Handlers" ? { ...x, name: "Database__Logins__Handler" } : x));
      c.secrets.push({ name: "DATABASE_URL", valueFrom: secretArn(broken, "api") });
    });
    assert.deepEqual(migrationLoginProblems(broken), [
      "Database__Logins__Handlers is not set, not the handlers login's secret",
      "Database__Logins__Worker is not set, not the worker login's secret",
      "Database__Logins__Handler is no process's login",
      "mira migrate is given DATABASE_URL (the api login's secret)",
    ]);
    // Broken: the owner's URL a copy in a secret of its own (as before), with no PGUSER or
    // PGPASSWORD; then the password from the master secret's whole value and the user written
    // into the URL, in plain text.
    const copied = clone(resources);
    const copySecret = "arn:aws:secretsmanager:eu-west-1:123456789012:mira-test/database/migration";
    editMira(taskDef(copied, "mira-test-migrate"), (c) => {
      c.secrets = [{ name: "Database__MigrationUrl", valueFrom: copySecret }, ...c.secrets.filter((x: any) => !x.name.startsWith("PG"))];
      c.environment = c.environment.filter((e: any) => e.name !== "Database__MigrationUrl");
    });
    assert.deepEqual(migrationLoginProblems(copied), [
      "PGUSER is not set, not the username of RDS's master secret",
      "PGPASSWORD is not set, not the password of RDS's master secret",
      `Database__MigrationUrl is a secret (${copySecret}): a copy of the owner's password`,
    ]);
    const plain = clone(resources);
    editMira(taskDef(plain, "mira-test-migrate"), (c) => {
      for (const x of c.secrets) if (x.name === "PGPASSWORD") x.valueFrom = master;
      for (const e of c.environment) if (e.name === "Database__MigrationUrl") e.value = e.value.replace("postgres://", "postgres://mira_owner@").replace("verify-full", "require");
    });
    assert.deepEqual(migrationLoginProblems(plain), [
      "PGPASSWORD is RDS's master secret, not the password of RDS's master secret",
      "Database__MigrationUrl names a user or a password (mira_owner): they come from RDS's master secret",
      "Database__MigrationUrl's sslmode is require, not verify-full",
    ]);
  });

  it("let no task's execution role, and no task's own role, read another process's login", async () => {
    const { resources } = await run();
    assert.deepEqual(secretAccessProblems(resources), []);
    // One execution role per family, each its own.
    const families = ofType(resources, K.taskDef);
    assert.equal(new Set(families.map((td) => td.inputs.executionRoleArn)).size, families.length);
    // Broken: one execution role for every task, as before (the migration's, which reads every login).
    const shared = clone(resources);
    const migrateExecution = taskDef(shared, "mira-test-migrate").inputs.executionRoleArn;
    for (const td of ofType(shared, K.taskDef)) td.inputs.executionRoleArn = migrateExecution;
    const found = secretAccessProblems(shared);
    assert.ok(found.includes("mira-test-api: its execution role migrate-execution may read the worker login's secret"), String(found));
    assert.ok(found.includes("mira-test-api: its execution role migrate-execution may read RDS's master secret"), String(found));
    assert.ok(found.includes("mira-test-relay: its execution role migrate-execution may read the api login's secret"), String(found));
    assert.ok(!found.some((x) => x.startsWith("mira-test-migrate:")), String(found));
    // mira-test-audit-verify reads the relay's login: api, projector, handlers, worker and the owner's are too many.
    assert.equal(found.filter((x) => x.startsWith("mira-test-audit-verify:")).length, 5, String(found));
    // Broken: the API's execution role reading every database secret by a wildcard, the
    // handlers' task role reading its own login, the worker's pods and role given the API's.
    const broken = clone(resources);
    addStatement(broken, "api-execution", { Effect: "Allow", Action: ["secretsmanager:Get*"], Resource: ["arn:aws:secretsmanager:eu-west-1:123456789012:mira-test/database/*"] });
    addStatement(broken, "roles", { Effect: "Allow", Action: "secretsmanager:GetSecretValue", Resource: secretArn(broken, "handlers") });
    const pod = ofType(broken, K.deployment)[0].inputs.spec.template.spec;
    for (const e of pod.initContainers[0].env) if (e.name === "SECRET") e.value = secretArn(broken, "api");
    addStatement(broken, "worker", { Effect: "Allow", Action: ["secretsmanager:GetSecretValue"], Resource: [secretArn(broken, "api")] });
    assert.deepEqual(secretAccessProblems(broken), [
      "mira-test-api: its execution role api-execution may read the relay login's secret",
      "mira-test-api: its execution role api-execution may read the projector login's secret",
      "mira-test-api: its execution role api-execution may read the handlers login's secret",
      "mira-test-api: its execution role api-execution may read the worker login's secret",
      "mira-test-relay: its task role roles may read the handlers login's secret",
      "mira-test-projector: its task role roles may read the handlers login's secret",
      "mira-test-handlers: its task role roles may read the handlers login's secret",
      "the worker's pods do not read the worker login's secret",
      "the worker's pods read the api login's secret",
      "the worker's role may read the api login's secret",
    ]);
  });
});
