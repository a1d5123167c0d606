-- wrk script: POST a small non-streaming chat completion on every request,
-- over keep-alive connections, and write a one-line JSON summary to the file
-- named by $WRK_JSON when the run ends.
--
-- Environment:
--   BENCH_KEY   credential sent as the `api-key` header (required)
--   BENCH_BODY  request body (default: a small chat completion)
--   WRK_JSON    output file for the summary (default: stdout)

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
  or '{"messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["api-key"] = os.getenv("BENCH_KEY") or ""

-- wrk counts every answer with a status of 400 or more in errors.status; the
-- driver rejects a run where it is not zero, so a run full of 401s or 429s is
-- never mistaken for a fast one.
function done(summary, latency, requests)
  local path = os.getenv("WRK_JSON")
  local f = io.stdout
  if path and path ~= "" then
    f = assert(io.open(path, "w"))
  end
  local e = summary.errors
  f:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,'
      .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
      .. '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"p50":%d,"p90":%d,"p99":%d,"p99.9":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
  if f ~= io.stdout then
    f:close()
  end
end
