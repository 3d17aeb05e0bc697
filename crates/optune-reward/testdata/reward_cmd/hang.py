# Writes its process id to the file named by the first argument, says something
# on stderr, then never answers.
import os
import sys
import time

with open(sys.argv[1], "w") as pid_file:
    pid_file.write(str(os.getpid()))
print("pretending to load a model", file=sys.stderr, flush=True)
time.sleep(30)
