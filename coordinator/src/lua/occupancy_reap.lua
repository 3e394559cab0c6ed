-- Forgets a dead node's subscriber count on one channel.
--
-- KEYS[1] occupancy hash node_id -> local subscription count
-- KEYS[2] the channel's cluster-wide subscription total
-- KEYS[3] optional: the webhook stream (as in occupancy_join.lua)
-- ARGV[1] node id; ARGV[2..5] as in occupancy_join.lua
--
-- Returns {nodes, edge} as occupancy_leave.lua does: when the dead node
-- held the channel's last subscribers, this is where `channel_vacated` comes from.
local mine = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
redis.call('HDEL', KEYS[1], ARGV[1])
local edge = 0
if mine > 0 then
  local total = redis.call('DECRBY', KEYS[2], mine)
  if total <= 0 then
    redis.call('DEL', KEYS[2])
    edge = 1
    if KEYS[3] and ARGV[2] == '1' then
      redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
        'app', ARGV[3], 'channel', ARGV[4], 'name', 'channel_vacated')
    end
  end
end
return { redis.call('HLEN', KEYS[1]), edge }
