-- Gives up the coordinator's leader lock on shutdown, only if we hold it,
-- so that the other replica can take over at once instead of after the TTL.
--
-- KEYS[1] leader lock, ARGV[1] instance id
-- Returns 1 when the lock was ours and is now released, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
