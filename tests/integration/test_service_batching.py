"""Dynamic batching never mixes callers' rows unless the publisher declared,
and ``vault seal`` checked, that rows are independent (issue 17, item 1).

The attack: two remote callers, each with its own key (its own licence),
call one ``--max-batch 32`` service at the same moment. The model computes
``y = x - mean(x over dim 0)`` (or is an LSTM exported sequence-first, whose
dim 0 is time); the attacker sends a row of zeros. Joined into one batch,
the attacker's output is ``-victim / 2``: it recovers the victim's row
exactly. The service joins calls only for a package whose signed manifest
declares it batchable, so here the attacker's output never depends on the
victim's row. The control serves the same models declared batchable through
a test-only path that skips the seal-time check: the same attack recovers
the victim's row.

The calls are made to meet in the queue deterministically: the model's only
worker is stopped (SIGSTOP) while a first call holds it, the victim's and
the attacker's calls queue behind it (the service's in-flight gauge says
so), then the worker is let go.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

import vault
from tests.integration.test_service import Running, caller_licence, held, start_service, wait_for
from tests.models import (
    batch_centred,
    lstm_sequence_first,
    mlp,
    reference_pipeline,
    sklearn_shaped_regressor,
)
from tests.sealed import Sealed, seal_for_test
from vault.core.errors import SealError
from vault.core.licence import Licence
from worker.service import AllowListPolicy

MODELS: dict[str, Any] = {
    "centred": batch_centred(),
    "lstm": lstm_sequence_first(),
    "centred_forced": batch_centred(),
    "lstm_forced": lstm_sequence_first(),
    "mlp": mlp(n_features=4, seed=3),
    "skl": sklearn_shaped_regressor(),
}
DECLARED = ("mlp", "skl")  # declared with --batchable, and checked
FORCED = ("centred_forced", "lstm_forced")  # the control: declared past the check


def _seal_forced(tmp: Path, model: Any, name: str) -> Sealed:
    """Test-only: a package whose publisher declared it batchable without the
    seal-time check (what a careless publisher's own tool could sign)."""
    with mock.patch("vault.sealing.check_rows", lambda *a, **k: None):
        return seal_for_test(tmp, model, name=name, batchable=True)


@dataclass
class Batching:
    run: Running
    mallory: Licence  # the attacker: a second remote caller with its own key


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Batching]:
    tmp = tmp_path_factory.mktemp("batching")
    real_seal = seal_for_test

    def seal(directory: Any, model: Any, *, name: str, **kw: Any) -> Sealed:
        if name in FORCED:
            return _seal_forced(Path(directory), model, name)
        return real_seal(directory, model, name=name, **kw)

    with mock.patch("tests.integration.test_service.seal_for_test", seal):
        run = start_service(tmp, MODELS, instances=1, max_batch=32, max_queue_delay_us=0,
                            instance_inflight=1, batchable=DECLARED)  # fmt: skip
    mallory = caller_licence("mallory")
    policy = run.svc.cfg.policy
    assert isinstance(policy, AllowListPolicy)
    policy.by_key[mallory.client_public_key] = "mallory"
    try:
        yield Batching(run, mallory)
    finally:
        run.stop()


def _meet_in_one_queue(b: Batching, model: str, victim_x: np.ndarray[Any, Any],
                       attacker_x: np.ndarray[Any, Any]) -> tuple[Any, Any]:  # fmt: skip
    """Victim (alice) and attacker (mallory) call ``model`` while its worker
    is busy, so both calls wait in its queue together; returns their outputs."""
    service = b.run
    m_state = service.svc.models[model]
    inflight = service.metric("vault_inflight", model=model)
    with service.connect(model) as first, service.connect(model) as victim, \
            service.connect(model, licence=b.mallory) as attacker, \
            ThreadPoolExecutor(3) as pool:  # fmt: skip
        with held(list(m_state.instances)):
            blocker = pool.submit(first.compute, {next(iter(victim.inputs)): victim_x})
            _wait(
                service,
                model,
                lambda: any(i.inflight for i in m_state.instances),
                "the worker is busy",
            )
            v = pool.submit(victim.compute, {next(iter(victim.inputs)): victim_x})
            # the victim's call first in the queue, then the attacker's (whose
            # rows come after the victim's in a joined batch: along an LSTM's
            # time axis, they are the ones that see the victim's)
            wait_for(lambda: service.metric("vault_inflight", model=model) == inflight + 2,
                     "the victim's call waits in the model's queue")  # fmt: skip
            a = pool.submit(attacker.compute, {next(iter(attacker.inputs)): attacker_x})
            wait_for(lambda: service.metric("vault_inflight", model=model) == inflight + 3,
                     "both calls wait in the model's queue")  # fmt: skip
        blocker.result(timeout=60)
        return v.result(timeout=60), a.result(timeout=60)


def _wait(service: Running, model: str, cond: Any, what: str) -> None:
    try:
        wait_for(cond, what)
    except AssertionError:
        m = service.svc.models[model]
        state = [(i.pid, i.inflight, i.alive()) for i in m.instances]
        log = [ln for ln in service.log_path.read_text().splitlines() if model in ln][-20:]
        raise AssertionError(
            f"{what}: instances {state}, queue {len(m.queue)}, starting {m.starting}, log {log}"
        ) from None


def test_undeclared_models_never_join_two_callers_rows(service: Batching) -> None:
    rng = np.random.default_rng(7)
    for name in ("centred", "lstm"):
        assert service.run.svc.models[name].batchable is False
        assert "not declared batchable" in service.run.svc.models[name].batching_why
    # y = x - mean(x over dim 0): the attacker sends zeros
    victim = rng.standard_normal((1, 4)).astype(np.float32)
    zeros = np.zeros((1, 4), np.float32)
    rows_before = service.run.metric("vault_batch_size_sum", model="centred")
    calls_before = service.run.metric("vault_batch_size_count", model="centred")
    v, a = _meet_in_one_queue(service, "centred", victim, zeros)
    np.testing.assert_array_equal(a["y"], zeros)  # what the attacker gets alone
    np.testing.assert_array_equal(v["y"], np.zeros_like(victim))  # the victim's own, alone
    # three calls, three worker calls of one row each: nothing was joined
    assert service.run.metric("vault_batch_size_count", model="centred") == calls_before + 3
    assert service.run.metric("vault_batch_size_sum", model="centred") == rows_before + 3
    # the sequence-first LSTM: dim 0 is time
    seq_v = rng.standard_normal((5, 1, 3)).astype(np.float32)
    seq_a = rng.standard_normal((4, 1, 3)).astype(np.float32)
    v, a = _meet_in_one_queue(service, "lstm", seq_v, seq_a)
    alone = reference_pipeline([lstm_sequence_first()], {"x": seq_a})["y"]
    np.testing.assert_allclose(a["y"], alone, rtol=1e-5, atol=1e-6)
    assert a["y"].shape == (4, 1, 1, 5)


def test_control_a_forced_declaration_lets_the_attacker_read_the_victims_row(
    service: Batching,
) -> None:
    rng = np.random.default_rng(8)
    assert service.run.svc.models["centred_forced"].batchable is True
    victim = rng.standard_normal((1, 4)).astype(np.float32)
    zeros = np.zeros((1, 4), np.float32)
    v, a = _meet_in_one_queue(service, "centred_forced", victim, zeros)
    # joined: [victim; zeros] - mean = [victim/2; -victim/2]: the attacker reads the row
    np.testing.assert_allclose(-2 * a["y"], victim, rtol=1e-6)
    np.testing.assert_allclose(v["y"], victim / 2, rtol=1e-6)  # and the victim's is wrong
    seq_v = rng.standard_normal((5, 1, 3)).astype(np.float32)
    seq_a = rng.standard_normal((4, 1, 3)).astype(np.float32)
    _, a = _meet_in_one_queue(service, "lstm_forced", seq_v, seq_a)
    alone = reference_pipeline([lstm_sequence_first()], {"x": seq_a})["y"]
    assert not np.allclose(a["y"], alone, rtol=1e-3, atol=1e-4)  # depends on the victim's


def test_seal_refuses_the_declaration_naming_the_output(tmp_path: Path) -> None:
    for name in ("centred", "lstm"):
        with pytest.raises(SealError, match=r"--batchable refused: output 'y' row \d+ depends"):
            seal_for_test(tmp_path, MODELS[name], name=name, batchable=True)
        assert not (tmp_path / f"{name}.vault").exists()


def test_declared_models_are_batched_and_exact(service: Batching) -> None:
    rng = np.random.default_rng(9)
    for name, feed in (("mlp", "x"), ("skl", "float_input")):
        assert service.run.svc.models[name].batchable is True
        calls_before = service.run.metric("vault_batch_size_count", model=name)
        rows_before = service.run.metric("vault_batch_size_sum", model=name)
        xv = rng.standard_normal((2, 4)).astype(np.float32)
        xa = rng.standard_normal((3, 4)).astype(np.float32)
        v, a = _meet_in_one_queue(service, name, xv, xa)
        for x, got in ((xv, v), (xa, a)):
            want = reference_pipeline([MODELS[name]], {feed: x})
            for out, arr in want.items():
                np.testing.assert_allclose(got[out], arr, rtol=1e-5, atol=1e-6)
        # the blocker alone, then one worker call of the two callers' 5 rows
        assert service.run.metric("vault_batch_size_count", model=name) == calls_before + 2
        assert service.run.metric("vault_batch_size_sum", model=name) == rows_before + 2 + 5


def test_start_says_per_model_whether_batching_is_on_and_why(service: Batching) -> None:
    lines = service.run.log_path.read_text().splitlines()
    import json

    said = {r["model"]: r for r in map(json.loads, lines) if r.get("event") == "model_batching"}
    assert said["mlp"]["batching"] is True and said["centred"]["batching"] is False
    assert "not declared batchable" in said["centred"]["reason"]
    described = service.run.svc._describe(service.run.svc.models["lstm"])
    assert described["batching"] is False and "not declared" in described["batching_reason"]
    with pytest.raises(vault.UnknownModelError):  # nothing else changed for callers
        service.run.connect("nope")
