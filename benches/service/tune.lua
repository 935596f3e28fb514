-- wrk script: POST the CIFAR example to /tune (a cache hit after the first request).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = io.open("examples/cifar10-mlp-adam.json", "r")
wrk.body = file:read("*a")
file:close()
