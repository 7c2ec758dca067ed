"""Uploaded dataset files: staged for checking, kept only once a run uses them, never in the repository.

An upload is first written to a staging folder in the system's temporary directory, where the
Run page validates it (a rejected file is never kept). Start moves the file a run will read into
the uploads folder, which outlives the dashboard so that Resume finds the dataset again:
$THOUGHTSWEEP_UPLOADS, else $XDG_DATA_HOME/thoughtsweep/uploads (~/.local/share/...).
A file whose question / answer columns have other names is rewritten as JSON lines with the
fields the user mapped, so the sweep reads it like any GSM8K file.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

STANDARD = ("question", "answer")


def staging_dir() -> Path:
    return Path(tempfile.gettempdir()) / "thoughtsweep-staging"


def uploads_dir() -> Path:
    if os.environ.get("THOUGHTSWEEP_UPLOADS"):
        return Path(os.environ["THOUGHTSWEEP_UPLOADS"]).expanduser()
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "thoughtsweep" / "uploads"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(name))[-80:].lstrip(".") or "upload"


def stage(name: str, content: bytes) -> Path:
    """The bytes as `<sha256[:12]>-<name>` in the staging folder (same content, same file)."""
    target = staging_dir() / f"{hashlib.sha256(content).hexdigest()[:12]}-{safe_name(name)}"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return target


def columns(path: Path) -> list[str]:
    """The field names a tabular or JSON file offers (first record for JSON); [] when unreadable."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"))).fieldnames or [])
        if suffix == ".parquet":
            import pyarrow.parquet as pq
            return list(pq.read_schema(path).names)
        if suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    return list(record) if isinstance(record, dict) else []
        if suffix == ".json":
            items = json.loads(path.read_text(encoding="utf-8"))
            return list(items[0]) if isinstance(items, list) and items and isinstance(items[0], dict) else []
    except (OSError, ValueError, UnicodeDecodeError):  # validation reports why, with the line
        return []
    return []


def _records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline="")))
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def mapped(path: Path, question: str, answer: str) -> Path:
    """`path` itself when its fields are already question/answer, else a staged JSON-lines copy with them renamed."""
    if (question, answer) == STANDARD:
        return path
    lines = []
    for record in _records(path):
        if not isinstance(record, dict):
            lines.append(json.dumps(record))  # rejected by validation with its line number, as before
            continue
        rest = {k: v for k, v in record.items() if k not in (question, answer, *STANDARD)}
        lines.append(json.dumps({"question": record.get(question), "answer": record.get(answer), **rest},
                                default=str))
    content = "\n".join(lines).encode()
    return stage(f"{path.stem}.{safe_name(question)}.{safe_name(answer)}.jsonl", content)


def shown(message: str) -> str:
    """A message as the user should read it: staged and kept uploads named by their file, not their folder."""
    for folder in (staging_dir(), uploads_dir()):
        message = re.sub(re.escape(str(folder)) + r"/([0-9a-f]{12}-)?", "", message)
    return message


def keep(path: str) -> str:
    """A staged dataset a run is about to use, moved to the uploads folder; other paths unchanged."""
    source = Path(path)
    if source.parent != staging_dir():
        return path
    target = uploads_dir() / source.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return str(target)
