# Appends each request line, as received, to the file after --log, and answers
# reward = number of characters in the response.
import json
import sys

log_path = sys.argv[sys.argv.index("--log") + 1]
with open(log_path, "a", encoding="utf-8") as log:
    for line in sys.stdin:
        log.write(line)
        log.flush()
        request = json.loads(line)
        print(json.dumps({"reward": len(request["response"])}), flush=True)
