-- wrk script: POST a job to /tune (a cache hit after the first request): $JOB, else the CIFAR
-- example.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = io.open(os.getenv("JOB") or "examples/cifar10-mlp-adam.json", "r")
wrk.body = file:read("*a")
file:close()
