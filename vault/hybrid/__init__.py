"""The latency-split hybrid: the early layers on the caller's device, the
protected rest in a sealed tail on the vendor's server (docs/hybrid.md).

Two halves that never import each other:

- the publisher's: :mod:`.cut` (cuts and the vendor's policy), :mod:`.profile`
  (per-node latency), :mod:`.publish` (``vault split``);
- the caller's: :mod:`.client` (``vault.open(SPLIT_DIR, server=...)``), with
  :mod:`.plan` (costs, planner, re-planning), which both halves share.

This package imports nothing itself, so ``vault.open`` of a split loads only
the caller's half.

Example::

    from vault.hybrid.publish import split
    split("model.onnx", model_id="clf", signing_key=pk, output_dir="clf.split",
          at=[["h2"]], split_points=["h2"], register=register)
    m = vault.open("clf.split", licence="alice.licence", server="tcp://host:7701",
                   server_key="worker.pub")
"""
