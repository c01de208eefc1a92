/**
 * Where to cut, in the page: vault/hybrid/plan.py's model, measured here.
 *
 *     head ms (this browser) + RTT + (bytes up + bytes down) / bandwidth + tail ms (server)
 *
 * The head's cost is measured where it runs (each shipped head, on this
 * device, in this browser's execution provider); the tail's comes from the
 * server's profile in split.json; the link from this page's own calls (RTT
 * from small GETs while idle, bandwidth from each call's wall time). The
 * Replanner moves to another shipped cut only when it is clearly
 * (`hysteresis`) and repeatedly (`patience`) better, as the Python client does.
 */

/** A network link: round-trip time (ms) and bandwidth (Mbit/s, both ways). */
export interface Link {
  rttMs: number;
  mbit: number;
}

export function transferMs(link: Link, nbytes: number): number {
  return link.mbit > 0 ? (nbytes * 8) / (link.mbit * 1e3) : Infinity;
}

/** What one cut costs: per-side compute and the bytes that cross. */
export interface CutCost {
  cut: string;
  headMs: number;
  tailMs: number;
  bytesUp: number;
  bytesDown: number;
}

export function totalMs(c: CutCost, link: Link): number {
  return c.headMs + link.rttMs + transferMs(link, c.bytesUp + c.bytesDown) + c.tailMs;
}

export interface Planned {
  cost: CutCost;
  totalMs: number;
}

/** Every cut with its predicted latency, cheapest first (stable on ties). */
export function plan(costs: readonly CutCost[], link: Link): Planned[] {
  return costs
    .map((cost, i) => ({ cost, totalMs: totalMs(cost, link), i }))
    .sort((a, b) => a.totalMs - b.totalMs || a.i - b.i)
    .map(({ cost, totalMs }) => ({ cost, totalMs }));
}

/**
 * A running (EWMA) estimate of RTT and bandwidth. Bandwidth is averaged as
 * time per bit, so one slow call moves the estimate at once while one fast
 * call after many slow ones does not (vault/hybrid/plan.py's LinkEstimator).
 */
export class LinkEstimator {
  rttMs: number | null = null;
  private msPerBit: number | null = null;
  samples = 0;

  constructor(private readonly alpha = 0.3, initial?: Link) {
    if (initial) {
      this.rttMs = initial.rttMs;
      this.msPerBit = 1 / (initial.mbit * 1e3);
    }
  }

  private mix(old: number | null, x: number): number {
    return old === null ? x : (1 - this.alpha) * old + this.alpha * x;
  }

  observeRtt(ms: number): void {
    this.rttMs = this.mix(this.rttMs, ms);
  }

  /** One tail call: its wall time, the server's share, and the bytes both ways. */
  observeCall(wallMs: number, serverMs: number, nbytes: number): void {
    if (this.rttMs === null || nbytes <= 0) return;
    const transfer = wallMs - this.rttMs - serverMs;
    // below ~0.2 ms the estimate is noise: the link is fast, not infinite
    this.msPerBit = this.mix(this.msPerBit, Math.max(transfer, 0.2) / (nbytes * 8));
    this.samples += 1;
  }

  get mbit(): number | null {
    return this.msPerBit === null ? null : 1 / (this.msPerBit * 1e3);
  }

  get link(): Link | null {
    const mbit = this.mbit;
    return this.rttMs === null || mbit === null ? null : { rttMs: this.rttMs, mbit };
  }
}

/** Moves between shipped cuts when the link changes, with hysteresis. */
export class Replanner {
  private costs: Map<string, CutCost>;
  private streak: [string, number] = ["", 0];
  switches = 0;

  constructor(
    costs: readonly CutCost[],
    public current: string,
    private readonly hysteresis = 0.15,
    private readonly patience = 3,
  ) {
    this.costs = new Map(costs.map((c) => [c.cut, c]));
    if (!this.costs.has(current)) throw new Error(`unknown cut ${current}`);
  }

  /** Replace one cut's costs (a head measured again in this browser). */
  update(cost: CutCost): void {
    this.costs.set(cost.cut, cost);
  }

  /** The cut to use next: the current one unless another is clearly and repeatedly better. */
  choose(link: Link): string {
    let best = this.current;
    let bestMs = Infinity;
    for (const [name, c] of this.costs) {
      const t = totalMs(c, link);
      if (t < bestMs) [best, bestMs] = [name, t];
    }
    const cur = this.costs.get(this.current);
    const curMs = cur ? totalMs(cur, link) : Infinity;
    if (best === this.current || bestMs > curMs * (1 - this.hysteresis)) {
      this.streak = ["", 0];
      return this.current;
    }
    const count = this.streak[0] === best ? this.streak[1] + 1 : 1;
    this.streak = [best, count];
    if (count >= this.patience) {
      this.current = best;
      this.streak = ["", 0];
      this.switches += 1;
    }
    return this.current;
  }
}
