-- Forgets a dead node's subscriber count on one channel.
--
-- KEYS[1] occupancy hash node_id -> local subscription count
-- ARGV[1] node id
-- Returns how many nodes still have subscribers on the channel, so that the
-- caller can drop the channel from its app's channel index when none do.
redis.call('HDEL', KEYS[1], ARGV[1])
return redis.call('HLEN', KEYS[1])
