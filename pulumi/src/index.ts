// The stack's program: `Pulumi.<stack>.yaml` configures it (see Pulumi.dev.yaml, Pulumi.prod.yaml).

import * as pulumi from "@pulumi/pulumi";
import { foundations } from "./foundations";

const config = new pulumi.Config("mira");
const aws = new pulumi.Config("aws");
const region = aws.require("region");

const out = foundations({
  stack: pulumi.getStack(),
  region,
  appOrigin: config.require("appOrigin"),
  cognitoDomainPrefix: config.require("cognitoDomainPrefix"),
  multiAz: config.getBoolean("multiAz") ?? true,
  deletionProtection: config.getBoolean("deletionProtection") ?? true,
  dbInstanceClass: config.get("dbInstanceClass") ?? "db.r7g.large",
  witnessRetentionDays: config.getNumber("witnessRetentionDays") ?? 2555,
  ecrKeepImages: config.getNumber("ecrKeepImages") ?? 30,
  azs: config.getObject<string[]>("azs") ?? [`${region}a`, `${region}b`],
});

export const network = out.network;
export const database = out.database;
export const messaging = out.messaging;
export const buckets = out.buckets;
export const identity = out.identity;
export const registries = out.registries;
export const roles = out.roles;
/** One settings map per service, every value from a resource. */
export const settings = out.settings;
