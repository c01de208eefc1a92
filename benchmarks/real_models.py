"""Section "transformers": real architectures exported from ``transformers``.

Five small models, each built from its ``transformers`` configuration with
random weights (nothing is downloaded: the architecture is the library's
own code, the weights do not change the time) and exported to ONNX with
``torch.onnx.export`` (the TorchScript exporter, opset 17):

* ``t5_decoder``: T5's decoder stack and LM head, one step over 16 tokens
  attending to 32 encoder states;
* ``gpt2_past``: GPT-2 generating one token with 31 tokens of past keys and
  values as inputs (the cache a generation loop feeds back);
* ``wav2vec2``: wav2vec 2.0's convolutional feature encoder and transformer
  over a quarter second of 16 kHz audio;
* ``clip``: CLIP's text and vision towers and their similarity logits
  (8 tokens, one 128x128 image);
* ``bert_int8``: BERT over 32 tokens, weights quantised to int8 with
  onnxruntime's ``quantize_dynamic`` (MatMulInteger), as shipped for CPUs.

Per model, in alternating blocks (as section 1): ``in_process`` (the
worker's session options) against ``vault_ipc`` (``vault.open``: a local
worker, the direct local channel); whole call = vault / in-process. The
worker's own median per call (``Model.stats``: its handler, from decoding
the request to encoding the answer) splits the gap into the worker's side
(worker - in-process) and the crossing with the caller's codec (vault -
worker).

Needs ``torch`` and ``transformers`` (``pip install torch==2.13.0
transformers``); without them the section says so and is skipped, loudly:
the table's row reads N/A with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .context import Context

import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from . import raw_server
from .harness import Unavailable, interleave, ort_session

__all__ = ["MODELS", "build", "section"]


def _export(module: Any, args: tuple[Any, ...], names: list[str], outs: list[str]) -> bytes:
    import torch

    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, buf, input_names=names, output_names=outs,
                          opset_version=17, dynamo=False)  # fmt: skip
    return buf.getvalue()


def _t5_decoder() -> tuple[bytes, dict[str, np.ndarray]]:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=4096, d_model=256, d_kv=32, d_ff=1024, num_layers=4,
                   num_decoder_layers=4, num_heads=8)  # fmt: skip
    t5 = T5ForConditionalGeneration(cfg)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder, self.head = t5.decoder, t5.lm_head

        def forward(self, input_ids: Any, encoder_hidden_states: Any) -> Any:
            h = self.decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states)
            return self.head(h.last_hidden_state)

    ids = torch.randint(0, 4096, (1, 16))
    enc = torch.randn(1, 32, 256)
    onnx_bytes = _export(Decoder(), (ids, enc), ["input_ids", "encoder_hidden_states"], ["logits"])
    return onnx_bytes, {"input_ids": ids.numpy(), "encoder_hidden_states": enc.numpy()}


def _gpt2_past() -> tuple[bytes, dict[str, np.ndarray]]:
    import torch
    from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

    layers, heads, dim, past = 4, 8, 256, 31
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=128, n_embd=dim,
                                      n_layer=layers, n_head=heads, bos_token_id=0,
                                      eos_token_id=0))  # fmt: skip

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt2 = gpt2

        def forward(self, input_ids: Any, attention_mask: Any, *kv: Any) -> Any:
            cache = DynamicCache()
            for i in range(layers):
                cache.update(kv[2 * i], kv[2 * i + 1], i)
            out = self.gpt2(input_ids=input_ids, attention_mask=attention_mask,
                            past_key_values=cache, use_cache=True)  # fmt: skip
            present = []
            for i in range(layers):
                k, v = out.past_key_values.layers[i].keys, out.past_key_values.layers[i].values
                present += [k, v]
            return (out.logits, *present)

    ids = torch.randint(0, 4096, (1, 1))
    mask = torch.ones(1, past + 1, dtype=torch.long)
    kv = [torch.randn(1, heads, past, dim // heads) for _ in range(2 * layers)]
    names = ["input_ids", "attention_mask"] + [
        f"past_{'key' if j % 2 == 0 else 'value'}_{j // 2}" for j in range(2 * layers)
    ]
    outs = ["logits"] + [f"present_{j}" for j in range(2 * layers)]
    onnx_bytes = _export(Step(), (ids, mask, *kv), names, outs)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    feeds.update({n: t.numpy() for n, t in zip(names[2:], kv)})
    return onnx_bytes, feeds


def _wav2vec2() -> tuple[bytes, dict[str, np.ndarray]]:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024, conv_dim=(128,) * 7)  # fmt: skip
    w2v = Wav2Vec2Model(cfg)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w2v = w2v

        def forward(self, input_values: Any) -> Any:
            return self.w2v(input_values=input_values).last_hidden_state

    audio = torch.randn(1, 4000)
    return _export(Encoder(), (audio,), ["input_values"], ["hidden"]), {
        "input_values": audio.numpy()
    }


def _clip() -> tuple[bytes, dict[str, np.ndarray]]:
    import torch
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config={"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024,
                     "num_hidden_layers": 4, "num_attention_heads": 4, "bos_token_id": 0,
                     "eos_token_id": 0, "pad_token_id": 0},
        vision_config={"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "image_size": 128, "patch_size": 32},
        projection_dim=128,
    )  # fmt: skip
    clip = CLIPModel(cfg)

    class Similarity(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = clip

        def forward(self, input_ids: Any, attention_mask: Any, pixel_values: Any) -> Any:
            return self.clip(input_ids=input_ids, attention_mask=attention_mask,
                             pixel_values=pixel_values).logits_per_image  # fmt: skip

    ids = torch.randint(0, 4096, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    pix = torch.randn(1, 3, 128, 128)
    onnx_bytes = _export(Similarity(), (ids, mask, pix),
                         ["input_ids", "attention_mask", "pixel_values"], ["logits"])  # fmt: skip
    return onnx_bytes, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                        "pixel_values": pix.numpy()}  # fmt: skip


def _bert_int8() -> tuple[bytes, dict[str, np.ndarray]]:
    import os
    import tempfile

    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4,
                                num_attention_heads=4, intermediate_size=1024))  # fmt: skip

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(0, 4096, (1, 32))
    mask = torch.ones(1, 32, dtype=torch.long)
    fp32 = _export(Encoder(), (ids, mask), ["input_ids", "attention_mask"], ["hidden"])
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "fp32.onnx"), os.path.join(d, "int8.onnx")
        with open(src, "wb") as fh:
            fh.write(fp32)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        with open(dst, "rb") as fh:
            int8 = fh.read()
    return int8, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


MODELS: dict[str, Callable[[], tuple[bytes, dict[str, np.ndarray]]]] = {
    "t5_decoder": _t5_decoder,
    "gpt2_past": _gpt2_past,
    "wav2vec2": _wav2vec2,
    "clip": _clip,
    "bert_int8": _bert_int8,
}


def build(name: str) -> tuple[bytes, dict[str, np.ndarray]]:
    """The ONNX bytes of one model and example inputs (Unavailable without torch)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        raise Unavailable(
            f"{exc.name} not installed: pip install torch==2.13.0 transformers "
            "(the real-architecture rows are optional)"
        ) from None
    torch.manual_seed(0)
    return MODELS[name]()


def run(quick: bool, env: Any, log: Callable[[str], None]) -> dict[str, Any]:
    import onnx

    out: dict[str, Any] = {"models": {}}
    for name in MODELS:
        row: dict[str, Any] = {}
        try:
            onnx_bytes, feeds = build(name)
        except Unavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - one export failing must not hide the rest
            out["models"][name] = {"unavailable": f"export failed: {type(exc).__name__}: {exc}"}
            continue
        sess = ort_session(onnx_bytes)
        ref = sess.run(None, feeds)
        row["in_bytes"] = int(sum(a.nbytes for a in feeds.values()))
        row["out_bytes"] = int(sum(a.nbytes for a in ref))
        row["weights_bytes"] = len(onnx_bytes)
        fns: dict[str, Callable[[], Any]] = {"in_process": lambda s=sess, f=feeds: s.run(None, f)}
        closes: list[Callable[[], None]] = []
        try:  # the same model in plain onnxruntime in another process (raw_server.py)
            for key, shm in (("raw_server", False), ("raw_shm", True)):
                fns[key], close = raw_server.start(onnx_bytes, feeds, ref, shm=shm)
                closes.append(close)
        except Exception as exc:  # noqa: BLE001 - a floor row, not a gate
            row["raw_unavailable"] = f"{type(exc).__name__}: {exc}"
        if env is None:
            row["unavailable"] = "vault environment unavailable"
        else:
            try:
                pkg, lic = env.seal(onnx.load_from_string(onnx_bytes), f"real-{name}")
                vm = env.open_local(pkg, lic)
                got = vm.compute(feeds)
                row["max_abs_diff_vs_in_process"] = float(
                    max(np.abs(got[o.name] - r).max() for o, r in zip(sess.get_outputs(), ref))
                )
                fns["vault_ipc"] = lambda m=vm, f=feeds: m.compute(f)
            except Exception as exc:  # noqa: BLE001
                row["unavailable"] = f"{type(exc).__name__}: {exc}"
        t0 = interleave(fns, rounds=3, per_round=3, warmup=3)["in_process"]["median_s"]
        block = max(3, min(20, int(0.05 / max(t0, 1e-4))))  # blocks of ~50 ms
        calls = 60 if quick else 300
        log(f"  {name}: {t0 * 1e3:.2f} ms in-process, blocks of {block}")
        res = interleave(fns, rounds=max(3, calls // block), per_round=block, warmup=3,
                         budget_s=8 if quick else 40, gap_s=0.02)  # fmt: skip
        for close in closes:
            close()
        row["rows"] = res
        raw = [res[k]["median_s"] for k in ("raw_server", "raw_shm") if k in res]
        if raw:
            row["raw_floor_over_in_process"] = min(raw) / res["in_process"]["median_s"]
            if "vault_ipc" in res:
                row["vault_ipc_over_raw_floor"] = res["vault_ipc"]["median_s"] / min(raw)
        if "vault_ipc" in res:
            v, p = res["vault_ipc"]["median_s"], res["in_process"]["median_s"]
            row["vault_ipc_over_in_process"] = v / p
            row["vault_ipc_overhead_s"] = v - p
            # where the gap lies: the worker's own median time per call (its
            # handler: decode, checks, onnxruntime, encode; Model.stats) splits
            # it into the worker's side and the crossing plus the caller's codec
            lat = (vm.stats().get("latency_ms") or {}).get("p50")
            if lat is not None:
                row["worker_compute_p50_s"] = lat / 1e3
        out["models"][name] = row
    return out


def section(ctx: Context) -> dict[str, Any]:
    return run(ctx.quick, ctx.env, ctx.log)
