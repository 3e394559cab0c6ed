-- One local subscription of a node left a channel, and whether that made
-- the channel vacated cluster-wide.
--
-- KEYS[1] occupancy hash (node_id -> local subscription count)
-- KEYS[2] the channel's cluster-wide subscription total
-- KEYS[3] optional: the webhook stream (as in occupancy_join.lua)
-- ARGV[1] node id; ARGV[2..5] as in occupancy_join.lua
--
-- Returns {nodes, edge}: how many nodes still hold subscribers (the caller
-- drops the channel from the app's index at 0) and 1 when the total reached
-- 0 (the `channel_vacated` edge). A leave this node never counted (its
-- count was reaped meanwhile) changes nothing, so no edge is reported twice.
local mine = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if mine <= 0 then
  return { redis.call('HLEN', KEYS[1]), 0 }
end
if mine == 1 then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
end
local total = redis.call('DECR', KEYS[2])
local edge = 0
if total <= 0 then
  redis.call('DEL', KEYS[2])
  edge = 1
  if KEYS[3] and ARGV[2] == '1' then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
      'app', ARGV[3], 'channel', ARGV[4], 'name', 'channel_vacated')
  end
end
return { redis.call('HLEN', KEYS[1]), edge }
