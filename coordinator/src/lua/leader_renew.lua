-- Extends the coordinator's leader lock, but only for its holder: a leader
-- that stalled past the TTL must not extend a lock another replica now holds.
--
-- KEYS[1] leader lock, ARGV[1] instance id, ARGV[2] ttl (ms)
-- Returns 1 when the lock is still ours (and extended), 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
