"""The base the project ships: what its own `cmlora pretrain-base` produced on the default suite, so that users
start from it as they would start from LLaVA's stage-1 checkpoint instead of spending 12-14 minutes of 2-core
CPU time on it (the issue allows this where a good base needs more than 10 minutes).

`shipped_base/` holds the base's Hugging Face files, its `base_eval.json` (held-out accuracy per skill) and
`SHIPPED.json`: the content key (`base.content_hash`) of the suite and recipe it was trained for, the exact
commands that reproduce it, and the sha256 of every file. `pretrain_base` installs it into the cache only when
the key of the user's suite and recipe is that key, and only after every file's hash matches; any other suite or
recipe is trained as before. `python -m cmlora.synth.shipped BASE --command ...` writes a new one (`make
shipped-base` runs the whole procedure).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).with_name("shipped_base")
MANIFEST = "SHIPPED.json"
# Not shipped: the per-question predictions of the base's evaluation (base_eval.json keeps the scores).
LEFT_OUT = frozenset({"base_eval_predictions.jsonl", MANIFEST})


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: Path | None = None) -> dict[str, Any] | None:
    path = (root or SHIPPED) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def find_shipped(key: str, root: Path | None = None) -> Path | None:
    """The shipped base folder if it was trained for content key `key`, else None. Raises ValueError if one of
    its files is missing or differs from the hash SHIPPED.json records (a damaged installation)."""
    root = root or SHIPPED
    manifest = read_manifest(root)
    if manifest is None or manifest["key"] != key:
        return None
    for name, expected in manifest["sha256"].items():
        path = root / name
        actual = sha256(path) if path.exists() else "missing"
        if actual != expected:
            raise ValueError(f"{path}: sha256 {actual}, but {root / MANIFEST} records {expected}: the shipped base "
                             "is damaged; reinstall cmlora, or train the base with --no-cache")
    return root


def install(root: Path, destination: Path) -> None:
    """Copy the shipped files (SHIPPED.json included, so that a base says where it came from) to `destination`."""
    destination.mkdir(parents=True)
    for name in [*read_manifest(root)["sha256"], MANIFEST]:
        shutil.copy2(root / name, destination / name)


def ship(base: Path, commands: list[str], root: Path | None = None) -> dict[str, Any]:
    """Make `base` (a folder written by `pretrain_base`) the shipped base, replacing the one in `root`."""
    root = root or SHIPPED
    report = json.loads((base / "base_eval.json").read_text())
    files = sorted(p.name for p in base.iterdir() if p.is_file() and p.name not in LEFT_OUT)
    manifest = {"key": report["key"], "commands": commands, "skills": {name: value["accuracy"] for name, value in
                                                                       report["skills"].items()},
                "sha256": {name: sha256(base / name) for name in files}}
    staging = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in files:
        shutil.copy2(base / name, staging / name)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cmlora.synth.shipped", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="a folder written by cmlora pretrain-base")
    parser.add_argument("--command", action="append", required=True,
                        help="a command that reproduces the base, in order (repeat the flag)")
    args = parser.parse_args(argv)
    manifest = ship(args.base, args.command)
    print(f"[cmlora] shipped base written to {SHIPPED} (key {manifest['key']}, {len(manifest['sha256'])} files)")


if __name__ == "__main__":
    main()
