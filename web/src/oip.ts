/**
 * The Open Inference Protocol v2 (KServe / Triton) REST client, with the
 * binary tensor data extension: the request is a JSON header
 * (`Inference-Header-Content-Length` bytes) followed by each input's raw
 * little-endian bytes (`parameters.binary_data_size`); the answer likewise
 * for every output (`parameters.binary_data_output`). No JSON number arrays
 * cross for tensors, so a float16 or int8 cut tensor costs 2 or 1 bytes per
 * element on the wire, exactly as vault/hybrid encodes it.
 *
 *     const tail = new OipClient("https://host:8443", () => token);
 *     const out = await tail.infer("clf.tail", [{ name: "h2__f16", type: "float16", dims: [1, 64], data }]);
 */

import { ConfigError, UnavailableError, VaultError, errorFor } from "./errors.js";

/** A tensor's element type, as onnxruntime-web names it. */
export type DType =
  | "float32" | "float64" | "float16" | "int8" | "uint8" | "int16" | "uint16"
  | "int32" | "uint32" | "int64" | "uint64" | "bool" | "string";

export type TypedArray =
  | Float32Array | Float64Array | Int8Array | Uint8Array | Int16Array | Uint16Array
  | Int32Array | Uint32Array | BigInt64Array | BigUint64Array;

/** A tensor as it crosses: name, type, dims, and its elements. */
export interface WireTensor {
  name: string;
  type: DType;
  dims: readonly number[];
  data: TypedArray | readonly string[];
}

const DATATYPE: Record<DType, string> = {
  float32: "FP32", float64: "FP64", float16: "FP16", int8: "INT8", uint8: "UINT8",
  int16: "INT16", uint16: "UINT16", int32: "INT32", uint32: "UINT32", int64: "INT64",
  uint64: "UINT64", bool: "BOOL", string: "BYTES",
};
const FROM_DATATYPE: Record<string, DType> = Object.fromEntries(
  Object.entries(DATATYPE).map(([k, v]) => [v, k as DType]),
);

type ArrayCtor = { new (buf: ArrayBuffer, offset?: number, length?: number): TypedArray; BYTES_PER_ELEMENT: number };
const ARRAY: Record<Exclude<DType, "string">, ArrayCtor> = {
  float32: Float32Array, float64: Float64Array, float16: Uint16Array, int8: Int8Array,
  uint8: Uint8Array, int16: Int16Array, uint16: Uint16Array, int32: Int32Array,
  uint32: Uint32Array, int64: BigInt64Array, uint64: BigUint64Array, bool: Uint8Array,
};

export function datatypeOf(t: DType): string {
  return DATATYPE[t];
}

export function count(dims: readonly number[]): number {
  return dims.reduce((a, b) => a * b, 1);
}

/** A tensor's raw little-endian bytes (BYTES: each element a 4-byte length, then UTF-8). */
export function toBytes(t: WireTensor): Uint8Array {
  if (t.type === "string") {
    const enc = new TextEncoder();
    const parts = (t.data as readonly string[]).map((s) => enc.encode(s));
    const out = new Uint8Array(parts.reduce((a, p) => a + 4 + p.length, 0));
    const view = new DataView(out.buffer);
    let at = 0;
    for (const p of parts) {
      view.setUint32(at, p.length, true);
      out.set(p, at + 4);
      at += 4 + p.length;
    }
    return out;
  }
  const a = t.data as TypedArray;
  // bool may come as a Uint8Array of 0/1 already; other types are their own bytes
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** A tensor from raw little-endian bytes (copied: the view is aligned and owned). */
export function fromBytes(name: string, type: DType, dims: readonly number[], raw: Uint8Array): WireTensor {
  if (type === "string") {
    const dec = new TextDecoder();
    const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    const out: string[] = [];
    let at = 0;
    while (at + 4 <= raw.byteLength) {
      const n = view.getUint32(at, true);
      out.push(dec.decode(raw.subarray(at + 4, at + 4 + n)));
      at += 4 + n;
    }
    return { name, type, dims, data: out };
  }
  const ctor = ARRAY[type];
  const n = count(dims);
  if (n * ctor.BYTES_PER_ELEMENT !== raw.byteLength) {
    throw new VaultError(
      `output ${name}: ${raw.byteLength} bytes for ${n} ${type} elements`, "protocol",
    );
  }
  const copy = raw.slice().buffer as ArrayBuffer;
  return { name, type, dims, data: new ctor(copy, 0, n) };
}

function fromJsonData(name: string, type: DType, dims: readonly number[], data: unknown[]): WireTensor {
  const flat = (data as unknown[]).flat(Infinity as 1);
  if (type === "string") return { name, type, dims, data: flat.map(String) };
  if (type === "int64") return { name, type, dims, data: BigInt64Array.from(flat.map((x) => BigInt(x as number))) };
  if (type === "uint64") return { name, type, dims, data: BigUint64Array.from(flat.map((x) => BigInt(x as number))) };
  if (type === "bool") return { name, type, dims, data: Uint8Array.from(flat.map((x) => (x ? 1 : 0))) };
  const ctor = ARRAY[type] as unknown as { from(a: ArrayLike<number>): TypedArray };
  return { name, type, dims, data: ctor.from(flat as number[]) };
}

/**
 * Where the bearer token comes from: one token (for every tail it names), a
 * map from tail model id to token, or a function the vendor's page supplies
 * (called before each call with the tail's model id; fetch and cache a token
 * from your backend there).
 */
export type TokenSource =
  | string
  | Readonly<Record<string, string>>
  | ((model: string) => string | Promise<string>);

interface OutputHead {
  name: string;
  datatype: string;
  shape: number[];
  parameters?: { binary_data_size?: number };
  data?: unknown[];
}

/** One result: the outputs, and the bytes that crossed each way. */
export interface InferResult {
  outputs: WireTensor[];
  bytesUp: number;
  bytesDown: number;
}

export class OipClient {
  readonly base: string;

  constructor(server: string, private readonly token: TokenSource, private readonly fetchFn: typeof fetch = fetch.bind(globalThis)) {
    this.base = server.replace(/\/+$/, "");
  }

  private async bearer(model: string): Promise<string> {
    const src = this.token;
    const t = typeof src === "function" ? await src(model) : typeof src === "string" ? src : src[model];
    if (!t) throw new ConfigError(`no token for model '${model}'`, "config");
    return `Bearer ${t}`;
  }

  private async send(url: string, init: RequestInit): Promise<Response> {
    try {
      return await this.fetchFn(url, init);
    } catch (exc) {
      // the browser says no more than this (a refused connection, a CORS refusal,
      // an untrusted certificate all look the same to a page): say where
      throw new UnavailableError(
        `cannot reach the service at ${this.base} (${(exc as Error).message}); ` +
          "is it running, is its certificate trusted, and does it allow this page's origin (CORS)?",
        "unavailable",
      );
    }
  }

  /** One small round trip (`GET /v2/health/live`): the link's RTT, no token spent. */
  async ping(): Promise<number> {
    const t0 = performance.now();
    const r = await this.send(`${this.base}/v2/health/live`, { method: "GET", cache: "no-store" });
    await r.arrayBuffer();
    return performance.now() - t0;
  }

  /** `POST /v2/models/{model}/infer` with binary inputs and outputs. */
  async infer(model: string, inputs: readonly WireTensor[], outputs?: readonly string[]): Promise<InferResult> {
    const blobs = inputs.map(toBytes);
    const head: Record<string, unknown> = {
      inputs: inputs.map((t, i) => ({
        name: t.name,
        datatype: DATATYPE[t.type],
        shape: [...t.dims],
        parameters: { binary_data_size: blobs[i]!.byteLength },
      })),
      parameters: { binary_data_output: true },
    };
    if (outputs) head["outputs"] = outputs.map((name) => ({ name, parameters: { binary_data: true } }));
    const json = new TextEncoder().encode(JSON.stringify(head));
    const body = new Uint8Array(json.byteLength + blobs.reduce((a, b) => a + b.byteLength, 0));
    body.set(json, 0);
    let at = json.byteLength;
    for (const b of blobs) {
      body.set(b, at);
      at += b.byteLength;
    }
    const r = await this.send(`${this.base}/v2/models/${encodeURIComponent(model)}/infer`, {
      method: "POST",
      headers: {
        "Authorization": await this.bearer(model),
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": String(json.byteLength),
      },
      body,
      cache: "no-store",
    });
    const raw = new Uint8Array(await r.arrayBuffer());
    if (!r.ok) throw errorOf(r, raw);
    return { outputs: parseAnswer(r, raw), bytesUp: body.byteLength, bytesDown: raw.byteLength };
  }
}

function errorOf(r: Response, raw: Uint8Array): VaultError {
  let code = "vault_error";
  let message = `the service answered ${r.status}`;
  try {
    const j = JSON.parse(new TextDecoder().decode(raw)) as { error?: string; code?: string };
    if (typeof j.code === "string") code = j.code;
    if (typeof j.error === "string") message = j.error.replace(/^\[[a-z_]+\]\s*/, "");
  } catch {
    /* not JSON: the status says it */
  }
  if (code === "vault_error") {
    code = r.status === 401 ? "token_invalid" : r.status === 429 ? "quota_exhausted"
      : r.status === 404 ? "unknown_model" : r.status >= 500 ? "unavailable" : code;
  }
  const wait = Number(r.headers.get("Retry-After"));
  return errorFor(code, message, r.status, Number.isFinite(wait) && wait > 0 ? wait : undefined);
}

function parseAnswer(r: Response, raw: Uint8Array): WireTensor[] {
  const hlen = r.headers.get("Inference-Header-Content-Length");
  if (hlen === null && (r.headers.get("Content-Type") ?? "").includes("octet-stream")) {
    throw new VaultError(
      "the service answered in binary but does not let this page read " +
        "Inference-Header-Content-Length (CORS: Access-Control-Expose-Headers)", "protocol",
    );
  }
  const n = hlen === null ? raw.byteLength : Number(hlen);
  if (!Number.isInteger(n) || n < 0 || n > raw.byteLength) {
    throw new VaultError("the answer's Inference-Header-Content-Length is not in the body", "protocol");
  }
  const head = JSON.parse(new TextDecoder().decode(raw.subarray(0, n))) as { outputs?: OutputHead[] };
  const out: WireTensor[] = [];
  let at = n;
  for (const o of head.outputs ?? []) {
    const type = FROM_DATATYPE[o.datatype];
    if (!type) throw new VaultError(`output ${o.name}: unknown datatype ${o.datatype}`, "protocol");
    const size = o.parameters?.binary_data_size;
    if (size !== undefined) {
      if (at + size > raw.byteLength) throw new VaultError(`output ${o.name}: binary data past the end`, "protocol");
      out.push(fromBytes(o.name, type, o.shape, raw.subarray(at, at + size)));
      at += size;
    } else {
      out.push(fromJsonData(o.name, type, o.shape, o.data ?? []));
    }
  }
  return out;
}
