-- One local subscription of a node joined a channel, and whether that made
-- the channel occupied cluster-wide.
--
-- KEYS[1] occupancy hash (node_id -> local subscription count)
-- KEYS[2] the channel's cluster-wide subscription total (a string counter)
-- KEYS[3] optional: the webhook stream, when the job goes out in this script
-- ARGV[1] node id
-- ARGV[2] webhook job fields as "1" (wanted) or "0"; ARGV[3] app, ARGV[4] channel,
-- ARGV[5] stream MAXLEN (approximate)
--
-- Returns 1 when the total went from 0 to 1 (the `channel_occupied` edge), else 0.
-- The edge is decided here, atomically, so two nodes never both see it.
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local total = redis.call('INCR', KEYS[2])
if total ~= 1 then
  return 0
end
if KEYS[3] and ARGV[2] == '1' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*',
    'app', ARGV[3], 'channel', ARGV[4], 'name', 'channel_occupied')
end
return 1
