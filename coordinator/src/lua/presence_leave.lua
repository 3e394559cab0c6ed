-- Removes one connection from a presence channel and says whether it was
-- the user's last, so that member_removed is announced exactly once.
--
-- KEYS[1] users, KEYS[2] sockets, KEYS[3] counts, KEYS[4] expiry (as in presence_join.lua)
-- KEYS[5] optional: the webhook stream, when a member_removed job goes out here
-- ARGV[1] socket_id
-- ARGV[2] cutoff (ms) or '': remove the connection only if its expiry is at
--         or before it. The sweep passes it so that a connection its node
--         refreshed after the sweep looked is left alone.
-- ARGV[3..6] the webhook job's: wanted ('1' or '0'), app, channel, stream
--         MAXLEN (approximate)
--
-- Returns {remaining} or, when the user left with this connection,
-- {remaining, user_id, member_json}; remaining counts the channel's
-- connections afterwards, so the caller can drop an empty channel from the index.
local users, sockets, counts, expiry = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local socket = ARGV[1]

if ARGV[2] and ARGV[2] ~= '' then
  local score = redis.call('ZSCORE', expiry, socket)
  if score and tonumber(score) > tonumber(ARGV[2]) then
    return { redis.call('HLEN', sockets) }
  end
end

redis.call('ZREM', expiry, socket)
local user = redis.call('HGET', sockets, socket)
if not user then
  return { redis.call('HLEN', sockets) }
end
redis.call('HDEL', sockets, socket)
local remaining = redis.call('HLEN', sockets)

if redis.call('HINCRBY', counts, user, -1) > 0 then
  return { remaining }
end
local member = redis.call('HGET', users, user) or 'null'
redis.call('HDEL', counts, user)
redis.call('HDEL', users, user)
if KEYS[5] and ARGV[3] == '1' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*',
    'app', ARGV[4], 'channel', ARGV[5], 'name', 'member_removed', 'user_id', user)
end
return { remaining, user, member }
