// The bus topology (DESIGN §5.2) from the one file `mira bus init` also reads.

import { readFileSync } from "node:fs";
import { resolve } from "node:path";

/** A JSON value, as a filter policy's values are: exact strings, or SNS operators such as `{"exists": false}`. */
export type JsonValue = string | number | boolean | null | JsonValue[] | { [key: string]: JsonValue };

/**
 * A consumer group: its queue gets the messages whose attributes match `filter_policy` (an SNS
 * filter policy on the message attributes; null: every message). `gpu-jobs` takes a JobQueued
 * whose `priority` is `routine` or absent (a relay of the release before publishes none),
 * `gpu-jobs-stat` one whose `priority` is `stat`.
 */
export type QueueSpec = { group: string; filter_policy: Record<string, JsonValue[]> | null };

export type Topology = {
  topic: { default_name: string; attributes: Record<string, string> };
  queue_attributes: Record<string, string>;
  dead_letter: { suffix: string; max_receive_count: number };
  subscription_attributes: Record<string, string>;
  message_attributes: string[];
  queues: QueueSpec[];
};

/** `bus/topology.json`, found from this file (src/ or bin/src/). */
export function loadTopology(): Topology {
  for (const up of ["../../bus/topology.json", "../../../bus/topology.json"]) {
    try {
      return JSON.parse(readFileSync(resolve(__dirname, up), "utf8"));
    } catch {
      // Try the next place.
    }
  }
  throw new Error("bus/topology.json not found beside pulumi/");
}

/**
 * The SNS operators a filter policy's value may be (besides an exact string), as SNS documents
 * them for message attributes.
 */
const SNS_OPERATORS = new Set(["exists", "prefix", "suffix", "anything-but", "numeric", "equals-ignore-case", "cidr"]);

/**
 * A queue's subscription filter policy as SNS takes it (JSON), or undefined for none: the file's
 * policy exactly, operators as the objects they are. Checked first: a key the relay does not
 * publish (`message_attributes`) would never match (or, with `exists: false`, always), and a
 * value other than a string or a one-key SNS operator is a mistake in the file.
 */
export function filterPolicy(spec: QueueSpec, t: Pick<Topology, "message_attributes">): string | undefined {
  if (spec.filter_policy === null) return undefined;
  for (const [key, values] of Object.entries(spec.filter_policy)) {
    const where = `bus/topology.json: ${spec.group}'s filter policy on ${key}`;
    if (!t.message_attributes.includes(key)) throw new Error(`${where}: the relay publishes no such attribute (message_attributes)`);
    if (!Array.isArray(values) || values.length === 0) throw new Error(`${where}: not a non-empty array`);
    for (const v of values) {
      if (typeof v === "string") continue;
      const ops = v !== null && typeof v === "object" && !Array.isArray(v) ? Object.keys(v) : [];
      if (ops.length !== 1 || !SNS_OPERATORS.has(ops[0])) throw new Error(`${where}: ${JSON.stringify(v)} is neither a string nor an SNS operator`);
    }
  }
  return JSON.stringify(spec.filter_policy);
}

/** SQS queue arguments for the file's queue attributes; an attribute Pulumi does not map is an error. */
export function queueArgs(attrs: Record<string, string>): {
  fifoQueue: boolean;
  deduplicationScope?: string;
  fifoThroughputLimit?: string;
  visibilityTimeoutSeconds?: number;
} {
  const out: ReturnType<typeof queueArgs> = { fifoQueue: false };
  for (const [k, v] of Object.entries(attrs)) {
    switch (k) {
      case "FifoQueue":
        out.fifoQueue = v === "true";
        break;
      case "DeduplicationScope":
        out.deduplicationScope = v;
        break;
      case "FifoThroughputLimit":
        out.fifoThroughputLimit = v;
        break;
      case "VisibilityTimeout":
        out.visibilityTimeoutSeconds = Number(v);
        break;
      default:
        throw new Error(`bus/topology.json: queue attribute ${k} has no Pulumi mapping here`);
    }
  }
  return out;
}
