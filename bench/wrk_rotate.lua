-- wrk script for the HTTP benchmarks (configured by environment variables):
--   BENCH_METHOD   GET (default) or POST
--   BENCH_COOKIES  a file with one cookie value per line, rotated over requests (none: no Cookie header)
--   BENCH_BODY     "ask": a JSON ask body with a fresh random session id per request
-- At the end it prints one line `BENCH_JSON {...}` with the counts and latency percentiles (us).
local method = os.getenv("BENCH_METHOD") or "GET"
local body_kind = os.getenv("BENCH_BODY") or ""
local cookie_name = os.getenv("BENCH_COOKIE_NAME") or "session"
local cookies = {}
local n = 0

function init(args)
    local path = os.getenv("BENCH_COOKIES")
    if path and path ~= "" then
        for line in io.lines(path) do
            cookies[#cookies + 1] = line
        end
    end
    math.randomseed(os.time() + tonumber(os.getenv("BENCH_SEED") or "0"))
end

local function uuid4()
    local r = math.random
    return string.format("%04x%04x-%04x-4%03x-8%03x-%04x%04x%04x",
        r(0, 65535), r(0, 65535), r(0, 65535), r(0, 4095), r(0, 4095), r(0, 65535), r(0, 65535), r(0, 65535))
end

function request()
    n = n + 1
    local headers = {}
    if #cookies > 0 then
        headers["Cookie"] = cookie_name .. "=" .. cookies[(n % #cookies) + 1]
    end
    local body = nil
    if body_kind == "ask" then
        headers["Content-Type"] = "application/json"
        body = '{"session_id":"' .. uuid4() .. '","message":"hello from wrk"}'
    end
    return wrk.format(method, nil, headers, body)
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,' ..
        '"p50_us":%d,"p90_us":%d,"p99_us":%d}\n',
        summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
        latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
