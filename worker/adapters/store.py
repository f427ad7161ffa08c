"""The adapter store: ``<root>/<adapter>/v<N>/`` PEFT folders, published atomically, garbage-collected."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from flexllm.worker.names import validate_name
from flexllm.worker.protocol import AdapterVersion

_VERSION_DIR = re.compile(r"v([0-9]+)")


class AdapterStore:
    """PEFT adapter versions under one root folder (a shared volume in a cluster)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, adapter: str, version: int) -> Path:
        validate_name(adapter, "adapter")  # no version, no path separator, no '..'
        return self.root / adapter / f"v{int(version)}"

    def versions(self, adapter: str) -> list[int]:
        """Published versions of ``adapter``, oldest first."""
        return self._numbers(adapter, published_only=True)

    def _numbers(self, adapter: str, published_only: bool) -> list[int]:
        base = self.folder(adapter, 0).parent
        if not base.is_dir():
            return []
        found = (_VERSION_DIR.fullmatch(p.name) for p in base.iterdir()
                 if not published_only or (p / "adapter_config.json").exists())
        return sorted(int(m[1]) for m in found if m)

    def adapters(self) -> list[str]:
        """Every adapter with at least one version (temporary folders start with '.' and are skipped)."""
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and self.versions(p.name))

    def describe(self, adapter: str, version: int, step: int = 0, loss: float = 0.0) -> AdapterVersion:
        return AdapterVersion(adapter, version, f"file://{self.folder(adapter, version)}", step, loss)

    def publish(self, adapter: str, write: Callable[[Path], None], step: int = 0, loss: float = 0.0
                ) -> AdapterVersion:
        """Write a new version with ``write(folder)`` (e.g. ``peft_model.save_pretrained``) into a temporary
        folder, then rename it to the next free ``v<N>``: readers never see a half-written version."""
        self.folder(adapter, 0).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=f".{adapter}-"))
        try:
            write(tmp)
            if not (tmp / "adapter_config.json").exists():
                raise ValueError(f"publishing {adapter!r}: the writer produced no adapter_config.json")
            while True:
                version = (self._numbers(adapter, published_only=False) or [0])[-1] + 1
                target = self.folder(adapter, version)
                try:
                    os.mkdir(target)  # reserve the number; a concurrent publisher takes the next one
                except FileExistsError:
                    continue
                os.replace(tmp, target)  # atomic: onto the empty reserved folder
                return self.describe(adapter, version, step, loss)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def publish_folder(self, adapter: str, source: str | Path, step: int = 0, loss: float = 0.0) -> AdapterVersion:
        """Publish a copy of an existing PEFT folder."""
        return self.publish(adapter, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True), step, loss)

    def gc(self, adapter: str, keep: int) -> list[int]:
        """Delete all but the newest ``keep`` versions; returns the deleted version numbers."""
        if keep < 1:
            raise ValueError("keep must be >= 1")
        doomed = self.versions(adapter)[:-keep]
        for version in doomed:
            shutil.rmtree(self.folder(adapter, version), ignore_errors=True)
        return doomed
