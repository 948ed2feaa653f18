-- scripts/bench-wrk.sh: unique EventBridge events; each connection waits `delay_ms` (first
-- script argument) between requests; ids "wrk-<run>-<thread>-<n>" (run: second argument).
local counter = 0
local thread_id = 0
function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
end
function init(args)
  delay_ms = tonumber(args[1] or "0")
  run = args[2] or "x"
end
function delay() return delay_ms end
request = function()
  counter = counter + 1
  local id = string.format("wrk-%s-%d-%d", run, tid, counter)
  local body = '{"version":"0","id":"' .. id .. '","detail-type":"OrderPlaced","source":"com.example.orders","account":"111122223333","time":"2026-11-22T09:15:02Z","region":"eu-west-1","resources":[],"detail":{"order_id":"O-' .. id .. '","customer_id":"C-42","amount":129.5,"currency":"EUR"}}'
  return wrk.format("POST", "/api/v1/webhooks/aws/eventbridge", {["content-type"]="application/json"}, body)
end
