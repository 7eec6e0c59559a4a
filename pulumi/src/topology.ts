// The bus topology (DESIGN §5.2) from the one file `mira bus init` also reads.

import { readFileSync } from "node:fs";
import { resolve } from "node:path";

export type QueueSpec = { group: string; filter_policy: Record<string, string[]> | null };

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
