-- Writes a node's subscription count on one channel back (after a Redis
-- restart or after the node was reaped during a stall), keeping the total
-- in step. Idempotent: restoring the count Redis already has changes nothing.
--
-- KEYS[1] occupancy hash, KEYS[2] total, KEYS[3] optional webhook stream
-- ARGV[1] node id; ARGV[2..5] as in occupancy_join.lua; ARGV[6] the count
--
-- Returns 1 when the channel became occupied by this, else 0. A reaped node
-- coming back therefore reports occupied after the sweep's vacated; the
-- webhook grace period (docs/webhooks.md) drops such a pair when it is short.
local mine = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local want = tonumber(ARGV[6])
if mine == want then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], want)
local before = tonumber(redis.call('GET', KEYS[2]) or '0')
local total = redis.call('INCRBY', KEYS[2], want - mine)
if before <= 0 and total > 0 then
  if KEYS[3] and ARGV[2] == '1' then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
      'app', ARGV[3], 'channel', ARGV[4], 'name', 'channel_occupied')
  end
  return 1
end
return 0
