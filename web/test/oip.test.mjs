// The Open Inference Protocol binary codec the page speaks: every dtype's raw
// bytes round-trip, float16 and int8 cut tensors cost 2 and 1 bytes per
// element, and the service's errors come back as the vault's typed errors.
import { test } from "node:test";
import assert from "node:assert/strict";
import { OipClient, fromBytes, toBytes } from "../dist/oip.js";
import { ConfigError, QuotaExhaustedError, TokenExpiredError, TokenSpentError, UnavailableError } from "../dist/errors.js";

const CASES = [
  ["float32", new Float32Array([1.5, -2, 3e38])],
  ["float16", new Uint16Array([0x3c00, 0xc000, 0x7bff])],
  ["int8", new Int8Array([-128, 0, 127])],
  ["uint8", new Uint8Array([0, 1, 255])],
  ["int32", new Int32Array([-1, 2, 3])],
  ["int64", new BigInt64Array([-(2n ** 63n), 0n, 2n ** 62n])],
  ["float64", new Float64Array([Math.PI, -0, 1e300])],
  ["bool", new Uint8Array([1, 0, 1])],
];

for (const [type, data] of CASES) {
  test(`${type} round-trips through raw bytes`, () => {
    const t = { name: "t", type, dims: [3], data };
    const raw = toBytes(t);
    assert.equal(raw.byteLength, 3 * data.BYTES_PER_ELEMENT);
    const back = fromBytes("t", type, [3], raw);
    assert.deepEqual(Array.from(back.data), Array.from(data));
  });
}

test("strings are 4-byte lengths and UTF-8", () => {
  const t = { name: "s", type: "string", dims: [2], data: ["héllo", ""] };
  const raw = toBytes(t);
  assert.equal(raw.byteLength, 4 + 6 + 4);
  assert.deepEqual(fromBytes("s", "string", [2], raw).data, ["héllo", ""]);
});

function service(handler) {
  return async (url, init) => handler(url, init);
}

test("infer sends one binary body and reads a binary answer", async () => {
  let seen;
  const fetchFn = service(async (url, init) => {
    seen = { url, init };
    const out = new Float32Array([0.25, 0.75]);
    const head = new TextEncoder().encode(JSON.stringify({
      model_name: "m.tail", outputs: [{ name: "probs", datatype: "FP32", shape: [1, 2], parameters: { binary_data_size: 8 } }],
    }));
    const body = new Uint8Array(head.byteLength + 8);
    body.set(head);
    body.set(new Uint8Array(out.buffer), head.byteLength);
    return new Response(body, { status: 200, headers: { "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": String(head.byteLength) } });
  });
  const c = new OipClient("http://127.0.0.1:1/", () => "tok", fetchFn);
  const res = await c.infer("m.tail", [{ name: "h__q8", type: "int8", dims: [1, 4], data: new Int8Array([1, -2, 3, -4]) }]);
  assert.equal(seen.url, "http://127.0.0.1:1/v2/models/m.tail/infer");
  assert.equal(seen.init.headers.Authorization, "Bearer tok");
  const n = Number(seen.init.headers["Inference-Header-Content-Length"]);
  const req = JSON.parse(new TextDecoder().decode(seen.init.body.subarray(0, n)));
  assert.deepEqual(req.inputs[0], { name: "h__q8", datatype: "INT8", shape: [1, 4], parameters: { binary_data_size: 4 } });
  assert.deepEqual(Array.from(seen.init.body.subarray(n)), [1, 254, 3, 252]); // one byte each
  assert.deepEqual(Array.from(res.outputs[0].data), [0.25, 0.75]);
  assert.equal(res.bytesUp, seen.init.body.byteLength);
});

test("errors are the vault's typed errors, with Retry-After", async () => {
  const answer = (status, code, headers = {}) => service(async () => new Response(
    JSON.stringify({ error: `[${code}] no`, code }), { status, headers: { "Content-Type": "application/json", ...headers } }));
  const x = [{ name: "x", type: "float32", dims: [1], data: new Float32Array([1]) }];
  await assert.rejects(new OipClient("http://h", "t", answer(401, "token_expired")).infer("m", x), TokenExpiredError);
  await assert.rejects(new OipClient("http://h", "t", answer(429, "token_spent")).infer("m", x), TokenSpentError);
  const err = await new OipClient("http://h", "t", answer(429, "quota_exhausted", { "Retry-After": "3" })).infer("m", x).catch((e) => e);
  assert.ok(err instanceof QuotaExhaustedError && err.retryAfter === 3 && err.status === 429 && err.message === "no");
  const down = service(async () => { throw new TypeError("Failed to fetch"); });
  await assert.rejects(new OipClient("http://h", "t", down).infer("m", x), UnavailableError);
  // the service up but its licence server not: a retryable UnavailableError
  // (it was a bare VaultError), and so is a 5xx code this client does not know
  await assert.rejects(new OipClient("http://h", "t", answer(503, "keyserver_unavailable")).infer("m", x), UnavailableError);
  await assert.rejects(new OipClient("http://h", "t", answer(503, "some_new_code")).infer("m", x), UnavailableError);
  await assert.rejects(new OipClient("http://h", "t", answer(404, "not_found")).infer("m", x), ConfigError);
});
