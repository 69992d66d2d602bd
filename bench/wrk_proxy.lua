-- wrk through an HTTP proxy: wrk connects to the URL it is given (the proxy, or the upstream
-- for the direct row) and this script sends every request in absolute form (or origin form for
-- the direct row) with the Host header of the real destination.
--   wrk ... -s bench/wrk_proxy.lua http://127.0.0.1:PROXY -- METHOD TARGET HOST [BODY]
-- A "{n}" in TARGET is replaced by a counter: a distinct path per request (keyless-varied).
local req
local varied = false
local counter = 0
local method, path, body

function init(args)
  wrk.method = args[1]
  wrk.path = args[2]
  wrk.headers["Host"] = args[3]
  wrk.headers["User-Agent"] = "keyless-bench"
  if args[4] ~= nil and args[4] ~= "" then
    wrk.body = args[4]
  end
  req = wrk.format()
  varied = string.find(args[2], "{n}", 1, true) ~= nil
  method, path, body = args[1], args[2], wrk.body
end

function request()
  if varied then
    counter = counter + 1
    return wrk.format(method, (string.gsub(path, "{n}", tostring(counter))), nil, body)
  end
  return req
end

-- One JSON line for the harness; latency is in microseconds in wrk.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"seconds":%.3f,"errors":%d,"non2xx":%d,"p50_ms":%.3f,"p99_ms":%.3f}\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
