-- sse-gateway Redis log, layout version 1 (see migrations/redis/v1.md).
--
-- One script, dispatched on ARGV[1], so one SHA is loaded at start and every
-- operation on a log is one atomic call. KEYS[1] is the log's stream,
-- "<tag>:log"; every other key of the log is derived from its prefix, so all
-- of them share one hash tag and live in one Cluster slot.
--
--   init      ARGV: candidate_epoch             -> {version, epoch}
--   append    ARGV: epoch, max_events, max_age_ms, window_ms, m,
--                   m times: (k, (name, topics, data, key, digest)*k),
--                   [commit_seq]                (a `commit` first, if given and not 0)
--                                               -> one answer per event (below)
--   read      ARGV: after, upto, limit, n, topic*n
--                                               -> {through, {watermark*n}, entry...}
--   snapshot  ARGV: -                           -> {epoch, head, last_id, replicated|false,
--                                                   {topic, count, first, last, wm}...}
--   trim      ARGV: epoch, max_age_ms, limit    -> entries removed
--   probe     ARGV: epoch, node, keep, ttl_ms   -> the probe entry's id
--   confirm   ARGV: epoch                       -> head (after one write, for WAIT)
--   commit    ARGV: epoch, seq                  -> the replicated watermark
--
-- An append holds m appends (publishes), each of k events, each with an
-- idempotency key ('' = none) and the hex digest of its request. Each append
-- is all or nothing: its keys are checked first, against "{tag}:i:<key>"
-- ("<seq> <digest>", TTL window_ms) and the keys earlier events of this call
-- stored; a key stored with another digest refuses that append (every one
-- of its events answers "c<index of the event at fault>") and stores
-- nothing of it. Otherwise each event answers "<seq>" (stored now, its key
-- SET with the event) or "r<seq>" (its key was stored with the same digest:
-- nothing stored). The check and the store are in this one atomic call, so
-- of two gateways sending one key, exactly one stores.
--
-- Every operation that adds stream entries (append, trim, probe, commit)
-- ends with PUBLISH sse-gateway:appended <stream key>: the gateways'
-- tails read only when told (or every few seconds), instead of each log
-- blocking a connection of its own on every node. Pub/sub may lose a message; the tails catch up
-- after every resubscription and poll, and the probe shows a silent tail.
--
-- Numbers cross the boundary as decimal strings: Lua numbers are doubles,
-- exact up to 2^53, and are formatted with %.0f (tostring would give 1e+15).

local VERSION = 1
local log = KEYS[1]
local p = string.sub(log, 1, #log - 3)
local K_version = p .. 'version'
local K_epoch = p .. 'epoch'
local K_head = p .. 'head'
local K_w = p .. 'w'
local K_rc = p .. 'rc'
local K_topics = p .. 'topics'
local K_r = p .. 'r'
local cmd = ARGV[1]

local function s(n) return string.format('%.0f', n) end
local function notify() redis.call('PUBLISH', 'sse-gateway:appended', log) end
local function tkey(topic) return p .. 't:' .. topic end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function check_epoch(epoch)
  local current = redis.call('GET', K_epoch)
  if current ~= epoch then
    return redis.error_reply('SSEEPOCH the log in Redis is not the one this gateway opened (epoch '
      .. epoch .. ', Redis has ' .. tostring(current) .. '): Redis lost or replaced its data')
  end
  return nil
end

-- Raises a topic's trimmed watermark to seq (a decimal string) if higher.
local function raise_w(topic, seq)
  local cur = tonumber(redis.call('HGET', K_w, topic) or '0')
  if tonumber(seq) > cur then redis.call('HSET', K_w, topic, seq) end
end

local function fields_of(flat)
  local f = {}
  for j = 1, #flat, 2 do f[flat[j]] = flat[j + 1] end
  return f
end

-- Removes up to `limit` entries older than `cutoff` ms from the front of the
-- log, with their index entries; marks touched topics in `touched`.
local function age_trim(cutoff, limit, touched)
  local removed = 0
  local entries = redis.call('XRANGE', log, '-', '+', 'COUNT', limit)
  for _, e in ipairs(entries) do
    local id, f = e[1], fields_of(e[2])
    if tonumber(f.ms or '0') >= cutoff then break end
    local seq = string.match(id, '^(%d+)-0$')
    if seq and f.t then
      for t in string.gmatch(f.t, '%S+') do
        redis.call('ZREM', tkey(t), seq)
        raise_w(t, seq)
        touched[t] = true
      end
      redis.call('HDEL', K_rc, seq)
    end
    redis.call('XDEL', log, id)
    removed = removed + 1
  end
  return removed
end

-- "topic count first watermark" per touched topic, comma separated: the
-- absolute state every node's tailer copies into its local stats.
local function trim_state(touched)
  local parts = {}
  for t, _ in pairs(touched) do
    local tk = tkey(t)
    local first = redis.call('ZRANGE', tk, 0, 0)[1] or '0'
    parts[#parts + 1] = t .. ' ' .. redis.call('ZCARD', tk) .. ' ' .. first .. ' '
      .. (redis.call('HGET', K_w, t) or '0')
  end
  return table.concat(parts, ',')
end

-- A commit marker: WAIT saw the replicas hold every entry up to seq.
-- Raises the replicated watermark "{tag}:r" seq and appends a marker entry
-- <head>-<n> with field `c` (the watermark) and `ms`, deleting the previous
-- marker (its id is "{tag}:r" id): the stream holds one. Tailers deliver an
-- event only once a marker covering it has arrived. A seq at or below the
-- watermark changes nothing (a later marker covers it).
local function commit(seq)
  local cur = tonumber(redis.call('HGET', K_r, 'seq') or '0')
  if seq <= cur then return s(cur) end
  local id = redis.call('XADD', log, (redis.call('GET', K_head) or '0') .. '-*', 'ms', s(now_ms()),
    'c', s(seq))
  local old = redis.call('HGET', K_r, 'id')
  if old then redis.call('XDEL', log, old) end
  redis.call('HSET', K_r, 'seq', s(seq), 'id', id)
  return s(seq)
end

if cmd == 'init' then
  local version = redis.call('GET', K_version)
  if not version then
    if redis.call('EXISTS', K_epoch, K_head, log, K_w, K_rc, K_topics) > 0 then
      return redis.error_reply('SSECORRUPT keys of log ' .. log .. ' exist without a version key; refusing to guess')
    end
    redis.call('SET', K_version, VERSION)
    redis.call('SET', K_epoch, ARGV[2])
    redis.call('SET', K_head, 0)
    version = tostring(VERSION)
  end
  return {version, redis.call('GET', K_epoch) or false}

elseif cmd == 'append' then
  local bad = check_epoch(ARGV[2])
  if bad then return bad end
  local max_events = tonumber(ARGV[3])
  local max_age = tonumber(ARGV[4])
  local window = ARGV[5]
  local m = tonumber(ARGV[6])
  -- After the appends, optionally: the previous append's commit marker
  -- (its WAIT succeeded), written here to save a call and an fsync.
  local q = 7
  for _ = 1, m do q = q + 1 + 5 * tonumber(ARGV[q]) end
  if ARGV[q] and ARGV[q] ~= '0' then commit(tonumber(ARGV[q])) end
  local now = now_ms()
  local touched = {}
  age_trim(now - max_age, 64, touched)

  local function store(name, topics, data)
    local seq = s(redis.call('INCR', K_head))
    local count = 0
    for t in string.gmatch(topics, '%S+') do
      local tk = tkey(t)
      redis.call('ZADD', tk, seq, seq)
      redis.call('SADD', K_topics, t)
      count = count + 1
      local card = redis.call('ZCARD', tk)
      if card > max_events then
        local popped = redis.call('ZPOPMIN', tk, math.min(card - max_events, 1000))
        for j = 1, #popped, 2 do
          local old = popped[j]
          raise_w(t, old)
          if redis.call('HINCRBY', K_rc, old, -1) <= 0 then
            redis.call('HDEL', K_rc, old)
            redis.call('XDEL', log, old .. '-0')
          end
        end
        touched[t] = true
      end
    end
    redis.call('HSET', K_rc, seq, count)
    redis.call('XADD', log, seq .. '-0', 'n', name, 'ms', s(now), 't', topics, 'd', data,
      'x', trim_state(touched))
    touched = {}
    return seq
  end

  local out = {}
  local pos = 7
  for _ = 1, m do
    local k = tonumber(ARGV[pos])
    pos = pos + 1
    -- Check every key of this append before storing any of it.
    local plan, own, conflict = {}, {}, nil
    for i = 0, k - 1 do
      local key, digest = ARGV[pos + 5 * i + 3], ARGV[pos + 5 * i + 4]
      plan[i] = false
      if key ~= '' then
        if own[key] then
          if own[key] ~= digest then conflict = i break end
          plan[i] = 'own'
        else
          local v = redis.call('GET', p .. 'i:' .. key)
          if v then
            local sp = string.find(v, ' ', 1, true) or 0
            if string.sub(v, sp + 1) ~= digest then conflict = i break end
            plan[i] = string.sub(v, 1, sp - 1)
          else
            own[key] = digest
          end
        end
      end
    end
    if conflict then
      for _ = 1, k do out[#out + 1] = 'c' .. conflict end
    else
      local seqs = {}
      for i = 0, k - 1 do
        local b = pos + 5 * i
        local key = ARGV[b + 3]
        if plan[i] == 'own' then
          out[#out + 1] = 'r' .. seqs[key]
        elseif plan[i] then
          out[#out + 1] = 'r' .. plan[i]
        else
          local seq = store(ARGV[b], ARGV[b + 1], ARGV[b + 2])
          if key ~= '' then
            redis.call('SET', p .. 'i:' .. key, seq .. ' ' .. ARGV[b + 4], 'PX', window)
            seqs[key] = seq
          end
          out[#out + 1] = seq
        end
      end
    end
    pos = pos + 5 * k
  end
  notify()
  return out

elseif cmd == 'read' then
  local after, upto, limit, n = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
  local seen, seqs = {}, {}
  for i = 1, n do
    local members = redis.call('ZRANGEBYSCORE', tkey(ARGV[5 + i]), '(' .. after, upto, 'LIMIT', 0, limit)
    for _, m in ipairs(members) do
      if not seen[m] then
        seen[m] = true
        seqs[#seqs + 1] = tonumber(m)
      end
    end
  end
  table.sort(seqs)
  local through = upto
  if #seqs >= limit then through = s(seqs[limit]) end
  -- Watermarks after the index reads: anything trimmed before them shows here.
  local wms = {}
  for i = 1, n do wms[i] = redis.call('HGET', K_w, ARGV[5 + i]) or '0' end
  local out = {through, wms}
  for i = 1, math.min(#seqs, limit) do
    local id = s(seqs[i]) .. '-0'
    local e = redis.call('XRANGE', log, id, id)
    if e[1] then out[#out + 1] = e[1] end
  end
  return out

elseif cmd == 'snapshot' then
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
  local out = {redis.call('GET', K_epoch) or false, redis.call('GET', K_head) or '0',
    last and last[1] or '0-0', redis.call('HGET', K_r, 'seq') or false}
  for _, t in ipairs(redis.call('SMEMBERS', K_topics)) do
    local tk = tkey(t)
    out[#out + 1] = {t, redis.call('ZCARD', tk), redis.call('ZRANGE', tk, 0, 0)[1] or '0',
      redis.call('ZRANGE', tk, -1, -1)[1] or '0', redis.call('HGET', K_w, t) or '0'}
  end
  return out

elseif cmd == 'trim' then
  local bad = check_epoch(ARGV[2])
  if bad then return bad end
  local now = now_ms()
  local touched = {}
  local removed = age_trim(now - tonumber(ARGV[3]), tonumber(ARGV[4]), touched)
  if next(touched) ~= nil then
    -- A marker entry <head>-<n>: carries the new state to every tailer
    -- without using a sequence number.
    redis.call('XADD', log, (redis.call('GET', K_head) or '0') .. '-*', 'ms', s(now),
      'x', trim_state(touched))
    notify()
  end
  return removed

elseif cmd == 'probe' then
  -- A delivery probe: a marker entry <head>-<n> with fields `ms` and `p`
  -- (the node's probe id), so it takes no sequence and no topic; only the
  -- node that wrote it looks at it, when its own tail brings it back. The
  -- node's last `keep` probe ids are listed in "{tag}:p:<node>" (TTL
  -- ttl_ms, so a gone node's list expires) and older probes are deleted:
  -- the stream holds at most `keep` probes per live node.
  local bad = check_epoch(ARGV[2])
  if bad then return bad end
  local node, keep = ARGV[3], tonumber(ARGV[4])
  local id = redis.call('XADD', log, (redis.call('GET', K_head) or '0') .. '-*', 'ms', s(now_ms()),
    'p', node)
  local lk = p .. 'p:' .. node
  redis.call('LPUSH', lk, id)
  for _, old in ipairs(redis.call('LRANGE', lk, keep, -1)) do redis.call('XDEL', log, old) end
  redis.call('LTRIM', lk, 0, keep - 1)
  redis.call('PEXPIRE', lk, ARGV[5])
  notify()
  return id

elseif cmd == 'confirm' then
  -- One write (a counter in "{tag}:r") so that a WAIT on the same
  -- connection right after covers every entry up to the head it answers:
  -- replication is one ordered stream, so a replica that acknowledged this
  -- write holds everything written before it. The caller then sends
  -- `commit` with that head.
  local bad = check_epoch(ARGV[2])
  if bad then return bad end
  redis.call('HINCRBY', K_r, 'confirms', 1)
  return redis.call('GET', K_head) or '0'

elseif cmd == 'commit' then
  -- The marker alone (see commit above), when no append follows soon.
  local bad = check_epoch(ARGV[2])
  if bad then return bad end
  local through = commit(tonumber(ARGV[3]))
  notify()
  return through
end

return redis.error_reply('SSEUNKNOWN unknown command ' .. tostring(cmd))
