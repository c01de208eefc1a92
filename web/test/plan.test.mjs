// The browser's planner is vault/hybrid/plan.py's: the same arithmetic, the
// same hysteresis (node --test; the Python twin: tests/unit/vault/test_split.py).
import { test } from "node:test";
import assert from "node:assert/strict";
import { LinkEstimator, Replanner, plan, totalMs } from "../dist/plan.js";

const wide = { cut: "c0", headMs: 1, tailMs: 1, bytesUp: 400_000, bytesDown: 40 };
const narrow = { cut: "c1", headMs: 6, tailMs: 0.5, bytesUp: 64, bytesDown: 40 };

test("cost is head + RTT + bytes / bandwidth + tail", () => {
  // 400,040 bytes at 100 Mbit/s = 32.0032 ms
  assert.equal(totalMs(wide, { rttMs: 2, mbit: 100 }), 1 + 2 + 32.0032 + 1);
});

test("plan ranks cheapest first, stable on ties", () => {
  assert.deepEqual(plan([wide, narrow], { rttMs: 2, mbit: 1000 }).map((r) => r.cost.cut), ["c0", "c1"]);
  assert.deepEqual(plan([wide, narrow], { rttMs: 40, mbit: 2 }).map((r) => r.cost.cut), ["c1", "c0"]);
  const a = { ...narrow, cut: "a" }, b = { ...narrow, cut: "b" };
  assert.deepEqual(plan([a, b], { rttMs: 1, mbit: 1 }).map((r) => r.cost.cut), ["a", "b"]);
});

test("the replanner moves only on a clear and lasting change", () => {
  const r = new Replanner([wide, narrow], "c0", 0.15, 3);
  const slow = { rttMs: 40, mbit: 2 };
  assert.equal(r.choose(slow), "c0");
  assert.equal(r.choose(slow), "c0");
  assert.equal(r.choose({ rttMs: 2, mbit: 1000 }), "c0"); // the streak breaks
  assert.equal(r.choose(slow), "c0");
  assert.equal(r.choose(slow), "c0");
  assert.equal(r.choose(slow), "c1");
  assert.equal(r.switches, 1);
  // within the hysteresis: stays
  const close = new Replanner([{ ...narrow, cut: "x", headMs: 10 }, { ...narrow, cut: "y", headMs: 9 }], "x");
  for (let i = 0; i < 5; i++) assert.equal(close.choose({ rttMs: 1, mbit: 100 }), "x");
});

test("bandwidth is averaged as time per bit: one slow call shows at once", () => {
  const e = new LinkEstimator(0.3);
  e.observeRtt(10);
  for (let i = 0; i < 5; i++) e.observeCall(10 + 1 + 8, 1, 100_000); // 8 ms for 800 kbit: 100 Mbit/s
  assert.ok(Math.abs(e.mbit - 100) < 1e-6);
  e.observeCall(10 + 1 + 800, 1, 100_000); // one call at 1 Mbit/s
  assert.ok(e.mbit < 4, `${e.mbit}`);
  const link = e.link;
  assert.equal(link.rttMs, 10);
});
