"""``synthesize``: a teacher turns a prompt list into a training dataset, resumably.

Output (the dataset format of urae.data): ``00000.png`` + ``00000.json`` ({"prompt", "seed",
"teacher"}) per prompt, and ``manifest.json`` (teacher, settings, prompts, seeds, status of each
prompt). The image is written first and the caption last, each atomically, so a prompt counts as done
exactly when its caption exists; a rerun skips done prompts and prompts the teacher moderated.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from urae.errors import InvalidSpecError, TeacherError
from urae.synth.teachers import Teacher, TeacherModerated

MANIFEST_NAME = "manifest.json"
DONE = "done"
MODERATED = "moderated"
FAILED = "failed"


@dataclass
class SynthReport:
    done: list[int] = field(default_factory=list)  # generated in this run
    skipped: list[int] = field(default_factory=list)  # already done or moderated before
    moderated: list[int] = field(default_factory=list)  # refused by the teacher in this run
    failed: dict[int, str] = field(default_factory=dict)  # index -> reason (retried by the next run)
    manifest: Path | None = None


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line; blank lines and lines starting with # are ignored)
    or a JSON list of strings."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidSpecError("prompts", f"cannot read {file}: {exc.strerror}") from None
    if file.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidSpecError("prompts", f"{file} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(p, str) and p.strip() for p in data):
            raise InvalidSpecError("prompts", f"{file} must hold a JSON list of non-empty strings")
        prompts = [p.strip() for p in data]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise InvalidSpecError("prompts", f"{file} holds no prompts")
    return prompts


def synthesize(
    prompts: list[str],
    output_dir: str | Path,
    teacher: Teacher,
    *,
    seed: int = 0,
    concurrency: int = 4,
    on_item: Callable[[int, str], None] | None = None,
) -> SynthReport:
    """Generate one image per prompt (seed ``seed + index``) into ``output_dir``.

    ``on_item(index, status)`` after each prompt. A failed prompt does not stop the others; it is
    listed in the report and the manifest, and the next run retries it.
    """
    if concurrency < 1:
        raise InvalidSpecError("concurrency", f"must be at least 1, got {concurrency}")
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    previous = _read_manifest(folder)
    status: dict[int, str] = {}
    for index, prompt in enumerate(prompts):
        caption = folder / f"{index:05d}.json"
        if caption.exists():
            try:
                recorded = json.loads(caption.read_text(encoding="utf-8")).get("prompt")
            except (ValueError, AttributeError):
                raise InvalidSpecError("prompts", f"{caption} is not a caption written by urae synth") from None
            if recorded != prompt:
                raise InvalidSpecError(
                    "prompts", f"{caption} was made for another prompt ({recorded!r}); use a new output folder"
                )
            status[index] = DONE
        elif previous.get(str(index), {}).get("status") == MODERATED and previous[str(index)].get("prompt") == prompt:
            status[index] = MODERATED
    report = SynthReport(skipped=sorted(status))
    todo = [i for i in range(len(prompts)) if i not in status]
    lock = threading.Lock()
    _write_manifest(folder, teacher, prompts, seed, status)

    def run(index: int) -> None:
        prompt = prompts[index]
        try:
            image = teacher.generate(prompt, seed + index)
            _write_atomically(folder / f"{index:05d}{image.suffix}", image.data)
            caption = {"prompt": prompt, "seed": seed + index, "teacher": teacher.name}
            _write_atomically(folder / f"{index:05d}.json", json.dumps(caption, ensure_ascii=False).encode())
            outcome = DONE
        except TeacherModerated:
            outcome = MODERATED
        except TeacherError as exc:
            outcome = f"{FAILED}: {exc}"
        with lock:
            status[index] = outcome
            if outcome == DONE:
                report.done.append(index)
            elif outcome == MODERATED:
                report.moderated.append(index)
            else:
                report.failed[index] = outcome[len(FAILED) + 2 :]
        if on_item is not None:
            on_item(index, outcome)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for future in [pool.submit(run, i) for i in todo]:
            future.result()
    report.done.sort()
    report.moderated.sort()
    report.manifest = _write_manifest(folder, teacher, prompts, seed, status)
    return report


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        items = json.loads(path.read_text(encoding="utf-8")).get("items", [])
    except (OSError, ValueError):
        return {}
    return {str(item.get("index")): item for item in items if isinstance(item, dict)}


def _write_manifest(folder: Path, teacher: Teacher, prompts: list[str], seed: int, status: dict[int, str]) -> Path:
    manifest = {
        "teacher": teacher.name,
        "settings": teacher.settings(),
        "seed": seed,
        "items": [
            {"index": i, "prompt": p, "seed": seed + i, "status": status.get(i, "pending")} for i, p in enumerate(prompts)
        ],
    }
    path = folder / MANIFEST_NAME
    _write_atomically(path, json.dumps(manifest, indent=1, ensure_ascii=False).encode())
    return path


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
