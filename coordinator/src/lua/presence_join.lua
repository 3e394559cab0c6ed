-- Adds one connection to a presence channel, counting membership per user,
-- so that the caller can announce member_added exactly once per user.
--
-- KEYS[1] users    hash user_id -> JSON [user_id_json, user_info_or_null]
-- KEYS[2] sockets  hash socket_id -> user_id
-- KEYS[3] counts   hash user_id -> number of that user's connections
-- KEYS[4] expiry   zset socket_id -> expiry (ms since the epoch)
-- KEYS[5] optional: the webhook stream, when a member_added job goes out here
-- ARGV: socket_id, user_id, member_json, max_members, expiry_ms, no_list
--       ('1' or '0'), then the webhook job's: wanted ('1' or '0'), app,
--       channel, stream MAXLEN (approximate)
--
-- Returns {added, user_id_1, member_json_1, user_id_2, member_json_2, ...}
-- with added = 1 when this is the user's first connection, 0 otherwise,
-- or {-1} when the channel already holds max_members other users. The
-- member list makes a join O(members); with no_list = '1' (a restore, which
-- sends no subscription_succeeded) only {added} is returned.
local users, sockets, counts, expiry = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local socket, user, member = ARGV[1], ARGV[2], ARGV[3]
local max_members = tonumber(ARGV[4])

local function reply(added)
  local out = { added }
  if ARGV[6] == '1' then
    return out
  end
  local all = redis.call('HGETALL', users)
  for i = 1, #all do
    out[#out + 1] = all[i]
  end
  return out
end

local previous = redis.call('HGET', sockets, socket)
if previous == user then
  -- The same socket subscribing again: membership is unchanged, but the
  -- expiry is refreshed (this is also how a node restores its presence).
  redis.call('ZADD', expiry, ARGV[5], socket)
  return reply(0)
end

local known = redis.call('HEXISTS', counts, user) == 1
if not known then
  local present = redis.call('HLEN', users)
  if previous and tonumber(redis.call('HGET', counts, previous) or '0') <= 1 then
    present = present - 1
  end
  if present >= max_members then
    return { -1 }
  end
end

if previous then
  -- The socket was another user's: that membership ends here.
  if redis.call('HINCRBY', counts, previous, -1) <= 0 then
    redis.call('HDEL', counts, previous)
    redis.call('HDEL', users, previous)
  end
end

redis.call('HSET', sockets, socket, user)
redis.call('HINCRBY', counts, user, 1)
-- The newest authorisation carries the freshest user_info.
redis.call('HSET', users, user, member)
redis.call('ZADD', expiry, ARGV[5], socket)
if known then
  return reply(0)
end
-- Decided here with the membership, so a member_added webhook goes out once
-- per user however many nodes the user's connections are on.
if KEYS[5] and ARGV[7] == '1' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[10], '*',
    'app', ARGV[8], 'channel', ARGV[9], 'name', 'member_added', 'user_id', user)
end
return reply(1)
