/**
 * A split model in a web page: the head runs here (onnxruntime-web), the
 * protected tail on the vendor's `vault worker serve` (Open Inference
 * Protocol REST, binary tensors, a short-lived bearer token). The page never
 * holds the tail: not its package, not its weights, not a licence.
 *
 *     import * as vault from "@vault-sandbox/web";
 *     const model = await vault.open("/models/clf.split/", { server: "https://host:8443", token });
 *     model.inputs;                                  // { image: { dtype: "uint8", shape: ["N", 3, "H", "W"] } }
 *     const out = await model.compute({ image: tensor });
 *     model.close();
 */

import * as ort from "onnxruntime-web";

import { ComputeError, ConfigError, InputError, IntegrityError, VaultError } from "./errors.js";
import { OipClient, count, type DType, type TokenSource, type TypedArray, type WireTensor } from "./oip.js";
import { LinkEstimator, Replanner, plan, type CutCost, type Link } from "./plan.js";
import { checkDescription, type CutSpec, type SplitDescription, type TensorSpec } from "./split.js";

/** What a caller passes: an onnxruntime-web Tensor, or its three fields. */
export type TensorInput =
  | ort.Tensor
  | { type?: string; data: TypedArray | readonly string[]; dims: readonly number[] };

export interface OpenOptions {
  /** The service's base URL (`https://host:8443`): `vault worker serve --http`. */
  server: string;
  /** A bearer token minted from a call licence by the vendor's backend, or a function that fetches one. */
  token: TokenSource;
  /** onnxruntime-web execution providers for the head; default: WebGPU, then WebNN, where the browser offers them, then WebAssembly. */
  executionProviders?: string[];
  /** Where onnxruntime-web's .wasm/.mjs files are served (ort.env.wasm.wasmPaths). */
  wasmPaths?: string;
  /** Pin a cut (`c0`, `c1`, ...): no planning. */
  cut?: string;
  /** Move between shipped cuts as the link changes (default true). */
  replan?: boolean;
  /** How much cheaper another cut must be to move (default 0.15) and on how many calls in a row (3). */
  hysteresis?: number;
  patience?: number;
  /** Tail calls in flight at once (default 2): the head of call i+1 runs while the tail of call i is on the wire. */
  window?: number;
  /** Runs per head to measure it in this browser at open (default 5, the median kept; 0: take split.json's costs). */
  profileRuns?: number;
  /** The link to assume before calls have measured it (default: split.json's planned_for, else 100 Mbit/s). */
  assumeMbit?: number;
  /** RTT pings while idle, ms (default 2000; 0: none). */
  pingEveryMs?: number;
  /** fetch to use (default the page's). */
  fetch?: typeof fetch;
}

export interface Signature {
  dtype: string;
  shape: (number | string | null)[] | null;
}

interface CutState {
  spec: CutSpec;
  session: ort.InferenceSession | null; // null: all-server (no head)
  crossing: string[]; // wire names, in split.json's order
  cost: CutCost;
  headMs: number | null; // EWMA of this browser's head runs
}

function signature(items: TensorSpec[]): Record<string, Signature> {
  return Object.fromEntries(items.map((d) => [d.name, { dtype: d.dtype, shape: d.shape }]));
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor(s.length / 2)]! : 0;
}

async function sha256(data: Uint8Array): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", data as unknown as ArrayBuffer));
  return "sha256:" + Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The execution providers this browser offers, best first (WebAssembly always). */
export async function availableProviders(): Promise<string[]> {
  const out: string[] = [];
  const nav = globalThis.navigator as unknown as {
    gpu?: { requestAdapter(): Promise<unknown> };
    ml?: { createContext(): Promise<unknown> };
  } | undefined;
  try {
    if (nav?.gpu && (await nav.gpu.requestAdapter())) out.push("webgpu");
  } catch {
    /* no adapter: not offered */
  }
  try {
    if (nav?.ml && (await nav.ml.createContext())) out.push("webnn");
  } catch {
    /* not offered */
  }
  out.push("wasm");
  return out;
}

function zeros(spec: TensorSpec): ort.Tensor {
  const dims = (spec.shape ?? []).map((d) => (typeof d === "number" && d > 0 ? d : 1));
  const n = count(dims);
  const t = spec.dtype as DType;
  const data =
    t === "int64" ? new BigInt64Array(n)
    : t === "uint64" ? new BigUint64Array(n)
    : t === "string" ? new Array<string>(n).fill("")
    : t === "float16" ? new Uint16Array(n)
    : t === "bool" ? new Uint8Array(n)
    : new ({ float32: Float32Array, float64: Float64Array, int8: Int8Array, uint8: Uint8Array,
             int16: Int16Array, uint16: Uint16Array, int32: Int32Array, uint32: Uint32Array,
           } as Record<string, { new (n: number): TypedArray }>)[t]!(n);
  return new ort.Tensor(t as ort.Tensor.Type, data as ort.Tensor.DataType, dims);
}

/** A small async semaphore: at most `n` holders. */
class Slots {
  private waiting: (() => void)[] = [];
  constructor(private free: number) {}
  async take(): Promise<void> {
    if (this.free > 0) {
      this.free -= 1;
      return;
    }
    await new Promise<void>((resolve) => this.waiting.push(resolve));
  }
  give(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.free += 1;
  }
}

export class SplitModel {
  readonly modelId: string;
  /** The whole model's public signature: name -> { dtype, shape }. */
  readonly inputs: Record<string, Signature>;
  readonly outputs: Record<string, Signature>;
  /** The onnxruntime-web execution providers the head runs on. */
  readonly executionProviders: string[];
  /** The measured link, once a call has measured it. */
  readonly estimator = new LinkEstimator();
  private readonly cuts: Map<string, CutState>;
  private current: string;
  private readonly replanner: Replanner | null;
  private readonly tail: OipClient;
  private readonly slots: Slots;
  private headChain: Promise<unknown> = Promise.resolve();
  private inFlight = 0;
  private closed = false;
  private pinger: ReturnType<typeof setInterval> | null = null;
  /** Calls answered, and the bytes that crossed each way, per cut. */
  readonly stats = { calls: 0, bytesUp: 0, bytesDown: 0, switches: 0 };

  /** @internal use {@link open} */
  constructor(desc: SplitDescription, cuts: Map<string, CutState>, first: string, tail: OipClient,
              providers: string[], opts: OpenOptions) {
    this.modelId = desc.model_id;
    this.inputs = signature(desc.inputs);
    this.outputs = signature(desc.outputs);
    this.cuts = cuts;
    this.current = first;
    this.tail = tail;
    this.executionProviders = providers;
    this.slots = new Slots(Math.max(1, opts.window ?? 2));
    const costs = [...cuts.values()].map((c) => c.cost);
    this.replanner = opts.replan === false || opts.cut || cuts.size < 2
      ? null
      : new Replanner(costs, first, opts.hysteresis ?? 0.15, opts.patience ?? 3);
    const every = opts.pingEveryMs ?? 2000;
    if (every > 0) {
      this.pinger = setInterval(() => {
        if (this.inFlight === 0 && !this.closed) {
          this.tail.ping().then((ms) => this.estimator.observeRtt(ms), () => undefined);
        }
      }, every);
    }
  }

  /** The cut in use (`c0`, `c1`, ...). */
  get cut(): string {
    return this.current;
  }

  /** The planner's view: each shipped cut's cost as measured here, and the link. */
  get plan(): { link: Link | null; cuts: CutCost[] } {
    return { link: this.estimator.link, cuts: [...this.cuts.values()].map((c) => ({ ...c.cost })) };
  }

  private feeds(inputs: Record<string, TensorInput>): Record<string, ort.Tensor> {
    if (this.closed) throw new ConfigError("the model is closed", "config");
    const unknown = Object.keys(inputs).filter((k) => !(k in this.inputs));
    if (unknown.length) {
      throw new InputError(`unknown input '${unknown[0]}' (inputs: ${Object.keys(this.inputs).sort().join(", ")})`, "bad_input");
    }
    const out: Record<string, ort.Tensor> = {};
    for (const [name, sig] of Object.entries(this.inputs)) {
      const v = inputs[name];
      if (v === undefined) throw new InputError(`missing input '${name}'`, "bad_input");
      const type = (v as { type?: string }).type ?? sig.dtype;
      if (type !== sig.dtype) {
        throw new InputError(`input '${name}' is ${type}, the model takes ${sig.dtype}`, "bad_input");
      }
      const dims = [...v.dims];
      const shape = sig.shape;
      if (shape && (shape.length !== dims.length ||
          shape.some((d, i) => typeof d === "number" && d !== dims[i]))) {
        throw new InputError(`input '${name}' has shape [${dims}], the model takes [${shape}]`, "bad_input");
      }
      if (!(v instanceof ort.Tensor)) {
        // said here, as the vault's InputError (onnxruntime-web's own Error named no input)
        const want = dims.reduce((a, d) => a * d, 1);
        const have = (v.data as { length?: number }).length;
        if (!dims.every((d) => Number.isInteger(d) && d >= 0) || have !== want) {
          throw new InputError(
            `input '${name}' holds ${have} values, its dims [${dims}] need ${want}`, "bad_input");
        }
      }
      out[name] = v instanceof ort.Tensor ? v : new ort.Tensor(type as ort.Tensor.Type, v.data as ort.Tensor.DataType, dims);
    }
    return out;
  }

  private async runHead(c: CutState, feeds: Record<string, ort.Tensor>): Promise<WireTensor[]> {
    if (!c.session) {
      return Object.entries(feeds).map(([name, t]) => ({ name, type: t.type as DType, dims: t.dims, data: t.data as TypedArray }));
    }
    const session = c.session;
    // one head at a time (an onnxruntime-web session runs one call at a time)
    const run = this.headChain.then(async () => {
      const t0 = performance.now();
      let out: ort.InferenceSession.ReturnType;
      try {
        out = await session.run(feeds);
      } catch (exc) {
        const text = String((exc as Error).message ?? exc).split("\n")[0]!.slice(0, 200);
        throw /input|dims|shape|type/i.test(text)
          ? new InputError(`bad input for the head: ${text}`, "bad_input")
          : new ComputeError("the head failed to run", "compute");
      }
      const ms = performance.now() - t0;
      c.headMs = c.headMs === null ? ms : 0.7 * c.headMs + 0.3 * ms;
      return out;
    });
    this.headChain = run.catch(() => undefined);
    const out = await run;
    return c.crossing.map((name) => {
      const t = out[name]!;
      return { name, type: t.type as DType, dims: t.dims, data: t.data as TypedArray };
    });
  }

  private async runTail(c: CutState, mid: WireTensor[], outputs?: readonly string[]): Promise<Record<string, ort.Tensor>> {
    await this.slots.take();
    this.inFlight += 1;
    const alone = this.inFlight === 1;
    let res;
    const t0 = performance.now();
    try {
      res = await this.tail.infer(c.spec.tail_model_id, mid, outputs);
    } finally {
      this.inFlight -= 1;
      this.slots.give();
    }
    const wall = performance.now() - t0;
    this.stats.calls += 1;
    this.stats.bytesUp += res.bytesUp;
    this.stats.bytesDown += res.bytesDown;
    if (alone) {
      if (this.estimator.rttMs === null) this.estimator.observeRtt(Math.max(0, wall - c.cost.tailMs));
      this.estimator.observeCall(wall, c.cost.tailMs, res.bytesUp + res.bytesDown);
    }
    this.maybeReplan(c);
    return Object.fromEntries(
      res.outputs.map((t) => [t.name, new ort.Tensor(t.type as ort.Tensor.Type, t.data as ort.Tensor.DataType, [...t.dims])]),
    );
  }

  private maybeReplan(c: CutState): void {
    const link = this.estimator.link;
    if (!this.replanner || !link || c.spec.name !== this.current) return;
    if (c.headMs !== null && c.session) this.replanner.update({ ...c.cost, headMs: c.headMs });
    const choice = this.replanner.choose(link);
    if (choice !== this.current) {
      this.current = choice;
      this.stats.switches += 1;
    }
  }

  /** Head here, tail on the server: the chosen (default: all) outputs. */
  async compute(inputs: Record<string, TensorInput>, outputs?: readonly string[]): Promise<Record<string, ort.Tensor>> {
    const c = this.cuts.get(this.current)!;
    const mid = await this.runHead(c, this.feeds(inputs));
    return this.runTail(c, mid, outputs);
  }

  /** Each of `batch` in order; the head of call i+1 runs while the tail of call i is away. */
  async computeMany(batch: readonly Record<string, TensorInput>[], outputs?: readonly string[]): Promise<Record<string, ort.Tensor>[]> {
    const pending: Promise<Record<string, ort.Tensor>>[] = [];
    for (const inputs of batch) {
      const c = this.cuts.get(this.current)!;
      const mid = await this.runHead(c, this.feeds(inputs));
      const p = this.runTail(c, mid, outputs);
      p.catch(() => undefined); // reported by the await below, in order
      pending.push(p);
    }
    return Promise.all(pending);
  }

  /** Release the head sessions and stop pinging. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.pinger !== null) clearInterval(this.pinger);
    await this.headChain;
    for (const c of this.cuts.values()) await c.session?.release();
  }
}

/**
 * Open a split model: `splitUrl` is the folder `vault split` wrote, as the
 * vendor serves it (only `split.json` and the `head-*.onnx` files need be
 * public). Fetches and checks each head (SHA-256 against split.json),
 * measures it here, pings the service, and picks the cut.
 */
export async function open(splitUrl: string, options: OpenOptions): Promise<SplitModel> {
  if (!options || !options.server) throw new ConfigError("open(url, { server, token }): name the service", "config");
  if (!options.token) throw new ConfigError("open(url, { server, token }): a token is needed", "config");
  const fetchFn = options.fetch ?? fetch.bind(globalThis);
  const base = new URL(splitUrl.endsWith("/") ? splitUrl : splitUrl + "/", globalThis.location?.href);
  const where = new URL("split.json", base).href;
  let desc: SplitDescription;
  try {
    const r = await fetchFn(where, { cache: "no-cache" });
    if (!r.ok) throw new ConfigError(`${where}: ${r.status} ${r.statusText}`, "config");
    desc = checkDescription(await r.json(), where);
  } catch (exc) {
    if (exc instanceof VaultError) throw exc;
    throw new ConfigError(`${where}: cannot read a split description (${(exc as Error).message})`, "config");
  }
  if (options.wasmPaths) ort.env.wasm.wasmPaths = options.wasmPaths;
  const providers = options.executionProviders ?? (await availableProviders());
  const tail = new OipClient(options.server, options.token, fetchFn);
  const wanted = options.cut ? desc.cuts.filter((c) => c.name === options.cut) : desc.cuts;
  if (options.cut && !wanted.length) {
    throw new ConfigError(`no cut '${options.cut}' in ${where} (have ${desc.cuts.map((c) => c.name).join(", ")})`, "config");
  }
  const cuts = new Map<string, CutState>();
  const runs = options.profileRuns ?? 5;
  for (const spec of wanted) {
    const cost: CutCost = {
      cut: spec.name,
      headMs: spec.cost?.head_ms ?? 0,
      tailMs: spec.cost?.tail_ms ?? 0,
      bytesUp: spec.cost?.bytes_up ?? 0,
      bytesDown: spec.cost?.bytes_down ?? 0,
    };
    let session: ort.InferenceSession | null = null;
    if (spec.head) {
      const url = new URL(spec.head, base).href;
      const r = await fetchFn(url);
      if (!r.ok) throw new ConfigError(`${url}: ${r.status} ${r.statusText}`, "config");
      const bytes = new Uint8Array(await r.arrayBuffer());
      if (spec.head_sha256 && (await sha256(bytes)) !== spec.head_sha256) {
        throw new IntegrityError(`${url}: the head does not match split.json`, "integrity");
      }
      try {
        session = await ort.InferenceSession.create(bytes, {
          executionProviders: providers, graphOptimizationLevel: "all",
        });
      } catch (exc) {
        throw new IntegrityError(`${url}: not a loadable head model (${String((exc as Error).message ?? exc).slice(0, 160)})`, "integrity");
      }
      if (runs > 0) {
        // the head's cost where it runs: this device, this browser, this provider
        const feeds = Object.fromEntries(desc.inputs.map((d) => [d.name, zeros(d)]));
        await session.run(feeds); // warm-up
        const times: number[] = [];
        for (let i = 0; i < runs; i++) {
          const t0 = performance.now();
          await session.run(feeds);
          times.push(performance.now() - t0);
        }
        cost.headMs = median(times);
      }
    }
    cuts.set(spec.name, {
      spec, session, cost, headMs: null,
      crossing: spec.crossing.map((x) => x.wire_name),
    });
  }
  const estimator = new LinkEstimator();
  let first = options.cut ?? desc.default;
  if (!options.cut && cuts.size > 1) {
    // the link as it is now: RTT measured, bandwidth assumed until calls measure it
    const rtts: number[] = [];
    for (let i = 0; i < 3; i++) rtts.push(await tail.ping());
    const link: Link = { rttMs: Math.min(...rtts), mbit: options.assumeMbit ?? desc.planned_for?.mbit ?? 100 };
    estimator.observeRtt(link.rttMs);
    first = plan([...cuts.values()].map((c) => c.cost), link)[0]!.cost.cut;
  }
  const model = new SplitModel(desc, cuts, first, tail, providers, options);
  if (estimator.rttMs !== null) model.estimator.observeRtt(estimator.rttMs);
  return model;
}
