-- One local subscription of a node left a channel.
-- KEYS[1] occupancy hash (node_id -> local subscription count)
-- ARGV[1] node id
-- Returns the number of nodes still holding subscribers on the channel, so
-- the caller can drop the channel from the app's index when it reaches 0.
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return redis.call('HLEN', KEYS[1])
