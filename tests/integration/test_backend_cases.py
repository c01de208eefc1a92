"""The ONNX backend node cases through the vault (see ``tests/backend_cases.py``).

The cases are built in memory by onnx's own generators (no data files, no
pinned onnx). Sampled to stay within the suite's time: every sixth case,
every case with a dtype that needs OrtValues (bfloat16, float8, int4) or a
sequence or optional value, all as the worker loads and runs them in
process; and a few of each kind through a real worker process. Every case
that plain onnxruntime passes must pass through the vault (``python -m
tests.backend_cases`` runs all of them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.backend_cases import KNOWN_DIFFERENCES, all_cases, check

_SPECIAL = re.compile(r"float8|e4m3|e5m2|int4|bfloat16|seq|optional", re.IGNORECASE)
_IN_WORKER = [
    "test_cast_FLOAT_to_FLOAT8E4M3FN", "test_sequence_insert_at_back",
    "test_loop16_seq_none", "test_loop13_seq", "test_if_opt",
]  # fmt: skip


def _sample() -> list[str]:
    return [n for i, n in enumerate(all_cases()) if i % 6 == 0 or _SPECIAL.search(n)]


def test_onnx_builds_the_node_cases() -> None:
    # onnx's generators build them in memory (1,884 with onnx 1.23.2; the 1.22
    # wheel's files held 1,765): an onnx without them would turn this whole
    # file into nothing: fail instead
    cases = all_cases()
    assert len(cases) > 1700
    assert set(_IN_WORKER) <= set(cases)


@pytest.mark.slow
def test_sampled_node_cases_pass_through_the_vault(tmp_path: Path) -> None:
    failures, passed = [], 0
    sample = _sample()
    for i, name in enumerate(sample):
        d = tmp_path / str(i)
        d.mkdir()
        status, why = check(name, str(d))
        if status == "fail" and name not in KNOWN_DIFFERENCES:
            failures.append(f"{name}: {why}")
        passed += status == "ok"
    assert not failures, "\n".join(failures)
    assert passed > len(sample) * 0.85  # the sample is not mostly skipped


@pytest.mark.parametrize("name", _IN_WORKER)
def test_node_cases_through_a_worker_process(tmp_path: Path, name: str) -> None:
    status, why = check(name, str(tmp_path), worker=True)
    assert status == "ok", why
