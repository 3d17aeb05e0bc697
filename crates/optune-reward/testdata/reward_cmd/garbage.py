# Answers a line that is not JSON.
import sys

for _ in sys.stdin:
    print("the reward is high", flush=True)
