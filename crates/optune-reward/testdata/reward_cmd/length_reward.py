# Answers reward = len(response) / 100 for each request line, in order.
import json
import sys

for line in sys.stdin:
    request = json.loads(line)
    print(json.dumps({"reward": len(request["response"]) / 100, "prompt_id": request["prompt_id"]}), flush=True)
