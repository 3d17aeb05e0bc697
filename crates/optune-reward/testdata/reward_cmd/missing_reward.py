# Answers JSON without a "reward" field.
import sys

for _ in sys.stdin:
    print('{"score": 1.0}', flush=True)
