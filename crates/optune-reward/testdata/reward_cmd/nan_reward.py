# Answers one good reward, then NaN (which Python's json.dumps writes although JSON has no NaN).
import json
import sys

for count, _ in enumerate(sys.stdin, start=1):
    print(json.dumps({"reward": 1.0 if count == 1 else float("nan")}), flush=True)
