"""Results files in the one flat record format of shared/RESULTS.md, written atomically.

A benchmark appends one record per (recipe, seed, data[, speaker]) cell as soon as it is measured, so a long
grid can run in parts: `ResultsFile.done(key)` tells which cells a rerun may skip.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from quasr.errors import QuasrError
from quasr.metrics import NORMALIZER


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OutputError(QuasrError, ValueError):
    """An output path that cannot be written (read-only, a file where a directory belongs, ...)."""


def check_writable(path: str | Path, what: str, kind: str = "file") -> Path:
    """Fail now, before any long work, if `path` cannot be written as a `kind` ("file" or "dir"); `what` names
    the option. Probes the nearest existing ancestor with a temporary directory (removed at once), so that
    read-only file systems and missing permissions are caught as they would be at the end; creates nothing."""
    path = Path(path).expanduser().absolute()
    if kind == "file" and path.is_dir():
        raise OutputError(f"{what} {path}: is a directory; give the path of a file to write")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise OutputError(f"{what} {path}: exists and is not a directory")
    anc = path.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"{what} {path}: {anc} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".quasr-probe-", dir=anc))
    except OSError as e:
        raise OutputError(f"{what} {path}: cannot write in {anc} ({e.strerror or e})") from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(parent: Path, name: str) -> list[Path]:
    """Remove what a killed writer of `parent/name` left: its staging directory `.NAME.tmp-PID-*` and a set-aside
    old version `.NAME.old-PID-*` whose process PID no longer runs. Returns what was removed."""
    import re
    import shutil

    removed = []
    for p in parent.glob(f".{name}.*"):
        m = re.fullmatch(re.escape(f".{name}.") + r"(tmp|old)-(\d+)-\w+", p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """Write a directory atomically: yields an empty staging directory beside `out_dir` (named with this
    process's id); when the block ends without error it replaces `out_dir` (replace_dir), otherwise it is
    removed. Staging directories left by a killed process are removed first (clean_stale)."""
    import shutil

    out_dir = Path(out_dir).expanduser().absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out_dir.parent, out_dir.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{os.getpid()}-", dir=out_dir.parent))
    try:
        yield tmp
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: str | Path, out_dir: str | Path) -> None:
    """Move a completed directory `tmp` to `out_dir` (same filesystem). An existing `out_dir` is set aside
    first and put back if the move fails, then removed: readers see the old or the new one, never a mix."""
    import shutil
    import uuid

    tmp, out_dir = Path(tmp), Path(out_dir)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def machine_info() -> dict:
    import torch

    from quasr import numerics

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__.split("+")[0],
            "python": platform.python_version(), "platform": platform.machine(), "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "numerics": numerics.state()["mode"]}


def cpu_model() -> str | None:
    """The CPU's model name: float results can differ in their last bits between CPUs (kernels differ)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def command_line() -> str:
    prog = Path(sys.argv[0]).name
    prog = "quasr" if prog in ("quasr", "__main__.py") else f"python {sys.argv[0]}"
    return " ".join([prog] + [shlex.quote(a) for a in sys.argv[1:]])


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


RECORD_KEYS = ("model", "method", "bits", "group_size", "act_bits", "calib", "n_calib", "seed", "decoding", "data",
               "speaker")


def record(**fields) -> dict:
    """A results record with every standard key present (None where not applicable)."""
    base = {k: None for k in RECORD_KEYS}
    base.update(fields)
    return base


class ResultsFile:
    """A results JSON that grows one record at a time and survives interruption."""

    def __init__(self, path: str | Path, benchmark: str, command: str | None = None, fresh: bool = False,
                 option_keys: tuple[str, ...] = ()):
        """option_keys: record keys beyond the standard ones that tell cells apart (e.g. "alpha")."""
        self.path = Path(path)
        self.keys = RECORD_KEYS + tuple(option_keys)
        self.data = {"benchmark": benchmark, "created": now(), "command": command or command_line(),
                     "normalizer": NORMALIZER, "machine": machine_info(), "records": []}
        if self.path.exists() and fresh:
            # start over: the previous file is kept aside (add() merges whatever is on disk at self.path)
            self.path.replace(self.path.with_name(f".{self.path.name}.prev"))
        elif self.path.exists():
            old = json.loads(self.path.read_text())
            if old.get("benchmark") != benchmark:
                raise ValueError(f"{self.path}: holds benchmark {old.get('benchmark')!r}, not {benchmark!r}")
            self.data["records"] = old.get("records", [])

    @property
    def records(self) -> list[dict]:
        return self.data["records"]

    def key(self, rec: dict) -> tuple:
        return tuple(json.dumps(rec.get(k), sort_keys=True) for k in self.keys)

    def done(self, rec: dict) -> bool:
        """Whether a measurement with the same cell key (missing keys count as None) is already stored (in the file
        as it is now: another run may have added or removed cells). A record of a failure (it has an "error") is
        not a measurement: whether to run a failed cell again is the caller's choice (bench/peers/run.py
        --retry-failed), and once it runs, it is measured."""
        if self.path.exists():
            self.data["records"] = json.loads(self.path.read_text()).get("records", [])
        k = self.key(rec)
        return any(self.key(r) == k and not r.get("error") for r in self.records)

    def add(self, *recs: dict) -> None:
        """Append records (replacing any with the same cell key) and rewrite the file atomically.

        The file is re-read under an exclusive lock first and is the truth: records another process wrote (or
        removed) since this one read the file stay as they are on disk, so several processes may fill parts of one
        grid, and records moved aside while a run is going are not written back by it."""
        import fcntl

        lock = self.path.with_name(f".{self.path.name}.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            if self.path.exists():
                self.data["records"] = json.loads(self.path.read_text()).get("records", [])
            for rec in recs:
                rec.setdefault("command", self.data["command"])  # which run measured this cell
                rec.setdefault("machine", self.data["machine"])  # and on what
                k = self.key(rec)
                self.data["records"] = [r for r in self.records if self.key(r) != k] + [rec]
            self.data["created"] = now()
            write_json(self.path, self.data)


def transcript_failures(path: str | Path) -> tuple[int, list[tuple[str, str, int, int]]]:
    """Score a committed transcript file (JSON Lines with "id", "ref", "hyp") again and name its failed decodes
    (quasr.metrics.failure): (all word errors, [(utterance id, "truncated" | "runaway", its errors, its reference
    words)]). A line that is not JSON or lacks a field is an error naming the file and line."""
    from quasr import metrics

    path = Path(path)
    total, failed = 0, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            u = json.loads(line)
            ref, hyp, uid = u["ref"], u["hyp"], u["id"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise QuasrError(f"{path}: line {n} is not a transcript line with id, ref and hyp ({e!r})") from None
        c = metrics.score_utterance(ref, hyp)["counts"]
        total += c.errors
        kind = metrics.failure(c)
        if kind:
            failed.append((uid, kind, c.errors, c.n_ref))
    return total, failed
