"""Run the commands the documentation shows, exactly as written.

:func:`doc_blocks` finds every command block in README.md, docs/*.md and
deploy/**/*.md: fenced ``bash``/``sh``/``shell``/``console`` and ``python``
blocks, and unlabelled fences whose first line is a command (``vault ...``,
``python ...``, ``$ ...``). A block is named by its file and its first line
that is not a comment (:attr:`Block.key`).

:class:`Flow` runs blocks inside an :class:`~tests.nshost.NsHost` (a private
network and mount namespace: the documented ports, hosts and system paths
are the flow's own), one command at a time with ``bash -e -o pipefail``, in
the flow's directory, each command's text untouched:

- a long-running command (``vault keyserver serve``, ``vault worker serve``,
  ``vault daemon``) is started in the background and the flow waits for its
  one JSON ready line, as a person at a terminal waits for it;
- a ``python`` block runs as a script, after a *prelude* that defines what
  the text leaves to the reader (``arr``, ``batch``) and before the flow's
  own checks;
- a command the test machine cannot run (``systemctl`` without systemd) may
  be *emulated* by the flow, which says how (``Flow.shell(..., emulate=)``).

The environment is the test's: ``vault`` is this checkout's, ``python3`` is
the system's; there is no network beyond the host itself, so pip is told
where packages come from by its environment variables (``PIP_NO_INDEX``...),
never by changing a command.

Example::

    with NsHost(tmp, hosts=["host"]) as h:
        flow = Flow(h, tmp)
        flow.shell(block("README.md", "vault keyserver init ks"))
        flow.python(block("README.md", "import vault"), prelude="arr = ...")
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.nshost import NsHost

__all__ = [
    "ROOT",
    "Block",
    "Flow",
    "block",
    "doc_blocks",
    "doc_files",
    "logical_commands",
    "matching",
]

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
LONG_RUNNING = re.compile(
    r"^(?:\S*/)?vault (?:keyserver serve|worker serve|daemon)\b"
)  # also /opt/vault/venv/bin/vault ...
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_BACKGROUNDED = re.compile(r"&\s*(#.*)?$")  # "cmd &" or "cmd &  # a comment"


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # line number of the fence
    lang: str  # "bash", "python", "" (an unlabelled fence)
    text: str

    @property
    def key(self) -> str:
        """The first line that is not blank or a comment, whitespace collapsed."""
        for line in self.text.splitlines():
            s = line.strip()
            if s and not s.startswith("#"):
                return " ".join(s.split())
        return ""

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS or self.lang == ""


def doc_files() -> list[Path]:
    return sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                   *(ROOT / "deploy").rglob("*.md")])  # fmt: skip


def _is_command_block(lang: str, text: str) -> bool:
    if lang in SHELL_LANGS or lang == "python":
        return True
    if lang:
        return False  # json, text, diagrams
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first.startswith(("vault ", "python", "$ "))


def doc_blocks() -> list[Block]:
    out: list[Block] = []
    for path in doc_files():
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines):
            m = _FENCE.match(lines[i])
            if not m:
                i += 1
                continue
            indent, lang = m.group(1), m.group(2)
            j = i + 1
            body: list[str] = []
            while j < len(lines) and not lines[j].strip().startswith("```"):
                line = lines[j]
                body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
                j += 1
            text = "\n".join(body) + "\n"
            if _is_command_block(lang, text):
                out.append(Block(str(path.relative_to(ROOT)), i + 1, lang, text))
            i = j + 1
    return out


def matching(blocks: list[Block], path: str, text: str) -> list[Block]:
    """The blocks of ``path`` whose text contains ``text``."""
    return [b for b in blocks if b.path == path and text in b.text]


def block(path: str, text: str) -> Block:
    """The one command block of ``path`` whose text contains ``text``."""
    found = matching(doc_blocks(), path, text)
    assert len(found) == 1, f"{path}: {len(found)} command blocks contain {text!r}"
    return found[0]


def logical_commands(text: str) -> list[str]:
    """The block's commands: continuation lines (ending in ``\\``) joined,
    blank and comment-only lines dropped; each command's text as written."""
    out: list[str] = []
    cur: list[str] = []
    for line in text.splitlines():
        if not cur and (not line.strip() or line.strip().startswith("#")):
            continue
        cur.append(line)
        if not line.rstrip().endswith("\\"):
            out.append("\n".join(cur))
            cur = []
    if cur:
        out.append("\n".join(cur))
    return out


@dataclass
class Flow:
    """Documented commands run in ``host``, in ``workdir``, one after another."""

    host: NsHost
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    timings: list[tuple[float, str]] = field(default_factory=list)  # (seconds, command)
    _bg: int = 0

    def __post_init__(self) -> None:
        bindir = self.workdir / ".flow-bin"
        bindir.mkdir(exist_ok=True)
        vault_bin = Path(sys.executable).parent / "vault"
        assert vault_bin.exists(), f"{vault_bin}: install the project first (pip install -e .)"
        if not (bindir / "vault").exists():
            (bindir / "vault").symlink_to(vault_bin)
        self.base_env = {
            "PATH": f"{bindir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.workdir),
            "LANG": "C.UTF-8",
            "PIP_NO_CACHE_DIR": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    # -- shell ---------------------------------------------------------------------

    def shell(
        self,
        b: Block,
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        emulate: Mapping[str, Callable[[], None]] | None = None,
        first: int | None = None,
        start: int = 0,
    ) -> list[subprocess.CompletedProcess[str] | dict[str, Any]]:
        """Run every command of ``b``; a long-running one in the background
        (returns its ready line), ``emulate``: command prefix -> what the flow
        does instead (only for what this machine cannot run). ``first``: only
        the block's first N commands (from the ``start``-th), for a flow that
        needs another page's set-up (the page's own flow runs the whole
        block)."""
        assert b.is_shell, b.where
        results: list[subprocess.CompletedProcess[str] | dict[str, Any]] = []
        for cmd in logical_commands(b.text)[start:first]:
            stripped = cmd.strip()
            if emulate and any(stripped.startswith(p) for p in emulate):
                prefix = next(p for p in emulate if stripped.startswith(p))
                emulate[prefix]()
                self.ran.append(f"(emulated) {stripped}")
                continue
            if LONG_RUNNING.match(stripped):
                results.append(self.background(cmd, cwd=cwd, env=env, where=b.where))
            else:
                results.append(self.run(cmd, cwd=cwd, env=env, where=b.where))
        return results

    def _env(self, env: Mapping[str, str] | None) -> dict[str, str]:
        return {**self.base_env, **self.env, **(env or {})}

    def run(self, cmd: str, *, cwd: Path | None = None, env: Mapping[str, str] | None = None,
            where: str = "flow", timeout: float = 300) -> subprocess.CompletedProcess[str]:  # fmt: skip
        t0 = time.monotonic()
        r = self.host.run(["bash", "-e", "-o", "pipefail", "-c", cmd], cwd=cwd or self.workdir,
                          env=self._env(env), text=True, timeout=timeout)  # fmt: skip
        self.ran.append(cmd)
        self.timings.append((time.monotonic() - t0, cmd.split("\n")[0][:80]))
        assert r.returncode == 0, (
            f"{where}: the documented command failed (exit {r.returncode}):\n{cmd}\n"
            f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
        )
        return r

    def background(self, cmd: str, *, cwd: Path | None = None,
                   env: Mapping[str, str] | None = None, where: str = "flow",
                   timeout: float = 180) -> dict[str, Any]:  # fmt: skip
        """Start ``cmd`` and wait for its JSON ready line (``{"ready": true}``)."""
        self._bg += 1
        out = self.workdir / f".bg{self._bg}.out"
        err = self.workdir / f".bg{self._bg}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = self.host.popen(["setsid", "bash", "-c", cmd], cwd=cwd or self.workdir,
                                   env=self._env(env), stdout=o, stderr=e,
                                   stdin=subprocess.DEVNULL)  # fmt: skip
        self.ran.append(cmd)
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            for line in out.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    msg = json.loads(line)
                    if msg.get("ready") is True:
                        self.timings.append((time.monotonic() - t0, cmd.split("\n")[0][:80]))
                        msg["_stderr"] = str(err)
                        return dict(msg)
            # a command without "&" is the process itself: its exit is a failure;
            # one with "&" returned at once and its child writes the files
            done = proc.poll() is not None and not _BACKGROUNDED.search(cmd)
            if done or time.monotonic() > deadline:
                raise AssertionError(
                    f"{where}: no ready line from:\n{cmd}\n--- stdout\n{out.read_text()[-2000:]}"
                    f"\n--- stderr\n{err.read_text()[-5000:]}"
                )
            time.sleep(0.05)

    # -- python --------------------------------------------------------------------

    def python(self, b: Block, *, prelude: str = "", after: str = "",
               cwd: Path | None = None, python: str | None = None
               ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run a ``python`` block as written, between the flow's prelude and
        its checks (both dedented; the block is not touched)."""
        assert b.lang == "python", b.where
        self._bg += 1
        script = self.workdir / f".snippet{self._bg}.py"
        script.write_text(
            "# prelude (the test's)\n" + textwrap.dedent(prelude) +
            f"\n# --- {b.where}, as written\n" + b.text +
            "# --- checks (the test's)\n" + textwrap.dedent(after)
        )  # fmt: skip
        # the flow's own checks import tests.models (the documented text never does)
        env = self._env({"PYTHONPATH": str(ROOT)})
        t0 = time.monotonic()
        r = self.host.run([python or sys.executable, str(script)], cwd=cwd or self.workdir,
                          env=env, text=True, timeout=300)  # fmt: skip
        self.ran.append(b.text)
        self.timings.append((time.monotonic() - t0, f"python {b.where}"))
        assert r.returncode == 0, (
            f"{b.where}: the documented Python failed (exit {r.returncode}):\n{b.text}\n"
            f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-5000:]}"
        )
        return r


def unit_exec_start(unit: str) -> str:
    """The ``ExecStart=`` command of a systemd unit file (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", unit)
    m = re.search(r"^ExecStart=(.+)$", text, re.M)
    assert m is not None, "no ExecStart in the unit"
    return m.group(1).strip()


def shell_words(cmd: str) -> list[str]:
    return shlex.split(cmd.replace("\\\n", " "), comments=True)


def copy_checkout(dest: Path) -> Path:
    """The repository's tracked files (a checkout, without build outputs)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    for rel in filter(None, files):
        src = ROOT / rel
        if not src.exists():  # deleted in the working tree
            continue
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            dst.write_bytes(src.read_bytes())
            os.chmod(dst, src.stat().st_mode & 0o777)
    return dest


def require_same_python(python: str) -> None:
    """The system ``python3`` a documented venv is made from runs the wheels of
    this interpreter's site-packages (the flow's stand-in for an index)."""
    from tests.prereq import require

    got = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                         capture_output=True, text=True)  # fmt: skip
    require(got.returncode == 0 and got.stdout.strip() == str(sys.version_info[:2]),
            f"{python} of this interpreter's version ({sys.version_info[:2]})")  # fmt: skip
