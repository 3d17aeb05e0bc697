"""The digest of the sources the binaries are built from: SHA-256 over the path and bytes of every
Rust, CUDA, C++ and manifest file under crates/, and of the top-level Cargo.toml and Cargo.lock,
in path order. scripts/build-cuda.sh writes it beside the binaries it archives (SOURCE_DIGEST);
the device check compares it with the tree it runs in, so that a table is never made, unnoticed,
by binaries older than the code it describes.

    python3 scripts/cuda/source_digest.py [REPO]   # prints the digest
"""

import hashlib
import sys
from pathlib import Path

SUFFIXES = {".rs", ".cu", ".cuh", ".h", ".cpp", ".toml"}


def source_digest(repo: Path) -> str:
    files = [p for p in (repo / "crates").rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    files += [repo / "Cargo.toml", repo / "Cargo.lock"]
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.relative_to(repo).as_posix()):
        name = path.relative_to(repo).as_posix().encode()
        data = path.read_bytes()
        digest.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


if __name__ == "__main__":
    print(source_digest(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2])))
