#!/usr/bin/env python3
"""Unpack NVIDIA's CUDA wheels into one toolkit-shaped prefix (bin/, include/, lib/, nvvm/).

Every CUDA 13 wheel keeps its files under `nvidia/cu13/`; merged, those trees
have the layout of a CUDA toolkit, which is what nvcc (through its
nvcc.profile), cudaforge and cudarc's build script expect of $CUDA_HOME.
Python's zipfile drops Unix permissions, so they are restored from each entry's
external attributes (nvcc, ptxas, cicc... must stay executable).

usage: unpack_wheels.py PREFIX WHEEL...
"""
import os
import sys
import zipfile

STRIP = "nvidia/cu13/"


def unpack(wheel: str, prefix: str) -> int:
    count = 0
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if not name.startswith(STRIP) or name.endswith("/"):
                continue  # dist-info and folders
            rel = name[len(STRIP):]
            if rel.startswith(".metadata/") or rel.endswith("__init__.py"):
                continue
            dest = os.path.join(prefix, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = dest + ".part"
            with z.open(info) as src, open(tmp, "wb") as out:
                while True:
                    chunk = src.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(tmp, mode or 0o644)
            os.replace(tmp, dest)
            count += 1
    return count


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    prefix = sys.argv[1]
    for wheel in sys.argv[2:]:
        n = unpack(wheel, prefix)
        print(f"  {os.path.basename(wheel)}: {n} files")


if __name__ == "__main__":
    main()
