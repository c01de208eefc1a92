// The demo page: opens the split model with the vendor's token, classifies the picture.
import * as vault from "/_vault/web/index.js";

const $ = (id) => document.getElementById(id);
const status = (text, err = false) => { $("status").textContent = text; $("status").className = err ? "err" : ""; };

function randomPicture() {
  const c = $("picture").getContext("2d");
  c.fillStyle = `hsl(${Math.random() * 360}, 60%, 75%)`;
  c.fillRect(0, 0, 64, 64);
  for (let i = 0; i < 6; i++) {
    c.fillStyle = `hsl(${Math.random() * 360}, 70%, ${30 + Math.random() * 40}%)`;
    c.beginPath();
    c.arc(Math.random() * 64, Math.random() * 64, 4 + Math.random() * 16, 0, 2 * Math.PI);
    c.fill();
  }
}

/** The canvas as the model's input: uint8 [1, 3, H, W]. */
export function pictureTensor(canvas = $("picture")) {
  const { width: w, height: h } = canvas;
  const rgba = canvas.getContext("2d").getImageData(0, 0, w, h).data;
  const data = new Uint8Array(3 * w * h);
  for (let i = 0; i < w * h; i++) for (let ch = 0; ch < 3; ch++) data[ch * w * h + i] = rgba[4 * i + ch];
  return { type: "uint8", data, dims: [1, 3, h, w] };
}

async function main() {
  const config = await (await fetch("/config.json")).json();
  // the vendor's backend mints a token per visitor: fetched once, renewed when it runs out
  let tokens = null;
  const token = async (model) => {
    if (!tokens || Date.now() > tokens.renewAt) {
      tokens = { ...(await (await fetch("/token")).json()), renewAt: Date.now() + config.token_seconds * 800 };
    }
    return tokens[model];
  };
  const model = await vault.open(config.split, {
    server: config.server, token, wasmPaths: "/_vault/ort/",
    ...(config.execution_providers ? { executionProviders: config.execution_providers } : {}),
  });
  window.vaultDemo = { vault, model, pictureTensor };
  const facts = [
    ["model", model.modelId],
    ["inputs", JSON.stringify(model.inputs)],
    ["head runs on", model.executionProviders.join(", ")],
    ["service", config.server],
  ];
  $("facts").innerHTML = facts.map(([k, v]) => `<tr><th>${k}</th><td><code>${v}</code></td></tr>`).join("");
  randomPicture();
  $("classify").disabled = false;
  status(`ready: cut ${model.cut}`);
  $("new").onclick = randomPicture;
  $("file").onchange = async (e) => {
    const f = e.target.files[0];
    if (!f) return;
    const img = await createImageBitmap(f);
    $("picture").getContext("2d").drawImage(img, 0, 0, 64, 64);
  };
  $("classify").onclick = async () => {
    try {
      const t0 = performance.now();
      const before = { ...model.stats };
      const out = await model.compute({ image: pictureTensor() });
      const ms = performance.now() - t0;
      const classes = Array.from(out.top_classes.data, Number);
      const scores = Array.from(out.top_scores.data);
      $("result").innerHTML = "<tr><th>class</th><th>score</th></tr>" +
        classes.map((c, i) => `<tr><td>${c}</td><td>${scores[i].toFixed(3)}</td></tr>`).join("");
      const up = model.stats.bytesUp - before.bytesUp;
      status(`${ms.toFixed(1)} ms, cut ${model.cut}: ${up} bytes up (the picture is ${3 * 64 * 64} bytes)`);
    } catch (err) {
      status(`${err.name} [${err.code}]: ${err.message}`, true);
    }
  };
}

window.vaultReady = main().catch((err) => { status(`${err.name}: ${err.message}`, true); throw err; });
