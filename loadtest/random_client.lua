-- wrk script: every request comes from a different client address, sent as
-- X-Forwarded-For (the gateway trusts 127.0.0.1 as a proxy in this run), so
-- each one is a new rate-limit subject.
local seed = os.time() + tonumber(tostring({}):sub(8), 16)
math.randomseed(seed)

request = function()
  local ip = string.format("10.%d.%d.%d", math.random(0, 255), math.random(0, 255), math.random(1, 254))
  return wrk.format(nil, nil, { ["X-Forwarded-For"] = ip })
end
