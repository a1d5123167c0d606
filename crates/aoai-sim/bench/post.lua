-- wrk script: small non-streaming chat completions against one aoai-sim instance.
-- wrk prints "Non-2xx or 3xx responses: N" itself when any answer was not a 200,
-- so a run that only measured errors is visible without a Lua response hook
-- (which would slow wrk down and skew the figure).
wrk.method = "POST"
wrk.path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
wrk.headers["api-key"] = "sim-key"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":16}'
