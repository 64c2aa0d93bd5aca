"""The Lua scripts of the Redis backend: each write and its change event as one atomic step.

Every write made through zkv bumps the namespace's change counter (``{ns}:version``, the
``version`` of a :class:`~zkv.Change`, which also lets ``transact`` notice any concurrent zkv
write with one ``WATCH``) and, when someone watches the namespace, publishes its change event
on ``{ns}:w:<key>``: ``<version>|s<value>`` or ``<version>|d``. Whether anyone watches is
``PUBSUB NUMSUB {ns}:w``: every watcher subscribes to that marker channel, and Redis forgets a
subscriber whose connection ends, so nobody has to clean up after a watcher that died.

Published messages carry their channel's sequence number (``HINCRBY {ns}:seq``), given in the
same step as the ``PUBLISH``: ``<seq>|<pickle>``. A subscriber counts the numbers it missed.

Every script names the namespace's keys in ``KEYS`` (all in one hash slot, see
:mod:`~zkv.backends.redis_codec`), so each runs on a Redis Cluster too.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["SCRIPTS", "Script"]

# Shared by the write scripts: whether anyone watches, and one change event.
_EVENTS = """
local function watched(marker)
  return redis.call('PUBSUB', 'NUMSUB', marker)[2] > 0
end
-- The change event of data key NAME ({ns}:v:KEY) goes to {ns}:w:KEY (MARKER is {ns}:w).
local function event(marker, name, version, kind, value)
  redis.call('PUBLISH', marker .. ':' .. string.sub(name, #marker + 2),
             string.format('%d', version) .. '|' .. kind .. (value or ''))
end
"""


class Script:
    """One Lua script: its text and SHA1 (for ``EVALSHA``)."""

    def __init__(self, name: str, body: str) -> None:
        self.name = name
        self.body = (_EVENTS + body) if "event(" in body or "watched(" in body else body
        self.sha = hashlib.sha1(self.body.encode()).hexdigest()

    def eval_args(self, keys: list[Any], args: list[Any]) -> list[Any]:
        """The arguments of an ``EVAL`` of this script (for a MULTI block, where an unknown
        SHA would fail at EXEC)."""
        return ["EVAL", self.body, len(keys), *keys, *args]

    def __repr__(self) -> str:
        return f"<zkv Lua script {self.name}>"


# KEYS: data key, version. ARGV: value, px ('' for none), marker. -> version
SET = Script("set", """
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
local v = redis.call('INCR', KEYS[2])
if watched(ARGV[3]) then event(ARGV[3], KEYS[1], v, 's', ARGV[1]) end
return v
""")

# KEYS: data key, version. ARGV: marker. -> 1 if it existed
DELETE = Script("delete", """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
local v = redis.call('INCR', KEYS[2])
if watched(ARGV[1]) then event(ARGV[1], KEYS[1], v, 'd') end
return 1
""")

# KEYS: data key, version. ARGV: marker. -> the value, or nil
POP = Script("pop", """
local old = redis.call('GET', KEYS[1])
if not old then return false end
redis.call('DEL', KEYS[1])
local v = redis.call('INCR', KEYS[2])
if watched(ARGV[1]) then event(ARGV[1], KEYS[1], v, 'd') end
return old
""")

# KEYS: data key, version. ARGV: value, marker. -> the value (the old one if any)
SETDEFAULT = Script("setdefault", """
local old = redis.call('GET', KEYS[1])
if old then return old end
redis.call('SET', KEYS[1], ARGV[1])
local v = redis.call('INCR', KEYS[2])
if watched(ARGV[2]) then event(ARGV[2], KEYS[1], v, 's', ARGV[1]) end
return ARGV[1]
""")

# Compare the stored bytes and set (keeping the key's expiry). KEYS: data key, version.
# ARGV: 'm' (expect no key) or 'v' (expect ARGV[2]), expected, new value, marker.
# -> {1} when set; {0, current} or {0} (no key) when not
CAS = Script("compare_and_set", """
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == 'm' then
  if cur then return {0, cur} end
  redis.call('SET', KEYS[1], ARGV[3])
else
  if cur ~= ARGV[2] then
    if cur then return {0, cur} end
    return {0}
  end
  redis.call('SET', KEYS[1], ARGV[3], 'KEEPTTL')
end
local v = redis.call('INCR', KEYS[2])
if watched(ARGV[4]) then event(ARGV[4], KEYS[1], v, 's', ARGV[3]) end
return {1}
""")

# Native INCRBY (keeps the expiry). KEYS: data key, version. ARGV: amount, marker.
# -> {1, the new value's digits} (read back: Lua numbers lose digits past 2^53), or
# {0, reason} when INCRBY refuses (not an integer, overflow)
INCR = Script("incr", """
local ok, n = pcall(redis.call, 'INCRBY', KEYS[1], ARGV[1])
if not ok then return {0, n['err'] or tostring(n)} end
local digits = redis.call('GET', KEYS[1])
local v = redis.call('INCR', KEYS[2])
if watched(ARGV[2]) then event(ARGV[2], KEYS[1], v, 's', digits) end
return {1, digits}
""")

# The change events of writes already made in this MULTI block, and the counter.
# KEYS: version. ARGV: marker, then either 'P', a count n, the data keys' lengths (n u32,
# little-endian) and the keys one after the other: keys just set, whose values are read back
# here; or 'T', then (kind, data key, value) per change: 's' and the value set, or 'd' and
# ''. -> the version of the last change
NOTIFY = Script("notify", """
if ARGV[2] == 'P' then
  local n = tonumber(ARGV[3])
  local v = redis.call('INCRBY', KEYS[1], n)
  if n == 0 or not watched(ARGV[1]) then return v end
  local at, from = 1, 1
  for i = 1, n do
    local length
    length, at = struct.unpack('<I4', ARGV[4], at)
    local name = string.sub(ARGV[5], from, from + length - 1)
    from = from + length
    event(ARGV[1], name, v - n + i, 's', redis.call('GET', name) or '')
  end
  return v
end
local count = (#ARGV - 2) / 3
local v = redis.call('INCRBY', KEYS[1], count)
if count == 0 or not watched(ARGV[1]) then return v end
local first = v - count
for i = 0, count - 1 do
  local at = 3 + 3 * i
  event(ARGV[1], ARGV[at + 1], first + i + 1, ARGV[at], ARGV[at + 2])
end
return v
""")

# KEYS: version. ARGV: pattern. -> the number of keys matching
COUNT = Script("count", """
return #redis.call('KEYS', ARGV[1])
""")

# KEYS: version. ARGV: pattern. -> {name, value, name, value, ...}, read atomically
GET_ALL = Script("get_all", """
local names = redis.call('KEYS', ARGV[1])
local out = {}
for i = 1, #names, 1000 do
  local chunk = {}
  for j = i, math.min(i + 999, #names) do chunk[#chunk + 1] = names[j] end
  local values = redis.call('MGET', unpack(chunk))
  for j = 1, #chunk do
    if values[j] then
      out[#out + 1] = chunk[j]
      out[#out + 1] = values[j]
    end
  end
end
return out
""")

# KEYS: version. ARGV: pattern, marker. -> how many keys were removed
DELETE_MATCHING = Script("delete_matching", """
local names = redis.call('KEYS', ARGV[1])
if #names == 0 then return 0 end
for i = 1, #names, 1000 do
  redis.call('DEL', unpack(names, i, math.min(i + 999, #names)))
end
local v = redis.call('INCRBY', KEYS[1], #names)
if watched(ARGV[2]) then
  for i = 1, #names do event(ARGV[2], names[i], v - #names + i, 'd') end
end
return #names
""")

# The first page of a scan: the matching keys are listed now, the rest kept in a list that
# later pages take from. KEYS: scan counter. ARGV: pattern, scan key prefix, page size,
# milliseconds a scan is kept. -> {cursor (0: done), names...}
SCAN_START = Script("scan_start", """
local names = redis.call('KEYS', ARGV[1])
local count = tonumber(ARGV[3])
if #names <= count then
  table.insert(names, 1, 0)
  return names
end
local id = redis.call('INCR', KEYS[1])
local list = ARGV[2] .. id
for i = count + 1, #names, 1000 do
  redis.call('RPUSH', list, unpack(names, i, math.min(i + 999, #names)))
end
redis.call('PEXPIRE', list, ARGV[4])
local page = {id}
for i = 1, count do page[#page + 1] = names[i] end
return page
""")

# A later page: the next listed keys that still exist. KEYS: the scan's list.
# ARGV: cursor, page size, milliseconds a scan is kept. -> {cursor (0: done), names...}
SCAN_PAGE = Script("scan_page", """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('unknown scan cursor')
end
local count = tonumber(ARGV[2])
local page = {tonumber(ARGV[1])}
while #page <= count do
  local name = redis.call('LPOP', KEYS[1])
  if not name then break end
  if redis.call('EXISTS', name) == 1 then page[#page + 1] = name end
end
if redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  page[1] = 0
else
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return page
""")

# KEYS: sequence numbers (a hash). ARGV: channel name, Redis channel, data. -> its number
PUBLISH = Script("publish", """
local seq = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PUBLISH', ARGV[2], string.format('%d', seq) .. '|' .. ARGV[3])
return seq
""")

# Where a subscription starts, published on its own probe channel (so that it arrives in
# order with the messages) and returned. KEYS: sequence numbers, version, epoch.
# ARGV: probe channel, an epoch to set if there is none, count of exact channel names, the
# names, then prefixes. -> "epoch\\nversion\\n" + ("len:name" + seq + ",") per channel
WELCOME = Script("welcome", """
redis.call('SET', KEYS[3], ARGV[2], 'NX')
local parts = {redis.call('GET', KEYS[3]), '\\n', redis.call('GET', KEYS[2]) or '0', '\\n'}
local function add(name, seq)
  parts[#parts + 1] = #name .. ':' .. name .. seq .. ','
end
local exact = tonumber(ARGV[3])
for i = 4, 3 + exact do
  local seq = redis.call('HGET', KEYS[1], ARGV[i])
  if seq then add(ARGV[i], seq) end
end
if #ARGV > 3 + exact then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    for j = 4 + exact, #ARGV do
      if string.sub(all[i], 1, #ARGV[j]) == ARGV[j] then
        add(all[i], all[i + 1])
        break
      end
    end
  end
end
local payload = table.concat(parts)
redis.call('PUBLISH', ARGV[1], payload)
return payload
""")

# Locks: a key holding the holder's token, with a lease (milliseconds).
# KEYS: lock. ARGV: token, lease. -> -1 when taken, else the holder's remaining lease
LOCK = Script("lock", """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -1 end
return redis.call('PTTL', KEYS[1])
""")

# KEYS: lock. ARGV: token, lease. -> 1 if still held by the token (renewed), else 0
RENEW = Script("renew", """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""")

# KEYS: lock. ARGV: token, release channel. -> 1 if the token held it (now released)
UNLOCK = Script("unlock", """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '1')
  return 1
end
return 0
""")

#: Every script, by name.
SCRIPTS: dict[str, Script] = {s.name: s for s in (
    SET, DELETE, POP, SETDEFAULT, CAS, INCR, NOTIFY, COUNT, GET_ALL, DELETE_MATCHING,
    SCAN_START, SCAN_PAGE, PUBLISH, WELCOME, LOCK, RENEW, UNLOCK)}
