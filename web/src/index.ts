/**
 * @vault-sandbox/web: a vault split model in a web page.
 *
 *     import * as vault from "@vault-sandbox/web";
 *     const model = await vault.open("/models/clf.split/", { server: "https://host:8443", token });
 *     const out = await model.compute({ image: tensor });   // onnxruntime-web Tensors
 *     model.close();
 *
 * The head runs in the page (onnxruntime-web: WebGPU or WebNN where offered,
 * WebAssembly otherwise); the crossing tensors go to the vendor's `vault
 * worker serve` over the Open Inference Protocol's REST endpoint with a
 * short-lived bearer token. See docs/web.md.
 */

export { open, availableProviders, SplitModel } from "./model.js";
export type { OpenOptions, Signature, TensorInput } from "./model.js";
export { OipClient, toBytes, fromBytes, datatypeOf } from "./oip.js";
export type { DType, TokenSource, TypedArray, WireTensor, InferResult } from "./oip.js";
export { LinkEstimator, Replanner, plan, totalMs, transferMs } from "./plan.js";
export type { CutCost, Link, Planned } from "./plan.js";
export { SPLIT_FORMAT, checkDescription } from "./split.js";
export type { CrossingSpec, CutSpec, SplitDescription, TensorSpec } from "./split.js";
export * from "./errors.js";
