/**
 * A split's public description (`split.json`, written by `vault split`):
 * the model's signature, the vendor's policy, and per shipped cut the head
 * file and its SHA-256, the tail's model id, the tensors that cross (name on
 * the wire, dtype, shape, encoding), and the costs measured at split time.
 */

import { ConfigError } from "./errors.js";

export const SPLIT_FORMAT = "vault-split/1";

export interface TensorSpec {
  name: string;
  dtype: string;
  shape: (number | string | null)[] | null;
}

export interface CrossingSpec extends TensorSpec {
  wire_name: string;
  encoding: string;
  scale?: number;
}

export interface CutSpec {
  name: string;
  at: string[];
  all_server: boolean;
  head: string | null;
  head_sha256?: string;
  head_model_id?: string;
  tail_model_id: string;
  crossing: CrossingSpec[];
  cost?: { cut: string; head_ms: number; tail_ms: number; bytes_up: number; bytes_down: number };
  accuracy?: Record<string, unknown>;
}

export interface SplitDescription {
  format: string;
  model_id: string;
  inputs: TensorSpec[];
  outputs: TensorSpec[];
  cuts: CutSpec[];
  default: string;
  planned_for?: { rtt_ms: number; mbit: number };
}

/** Check that `value` is a split description this client understands. */
export function checkDescription(value: unknown, where: string): SplitDescription {
  const d = value as Partial<SplitDescription> | null;
  if (!d || typeof d !== "object" || d.format !== SPLIT_FORMAT) {
    throw new ConfigError(`${where}: not a vault split description (${SPLIT_FORMAT})`, "config");
  }
  if (!Array.isArray(d.cuts) || d.cuts.length === 0) {
    throw new ConfigError(`${where}: ships no cut`, "config");
  }
  if (!Array.isArray(d.inputs) || !Array.isArray(d.outputs)) {
    throw new ConfigError(`${where}: no signature`, "config");
  }
  for (const c of d.cuts) {
    if (c.head !== null && typeof c.head === "string" && c.head.endsWith(".vault")) {
      throw new ConfigError(
        `${where}: cut ${c.name}'s head is sealed (--seal-head): a page cannot run a ` +
          "sealed head; split with a plain head for the web", "config",
      );
    }
  }
  return d as SplitDescription;
}
