# Answers reward = how many requests this process has read, to show it lives across batches.
import sys

for count, _ in enumerate(sys.stdin, start=1):
    print('{"reward": %d}' % count, flush=True)
