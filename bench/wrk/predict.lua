-- predict.lua - wrk script for `ember serve`: POSTs prebuilt request bodies
-- (bench/wrk/make_bodies.py) to /v1/predict.bin or /v1/predict, cycling through them,
-- and prints one JSON line (prefixed "WRKJSON ") with the run's counts and latency
-- percentiles when wrk is done.
--
--   wrk -t1 -c8 -d30s --latency -s bench/wrk/predict.lua http://127.0.0.1:PORT -- FILE MODE BYTES
--
-- FILE: the bodies; MODE: bin (FILE holds bodies of exactly BYTES bytes back to back)
-- or json (one body per line, BYTES ignored).
--
-- Pacing: wrk is closed-loop (each connection sends its next request when the last
-- one is answered). With WRK_RATE=R in the environment, each wrk thread instead
-- hands out send times R per second apart, on an absolute schedule, to whichever of
-- its connections is free, through wrk's delay() hook (whole milliseconds, so single
-- sends jitter by up to 1 ms but the rate does not drift). R is per wrk thread. A
-- request whose slot has passed goes at once, so an overloaded server shows up as an
-- achieved rate below R. wrk times each request from its first byte written to the
-- last byte of the answer read; the pacing wait is not part of the latency, and like
-- any closed-loop client it does not count the time a late answer delays the next
-- send (coordinated omission).

local reqs, n, i = {}, 0, 0

function init(args)
    local path, mode, size = args[1], args[2] or "bin", tonumber(args[3] or "0")
    assert(path, "usage: ... -- FILE bin|json BYTES")
    local f = assert(io.open(path, "rb"))
    local data = f:read("*a")
    f:close()
    local ep, ctype = "/v1/predict.bin", "application/octet-stream"
    if mode == "json" then
        ep, ctype = "/v1/predict", "application/json"
        for line in data:gmatch("[^\n]+") do
            reqs[#reqs + 1] = wrk.format("POST", ep, { ["Content-Type"] = ctype }, line)
        end
    else
        assert(size and size > 16 and #data % size == 0, "bin: FILE size is not a multiple of BYTES")
        for off = 1, #data, size do
            reqs[#reqs + 1] = wrk.format("POST", ep, { ["Content-Type"] = ctype }, data:sub(off, off + size - 1))
        end
    end
    n = #reqs
    assert(n > 0, "no request bodies in " .. path)
    -- threads start at different bodies
    math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)") or "0", 16) % 100000)
    i = math.random(n) - 1
end

function request()
    i = i % n + 1
    return reqs[i]
end

local rate = tonumber(os.getenv("WRK_RATE") or "")
if rate and rate > 0 then
    local ffi = require("ffi")
    ffi.cdef [[
        typedef struct { long tv_sec; long tv_nsec; } wrk_pace_ts;
        int clock_gettime(int clk, wrk_pace_ts *ts);
    ]]
    local ts = ffi.new("wrk_pace_ts")
    local function now_ms()
        ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
        return tonumber(ts.tv_sec) * 1e3 + tonumber(ts.tv_nsec) * 1e-6
    end
    local period, next_ms = 1e3 / rate, nil

    function delay()
        local t = now_ms()
        if not next_ms or next_ms < t - 1e3 then next_ms = t end -- start, or more than 1 s behind
        next_ms = next_ms + period
        local d = next_ms - t
        if d < 0 then return 0 end
        return math.floor(d + 0.5)
    end
end

function done(summary, latency, requests)
    local e = summary.errors
    local s = summary.duration / 1e6
    io.write(string.format(
        'WRKJSON {"duration_s":%.3f,"requests":%d,"requests_per_s":%.1f,"bytes":%d,'
            .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
            .. '"latency_us":{"mean":%.1f,"stdev":%.1f,"min":%d,"p50":%d,"p90":%d,"p99":%d,"p99_9":%d,"max":%d}}\n',
        s, summary.requests, summary.requests / s, summary.bytes,
        e.connect, e.read, e.write, e.status, e.timeout,
        latency.mean, latency.stdev, latency.min, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency:percentile(99.9), latency.max))
end
