# Answers two requests, then complains on stderr and exits with status 3.
import sys

for count, _ in enumerate(sys.stdin, start=1):
    print('{"reward": 0.5}', flush=True)
    if count == 2:
        print("giving up after two rows", file=sys.stderr, flush=True)
        sys.exit(3)
