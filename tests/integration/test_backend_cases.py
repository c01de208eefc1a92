"""The ONNX backend node cases through the vault (see ``tests/backend_cases.py``).

Sampled to stay within the suite's time: every sixth case, every case with
a dtype that needs OrtValues (bfloat16, float8, int4) or a sequence or
optional value, all as the worker loads and runs them in process; and a few
of each kind through a real worker process. Every case that plain
onnxruntime passes must pass through the vault (``python -m
tests.backend_cases`` runs all of them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.backend_cases import KNOWN_DIFFERENCES, all_cases, check

_SPECIAL = re.compile(r"float8|e4m3|e5m2|int4|bfloat16|seq|optional", re.IGNORECASE)
_CASES = all_cases()
_SAMPLE = [p for i, p in enumerate(_CASES) if i % 6 == 0 or _SPECIAL.search(Path(p).name)]
_IN_WORKER = [
    "test_cast_FLOAT_to_FLOAT8E4M3FN", "test_sequence_insert_at_back",
    "test_optional_has_element_optional_input", "test_loop13_seq", "test_if_opt",
]  # fmt: skip


def test_the_onnx_wheel_ships_the_node_cases() -> None:
    # the test extra pins onnx 1.22, whose wheel has them; a newer wheel
    # without them would turn this whole file into nothing: fail instead
    assert len(_CASES) > 1500


@pytest.mark.slow
def test_sampled_node_cases_pass_through_the_vault(tmp_path: Path) -> None:
    failures, passed = [], 0
    for i, path in enumerate(_SAMPLE):
        name = Path(path).name
        d = tmp_path / str(i)
        d.mkdir()
        status, why = check(path, str(d))
        if status == "fail" and name not in KNOWN_DIFFERENCES:
            failures.append(f"{name}: {why}")
        passed += status == "ok"
    assert not failures, "\n".join(failures)
    assert passed > len(_SAMPLE) * 0.85  # the sample is not mostly skipped


@pytest.mark.parametrize("name", _IN_WORKER)
def test_node_cases_through_a_worker_process(tmp_path: Path, name: str) -> None:
    path = next(p for p in _CASES if Path(p).name == name)
    status, why = check(path, str(tmp_path), worker=True)
    assert status == "ok", why
