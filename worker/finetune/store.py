"""Numbered adapter versions ``<root>/<adapter>/v<N>/``: written to a temp dir, renamed into place."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from flexllm.worker.engine.lora import validate_adapter_name

_VERSION = re.compile(r"^v([0-9]+)$")
METADATA = "metadata.json"


class AdapterStore:
    """The versions of one adapter; keeps the newest ``keep_versions``."""

    def __init__(self, root: Path, adapter: str, keep_versions: int):
        if "@" in validate_adapter_name(adapter) or adapter in (".", ".."):
            raise ValueError(f"invalid adapter name {adapter!r}: a trained adapter's name has no @version")
        self.folder = Path(root) / adapter
        self.keep_versions = keep_versions

    def versions(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(
            int(m[1]) for p in self.folder.iterdir() if (m := _VERSION.match(p.name)) and p.is_dir()
        )

    def latest(self) -> Path | None:
        versions = self.versions()
        return self.folder / f"v{versions[-1]}" if versions else None

    def publish(self, write: Callable[[Path], None], metadata: dict) -> tuple[int, Path]:
        """``write(tmp_dir)`` fills a new version, ``metadata`` goes to metadata.json; -> (N, v<N> path)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        version = (self.versions() or [0])[-1] + 1
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=self.folder))
        try:
            write(tmp)
            (tmp / METADATA).write_text(json.dumps({"version": version, **metadata}, indent=2))
            target = self.folder / f"v{version}"
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.versions()[: -self.keep_versions]:
            shutil.rmtree(self.folder / f"v{old}", ignore_errors=True)
        return version, target
