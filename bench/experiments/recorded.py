"""A study's settings recorded under its root (ROOT/study.json), so that the tables read the study the runs belong to
and a root that holds another study's runs is refused rather than mixed. Mixed into the studies' frozen dataclasses."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from repopt._io import write_text


class Recorded:
    def save(self, root: Path) -> None:
        path, mine = root / "study.json", json.dumps(asdict(self), indent=1)
        if path.is_file() and type(self).load(root) != self:
            raise SystemExit(f"{path} records another study ({path.read_text().strip()}); use another --root")
        root.mkdir(parents=True, exist_ok=True)
        write_text(path, mine)

    @classmethod
    def load(cls, root: Path):
        """The study recorded under `root`, or the default one where none is."""
        path = root / "study.json"
        if not path.is_file():
            return cls()
        d = json.loads(path.read_text())
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
