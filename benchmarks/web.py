"""The hybrid in a browser: head in onnxruntime-web (Debian's chromium,
WebAssembly), tail on ``vault worker serve`` over the Open Inference
Protocol's REST endpoint, against all-server (the page sends its input and
the whole model runs on the server), over the emulated links the Python
hybrid uses (:data:`benchmarks.hybrid.LINKS`, :class:`benchmarks.linkproxy.LinkProxy`
between the page and the service's REST port).

Set-up: MobileNetV2 (input float32 1x3x224x224, 602 KB), the vendor's split
points at the stage ends (:func:`benchmarks.hybrid._stage_ends`) and the
all-server cut (``--at "(inputs)"``: no head, the page sends its input), one
tail per cut, all on one service with CORS for the page's origin and bearer
tokens minted from call licences. In the page, one model per cut (pinned:
all-server is the same client with no head); per link,
one warm-up call per row, then rounds of one call per row, interleaved, each
row's median (times taken in the page, ``performance.now``). A row whose
transfer alone would pass a cap is not measured.

The planner: a fresh unpinned ``vault.open`` per link measures each head in
the page and the RTT through the link, assumes the link's nominal bandwidth
(as the Python benchmark's planner is given it), and picks a cut; its row is
the measured time of that cut, against the best measured cut (the oracle).
Then it runs calls and may move (``after calls``). Pipelining: at the best
hybrid cut, K calls through ``computeMany`` against K sequential calls.

Example::

    python -m benchmarks --sections web --quick
"""

from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path
from typing import Any

from vault.core.process import stop_process

from . import models
from .context import Context
from .harness import Unavailable
from .hybrid import LINKS, _stage_ends
from .linkproxy import LinkProxy

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # fmt: skip

_OPEN = """async ({split, server, tokens, cuts}) => {
  while (!window.vault) await new Promise((r) => setTimeout(r, 20));
  const v = window.vault;
  window.rows = {};
  for (const cut of cuts) {
    window.rows[cut] = await v.open(split, {server, token: tokens, cut, replan: false,
        wasmPaths: "/_vault/ort/", executionProviders: ["wasm"], pingEveryMs: 0});
  }
  const sig = window.rows[cuts[0]].inputs;
  const [name, spec] = Object.entries(sig)[0];
  const dims = spec.shape.map((d) => (typeof d === "number" ? d : 1));
  const n = dims.reduce((a, b) => a * b, 1);
  const data = new Float32Array(n);
  for (let i = 0; i < n; i++) data[i] = Math.sin(i * 0.37);
  window.input = {name, dims, data};
  return {name, dims};
}"""

_CALL = """async ({row}) => {
  const t0 = performance.now();
  await window.rows[row].compute({[window.input.name]: {type: "float32",
      data: window.input.data, dims: window.input.dims}});
  return performance.now() - t0;
}"""

_PIPE = """async ({row, n}) => {
  const m = window.rows[row];
  const x = {[window.input.name]: {type: "float32", data: window.input.data, dims: window.input.dims}};
  let t0 = performance.now();
  for (let i = 0; i < n; i++) await m.compute(x);
  const seq = performance.now() - t0;
  t0 = performance.now();
  await m.computeMany(Array(n).fill(x));
  const pipe = performance.now() - t0;
  return {calls: n, sequential_ms: seq, pipelined_ms: pipe, gain: seq / pipe};
}"""

_PLAN = """async ({split, server, tokens, mbit, calls}) => {
  const m = await window.vault.open(split, {server, token: tokens, assumeMbit: mbit,
      wasmPaths: "/_vault/ort/", executionProviders: ["wasm"], pingEveryMs: 0});
  const first = m.cut;
  const plan = m.plan;
  for (let i = 0; i < calls; i++) {
    await m.compute({[window.input.name]: {type: "float32", data: window.input.data,
        dims: window.input.dims}});
  }
  const after = m.cut;
  const link = m.estimator.link;
  await m.close();
  return {first, after, plan, link};
}"""


def section(ctx: Context) -> dict[str, Any]:
    env = ctx.env
    if env is None:
        raise Unavailable(f"no key server (VaultEnv): {ctx.env_error}")
    if not os.path.exists(CHROMIUM):
        raise Unavailable("no chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright

        from vault.app.webpage import web_root

        web = web_root()
    except Exception as exc:  # noqa: BLE001 - said in the results
        raise Unavailable(f"the browser rows need playwright and a built web/ ({exc})") from None
    return _run(ctx, env, web, sync_playwright)


def _run(ctx: Context, env: Any, web: Path, sync_playwright: Any) -> dict[str, Any]:
    from vault.app.demo_web import serve_http
    from vault.app.webpage import PageServer
    from vault.core.crypto import PublisherKey
    from vault.core.device import init_device, record_keyserver
    from vault.core.keyclient import KeyServerClient
    from vault.core.licence import Licence
    from vault.core.token import mint_token
    from vault.hybrid.profile import profile_model
    from vault.hybrid.publish import split

    quick, log, work = ctx.quick, ctx.log, ctx.workdir / "web"
    work.mkdir()
    reps = 3 if quick else 7
    cap_ms = 1500.0 if quick else 4000.0
    m = models.mobilenet_v2()
    feeds = models.example_feeds(m)
    in_bytes = sum(v.nbytes for v in feeds.values())
    points = _stage_ends(m)
    if quick:
        points = [points[1], points[-1]]
    log(f"  web: profiling the server side; splitting MobileNetV2 at {len(points)} stage ends")
    server_prof = profile_model(m, repeats=5)
    admin = Licence.load(env.admin_path)
    pk = PublisherKey.load(env.ks_dir / "publisher.key")
    proc = page_server = None
    proxy: LinkProxy | None = None
    pw = None
    with KeyServerClient(admin) as ks:

        def register(res: Any) -> None:
            ks.register_key(model_id=res.model_id, key_id=res.key_id, key=res.key,
                            package_digest=res.digest)  # fmt: skip

        # the vendor allows the stage ends, and the all-server cut: the page may send its input
        res = split(m, model_id="mnv2", signing_key=pk, output_dir=work / "mnv2.split",
                    at=[[p] for p in points] + [["(inputs)"]], split_points=points,
                    server_costs=server_prof, register=register, calibration=[feeds])  # fmt: skip
        dev = init_device(work / "device")
        ks.enroll_device(device_id=dev.device_id, public_key=dev.public_key, service=True)
        record_keyserver(work / "device", address=admin.keyserver_address,
                         public_key=admin.keyserver_public_key)  # fmt: skip
        cuts = res.description["cuts"]
        ids = [c["tail_model_id"] for c in cuts]
        svc, shop = [], {}
        for tid in ids:
            path = work / f"service-{tid}.licence"
            ks.issue(tid, holder="vendor-service").save(path)
            svc.append(str(path))
            shop[tid] = ks.issue(tid, holder="web-bench", kind="call")
    tokens = {t: mint_token(lic, models=[t], expires=3600) for t, lic in shop.items()}
    label = {c["name"]: "all-server" if c["all_server"] else c["at"][0] for c in cuts}
    cut_bytes = {c["name"]: int(c["cost"]["bytes_up"]) for c in cuts}
    try:
        page_server = PageServer(web_root=web, splits={"mnv2.split": work / "mnv2.split"},
                                 config={})  # fmt: skip
        tails = [str(work / "mnv2.split" / c["tail"]) for c in cuts]
        proc, rest = serve_http(str(work), tails, svc, str(work / "device"),
                                page_server.url.rstrip("/"))  # fmt: skip
        page_server.start()
        host, port = rest.removeprefix("http://").rsplit(":", 1)
        proxy = LinkProxy(host, int(port), rtt_ms=LINKS[0][0], mbit=LINKS[0][1])
        server = f"http://127.0.0.1:{proxy.port}"
        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(page_server.url + "blank.html")
        split_url = "/models/mnv2.split/"
        rows_names = [c["name"] for c in cuts]
        whole = next(c["name"] for c in cuts if c["all_server"])
        page.evaluate(_OPEN, {"split": split_url, "server": server, "tokens": tokens,
                              "cuts": rows_names})  # fmt: skip
        out_rows = []
        for rtt, mbit in LINKS:
            lk = f"{rtt:g}/{mbit:g}"
            log(f"  web: link {rtt:g} ms / {mbit:g} Mbit/s")
            proxy.set(rtt_ms=rtt, mbit=mbit)
            xfer = {n: cut_bytes[n] * 8 / (mbit * 1e3) for n in rows_names}
            rows = [r for r in rows_names if xfer[r] + rtt <= cap_ms]
            samples: dict[str, list[float]] = {r: [] for r in rows}
            for r in rows:
                page.evaluate(_CALL, {"row": r})  # warm-up on this link
            for _ in range(reps):
                for r in rows:
                    samples[r].append(float(page.evaluate(_CALL, {"row": r})))
            meas = {r: statistics.median(v) for r, v in samples.items()}
            planned = page.evaluate(_PLAN, {"split": split_url, "server": server,
                                            "tokens": tokens, "mbit": mbit, "calls": 4})  # fmt: skip
            best = min(meas, key=lambda r: meas[r]) if meas else None
            hybrid = {r: v for r, v in meas.items() if r != whole}
            best_hybrid = min(hybrid, key=lambda r: hybrid[r]) if hybrid else None
            pick = planned["first"]
            row = {
                "link": lk,
                "input_bytes": in_bytes,
                "all_server_ms": meas.get(whole),
                "cuts": {
                    label[r]: {"bytes_up": cut_bytes[r], "measured_ms": meas.get(r)}
                    for r in rows_names
                },  # fmt: skip
                "planner_cut": label[pick],
                "planner_ms": meas.get(pick),
                "planner_after_calls": label[planned["after"]],
                "planner_head_ms": {
                    label[c["cut"]]: round(c["headMs"], 2) for c in planned["plan"]["cuts"]
                },  # fmt: skip
                "measured_link": planned["link"],
                "oracle_cut": label[best] if best else None,
                "oracle_ms": meas.get(best) if best else None,
                "best_hybrid_cut": label[best_hybrid] if best_hybrid else None,
                "best_hybrid_ms": hybrid.get(best_hybrid) if best_hybrid else None,
            }
            if best_hybrid is not None and best_hybrid in meas:
                # consecutive calls at the best hybrid cut: head i+1 while tail i is away
                row["pipelining"] = page.evaluate(_PIPE, {"row": best_hybrid,
                                                          "n": 4 if quick else 8})  # fmt: skip
            if row["planner_ms"] and row["oracle_ms"]:
                row["planner_over_oracle"] = row["planner_ms"] / row["oracle_ms"]
            if row["best_hybrid_ms"] and row["all_server_ms"]:
                row["best_hybrid_over_all_server"] = row["best_hybrid_ms"] / row["all_server_ms"]
            out_rows.append(row)
        browser.close()
    finally:
        if pw is not None:
            pw.stop()
        if proxy is not None:
            proxy.close()
        if page_server is not None:
            page_server.stop()
        if proc is not None:
            stop_process(proc, 10)
    return {"model": "mobilenet_v2", "split_points": points, "reps": reps, "cap_ms": cap_ms,
            "browser": "Debian chromium, headless, onnxruntime-web (wasm, 1 thread)",
            "rows": out_rows}  # fmt: skip


def table(res: dict[str, Any]) -> list[str]:
    """Rows for the report: per link, all-server, the planner's cut and the oracle."""
    if "rows" not in res:
        return []
    lines = ["web (head in the browser, onnxruntime-web wasm; tail on the service, REST):",
             f"  {'link':>9} {'server':>8} {'hybrid':>8} {'planner':>8} {'oracle':>8}  "
             "planner cut / oracle cut"]  # fmt: skip

    def ms(v: Any) -> str:
        return "   -    " if v is None else f"{v:8.1f}"

    for r in res["rows"]:
        lines.append(f"  {r['link']:>9} {ms(r['all_server_ms'])} {ms(r['best_hybrid_ms'])} "
                     f"{ms(r['planner_ms'])} {ms(r['oracle_ms'])}  "
                     f"{r['planner_cut']} / {r['oracle_cut']}")  # fmt: skip
    return lines
