//! The Lua scripts the broker runs: each is atomic, so a stream's keys
//! change together and its channel carries events in seq order.

/// The Lua helpers: drop a log entry's compacted text when nothing needs
/// it any more, trim a stream's log by count and by age (one read when the
/// oldest entry is young enough, else up to 64 entries dropped per call),
/// Redis's clock in ms, the stream's epoch (created on first use), and the
/// frame of a compacted text entry cut to a seq range.
///
/// A compacted text entry (consecutive `agent_text_delta`s of one run's part)
/// is one log entry, id `<first seq>-0`, fields `d` (the frame's JSON before
/// the text), `t`, `k` (`run\tpart`), `p` (the JSON after the text); its text
/// is `…:txt:<first>` (escaped, appended to) and `…:off:<first>` holds where
/// each delta ends in it (8 hex digits per delta). An open run's list holds
/// `<first>`, `T<d>\n<p>` for it. Its keys are dropped when it leaves the log
/// after its run closed, or when its run closes after it left the log.
const HELPERS_LUA: &str = r#"
local function drop_text(base, id, fields)
  if fields[5] ~= 'k' then return end
  local run = string.match(fields[6], '^(.-)\t')
  if run and redis.call('HEXISTS', base .. ':runs', run) == 1 then return end
  local first = string.match(id, '^(%d+)')
  redis.call('DEL', base .. ':txt:' .. first, base .. ':off:' .. first)
end
local function trim_count(base, max)
  local log = base .. ':log'
  local over = redis.call('XLEN', log) - max
  if over <= 0 then return end
  for _, e in ipairs(redis.call('XRANGE', log, '-', '+', 'COUNT', over)) do
    drop_text(base, e[1], e[2])
  end
  redis.call('XTRIM', log, 'MAXLEN', max)
end
local function trim_age(base, max_age, now)
  local log = base .. ':log'
  local cutoff = now - max_age
  local head = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
  if #head == 0 or tonumber(head[1][2][4]) >= cutoff then return end
  head = redis.call('XRANGE', log, '-', '+', 'COUNT', 64)
  for _, e in ipairs(head) do
    if tonumber(e[2][4]) >= cutoff then
      redis.call('XTRIM', log, 'MINID', e[1])
      return
    end
    drop_text(base, e[1], e[2])
  end
  local last = tonumber(string.match(head[#head][1], '^(%d+)'))
  redis.call('XTRIM', log, 'MINID', (last + 1) .. '-0')
  -- The newest entry went too: no text entry is the tail any more.
  if redis.call('XLEN', log) == 0 then redis.call('HSET', base .. ':meta', 'tail', '') end
end
-- The replication history this Redis serves (INFO's master_replid, 40
-- hex digits; it changes when a replica is promoted and when Redis
-- restarts), and the INFO text for `previous_history_id`. Plain finds, not
-- patterns: a pattern match over the text cost twice the INFO call itself.
local function history_id()
  local info = redis.call('INFO', 'replication')
  local at = string.find(info, 'master_replid:', 1, true)
  if not at then return '', info end
  return string.sub(info, at + 14, at + 53), info
end
-- The history a promoted replica continued from (master_replid2).
local function previous_history_id(info)
  local at = string.find(info, 'master_replid2:', 1, true)
  if not at then return '' end
  return string.sub(info, at + 15, at + 54)
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- A new epoch for a stream whose meta is missing (never used, expired, or
-- evicted alone): what is left of an earlier epoch (its log, open runs and
-- their lists and parts) goes, so the new one starts clean at seq 0 and its
-- readers get `reset` instead of a log whose ids are ahead of its seqs.
local function start_epoch(base, epoch)
  local runs = base .. ':runs'
  for _, run in ipairs(redis.call('HKEYS', runs)) do
    redis.call('DEL', base .. ':run:' .. run, base .. ':parts:' .. run)
  end
  -- An idempotency key names a seq of the old epoch: forgotten with it.
  for _, key in ipairs(redis.call('ZRANGE', base .. ':idems', 0, -1)) do
    redis.call('DEL', base .. ':idem:' .. key, base .. ':ans:' .. key)
  end
  redis.call('DEL', base .. ':log', runs, base .. ':runbytes', base .. ':idems')
  redis.call('HSET', base .. ':meta', 'epoch', epoch, 'seq', 0, 'rid', (history_id()))
end
-- The fence. A stream's meta records the replication history (`rid`) it
-- was last written on. Another history than this Redis serves now means
-- one of: this Redis is a promoted replica (the old history is its
-- master_replid2), or it restarted, or the data was restored or moved.
-- The first two may have lost acknowledged writes, whose seqs would then
-- be given to other events; so the stream goes on in epoch `new_epoch`, its
-- log, seqs and runs kept, and readers of the old epoch get `reset` instead
-- of other events under seqs they hold. On a Cluster (`cluster` true) a
-- history this node never had is a slot moved here from another master
-- (nothing lost) and is adopted; a promotion is still fenced. A meta
-- without `rid` (an earlier version's) adopts this history. Returns the
-- epoch to use.
local function fence(base, epoch, rid, new_epoch, cluster)
  local now_rid, info = history_id()
  if rid == now_rid then return epoch end
  if rid and rid ~= '' and (not cluster or rid == previous_history_id(info)) then
    epoch = new_epoch
    redis.call('HSET', base .. ':meta', 'epoch', epoch, 'rid', now_rid, 'tail', '')
  else
    redis.call('HSET', base .. ':meta', 'rid', now_rid)
  end
  return epoch
end
-- A run that opens naming the user's message it answers (stored under
-- idempotency key `qkey`) keeps a copy of it in its list, ahead of its own
-- events, so a replay of the run shows the question; `:ans:<qkey>` records
-- that a run took it (one run only). Returns the bytes the run now holds
-- for it.
local function pin_question(base, rk, qkey, idem_ms)
  local q = redis.call('GET', base .. ':idem:' .. qkey)
  if not q then return 0 end
  local e = redis.call('XRANGE', base .. ':log', q .. '-0', q .. '-0')
  if #e == 0 or e[1][2][5] == 'k' then return 0 end
  if not redis.call('SET', base .. ':ans:' .. qkey, q, 'NX', 'PX', idem_ms) then return 0 end
  local json = e[1][2][2]
  redis.call('LPUSH', rk, json, q)
  return #json
end
local function get_epoch(base, new_epoch, cluster)
  local meta = redis.call('HMGET', base .. ':meta', 'epoch', 'rid')
  local epoch = meta[1]
  if not epoch then
    epoch = new_epoch
    start_epoch(base, epoch)
    return epoch
  end
  return fence(base, epoch, meta[2], new_epoch, cluster)
end
-- The frame of text entry `first` (JSON `pre` … `post` around its text) cut
-- to from..to: {from, to, json}, or nil when they do not meet.
local function text_frame(base, first, pre, post, from, to)
  local off = base .. ':off:' .. first
  local n = redis.call('STRLEN', off) / 8
  if n == 0 then return nil end
  local last = first + n - 1
  if from < first then from = first end
  if to > last then to = last end
  if from > to then return nil end
  local start = 0
  if from > first then
    start = tonumber(redis.call('GETRANGE', off, (from - first - 1) * 8, (from - first) * 8 - 1), 16)
  end
  local stop = tonumber(redis.call('GETRANGE', off, (to - first) * 8, (to - first) * 8 + 7), 16)
  local text = ''
  if stop > start then text = redis.call('GETRANGE', base .. ':txt:' .. first, start, stop - 1) end
  local head = '{"type":"event","seq":' .. to
  if from < to then head = head .. ',"from_seq":' .. from end
  return {from, to, head .. pre .. text .. post}
end
"#;

/// KEYS: meta, log, runs, run bytes (one hash tag, so one Cluster slot).
/// ARGV: new_epoch, max_events, max_age_ms, ttl_ms, idem_ms, channel, base,
/// publish command (`PUBLISH`, or `SPUBLISH` on Cluster), cond_run,
/// run_ttl_ms, n, max_run_bytes, max_runs_bytes, max_idem (idempotency
/// keys kept per stream, oldest forgotten first), max_open (runs open at
/// once; beyond, the least recently active are for the caller to close with
/// `too_many_runs`), then n × (idem, run,
/// closes, thread, tail, part, index, pre, post, qkey): for a text delta
/// `part` is set, `tail` is its escaped text and `pre`/`post` the frame
/// around it; `qkey` is the idempotency key of the user's message the
/// event's run answers, if it names one (used when the event opens the run).
/// With `cond_run` set, publishes only if that run is open and silent for
/// longer than run_ttl_ms (the sweeper's exactly-once close).
/// Returns {epoch, receivers, k, k × (run to close, its thread, reason), seq1, how1, …}
/// (`how`: 0 appended, 1 a duplicate, 2 appended without recording its
/// run's activity, which a delta of a part does at most every `TOUCH_MS`):
/// the oversized runs (over max_run_bytes, or the largest while the stream's
/// runs hold more than max_runs_bytes) are for the caller to close. A
/// numbered delta that skips ahead of its part refuses the whole batch
/// before anything is written: {'!ooo', position, index, expected}.
///
/// The delta path is kept short: a delta that joins its entry costs its
/// PUBLISH, and the deltas that join it in one call share one APPEND of
/// their text, one of their offsets, one write of their part's state and
/// of their run's bytes (a call of one such delta runs 11 commands); the
/// meta hash's `tail` (`<first>\t<seq>\t<run>\t<part>`) names the
/// log's newest entry when it is a text entry and no event came after it
/// (any other publish moves `seq` past it), so a joining delta need not read
/// the log; the log is trimmed by count only when an entry is added, by age
/// then or at most once a second; TTLs
/// are refreshed when a key is created or at most once a second per stream
/// (meta `fresh`) and per part (the parts hash's third field), which the
/// TTL's 60 s margin over the longest retention covers; the run sizes are
/// read whole only when all open runs together are over their bound.
const PUBLISH_LUA: &str = r#"
local now = now_ms()
local base, publish, channel = ARGV[7], ARGV[8], ARGV[6]
local ttl = ARGV[4]
local REFRESH_MS = 1000
-- A run's activity (its time in the runs hash and the node-wide index) is
-- written by a delta at most once per TOUCH_MS per part: the sweeper's
-- silence check adds TOUCH_MS, so a run still closes only after run_ttl
-- of true silence (and at most TOUCH_MS later).
local TOUCH_MS = math.min(REFRESH_MS, math.floor(tonumber(ARGV[10]) / 8))
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'tail', 'fresh', 'rid')
local epoch = meta[1]
if not epoch then
  epoch = ARGV[1]
  start_epoch(base, epoch)
  meta = {epoch, '0', nil, nil}
else
  local fenced = fence(base, epoch, meta[5], ARGV[1], publish == 'SPUBLISH')
  if fenced ~= epoch then
    epoch = fenced
    meta[3] = nil
  end
end
local cond_run = ARGV[9]
if cond_run ~= '' then
  local v = redis.call('HGET', KEYS[3], cond_run)
  if not v then return {epoch, 0, 0} end
  local last = tonumber(string.match(v, '^(%d+)'))
  if now - last <= tonumber(ARGV[10]) + TOUCH_MS then return {epoch, 0, 0} end
end
local n = tonumber(ARGV[11])
local W = 10
-- Where each part stands, read once: {next index, seq of its latest delta,
-- ms of its keys' last TTL refresh}, kept up to date as the batch writes.
local parts = {}
local function part_state(run, part)
  local k = run .. '\t' .. part
  local s = parts[k]
  if not s then
    s = {0, 0, 0}
    local v = redis.call('HGET', base .. ':parts:' .. run, part)
    if v then
      local nx, last, fresh = string.match(v, '^(%d+)\t(%d+)\t?(%d*)$')
      s = {tonumber(nx), tonumber(last), tonumber(fresh) or 0}
    end
    parts[k] = s
  end
  return s[1], s[2], s[3]
end
-- The batch is checked whole first, following its own deltas, closes and keys.
do
  local nexts, closed, keys = {}, {}, {}
  for i = 0, n - 1 do
    local a = 16 + i * W
    local idem, run, closes, part, index = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 5], ARGV[a + 6]
    local skip = idem ~= '' and (keys[idem] or redis.call('EXISTS', base .. ':idem:' .. idem) == 1)
    if not skip and run ~= '' then
      if closes == '1' then
        closed[run] = true
        for k, _ in pairs(nexts) do
          if string.sub(k, 1, #run + 1) == run .. '\t' then nexts[k] = nil end
        end
      elseif part ~= '' then
        local k = run .. '\t' .. part
        local at = nexts[k]
        if at == nil then
          if closed[run] then at = 0 else at = part_state(run, part) end
        end
        if index ~= '' and tonumber(index) < at then
          skip = true
        elseif index ~= '' and tonumber(index) > at then
          return {'!ooo', i, tonumber(index), at}
        else
          nexts[k] = at + 1
        end
      end
    end
    if not skip and idem ~= '' then keys[idem] = true end
  end
end
local seq = tonumber(meta[2])
-- The log's newest entry, when it is a text entry with nothing after it.
local tail_first, tail_key = nil, nil
if meta[3] then
  local f, at, k = string.match(meta[3], '^(%d+)\t(%d+)\t(.*)$')
  if f and tonumber(at) == seq then tail_first, tail_key = f, k end
end
local max_run, max_runs = tonumber(ARGV[12]), tonumber(ARGV[13])
local out = {}
local receivers = 0
local grew, added, crowded = false, false, false
local total = nil
local sizes = {}
-- Deltas that join the log's newest entry are written together: their text
-- and end offsets by one APPEND each, their part's state and their run's
-- bytes once, when an event that is not such a delta comes or the batch
-- ends (each keeps its own seq and frame).
local pend = nil
local function flush()
  if not pend then return end
  local txt = table.concat(pend.texts)
  local at = redis.call('APPEND', base .. ':txt:' .. pend.first, txt) - #txt
  local offs = {}
  for j, t in ipairs(pend.texts) do
    at = at + #t
    offs[j] = string.format('%08x', at)
  end
  redis.call('APPEND', base .. ':off:' .. pend.first, table.concat(offs))
  if pend.refresh then
    redis.call('PEXPIRE', base .. ':txt:' .. pend.first, ttl)
    redis.call('PEXPIRE', base .. ':off:' .. pend.first, ttl)
    redis.call('PEXPIRE', base .. ':run:' .. pend.run, ttl)
  end
  local st = parts[pend.key]
  local pk = base .. ':parts:' .. pend.run
  if redis.call('HSET', pk, pend.part, st[1] .. '\t' .. st[2] .. '\t' .. st[3]) == 1 or pend.refresh then
    redis.call('PEXPIRE', pk, ttl)
  end
  sizes[pend.run] = redis.call('HINCRBY', KEYS[4], pend.run, pend.bytes)
  total = redis.call('HINCRBY', KEYS[4], '*', pend.bytes)
  pend = nil
end
for i = 0, n - 1 do
  local a = 16 + i * W
  local idem, run, closes, thread, tail = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local part, index, pre, post = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8]
  local qkey = ARGV[a + 9]
  local prev = false
  -- Whether this event records its run's activity (every event but a delta
  -- whose part did so less than TOUCH_MS ago).
  local touch = true
  if idem ~= '' then prev = redis.call('GET', base .. ':idem:' .. idem) end
  local nx, plast, pfresh = 0, 0, 0
  if not prev and part ~= '' then nx, plast, pfresh = part_state(run, part) end
  if not prev and index ~= '' and part ~= '' and tonumber(index) < nx then prev = plast end
  if prev then
    table.insert(out, tonumber(prev))
    table.insert(out, 1)
  else
    seq = seq + 1
    local json, size
    local rk = base .. ':run:' .. run
    -- A delta of the part the log's newest entry holds joins it.
    local key = run .. '\t' .. part
    local first = nil
    if part ~= '' and tail_key == key then first = tail_first end
    if not first then flush() end
    if first then
      json = '{"type":"event","seq":' .. seq .. pre .. tail .. post
      local refresh = now - pfresh >= TOUCH_MS
      if not pend then
        pend = {first = first, key = key, run = run, part = part, texts = {}, bytes = 0, refresh = false}
      end
      table.insert(pend.texts, tail)
      pend.bytes = pend.bytes + #tail + 4
      if refresh then
        pend.refresh = true
        pfresh = now
      end
      parts[key] = {nx + 1, seq, pfresh}
      touch = refresh
    elseif part ~= '' then
      -- A delta of another part, or after another event: a new entry.
      json = '{"type":"event","seq":' .. seq .. pre .. tail .. post
      first = tostring(seq)
      redis.call('XADD', KEYS[2], seq .. '-0', 'd', pre, 't', now, 'k', key, 'p', post)
      redis.call('SET', base .. ':txt:' .. first, tail, 'PX', ttl)
      redis.call('SET', base .. ':off:' .. first, string.format('%08x', #tail), 'PX', ttl)
      redis.call('RPUSH', rk, seq, 'T' .. pre .. '\n' .. post)
      redis.call('PEXPIRE', rk, ttl)
      trim_count(base, tonumber(ARGV[2]))
      size = #pre + #tail + #post + #part + 4
      added = true
      tail_first, tail_key = first, key
      pfresh = now
      local pk = base .. ':parts:' .. run
      redis.call('HSET', pk, part, (nx + 1) .. '\t' .. seq .. '\t' .. pfresh)
      redis.call('PEXPIRE', pk, ttl)
      parts[key] = {nx + 1, seq, pfresh}
    else
      json = '{"type":"event","seq":' .. seq .. tail
      redis.call('XADD', KEYS[2], seq .. '-0', 'd', json, 't', now)
      trim_count(base, tonumber(ARGV[2]))
      tail_first, tail_key = nil, nil
      size = #json
      added = true
    end
    if idem ~= '' then
      redis.call('SET', base .. ':idem:' .. idem, seq, 'PX', ARGV[5])
      -- At most max_idem keys per stream: the oldest are forgotten first.
      local order = base .. ':idems'
      redis.call('ZADD', order, seq, idem)
      redis.call('PEXPIRE', order, ARGV[5])
      local over = redis.call('ZCARD', order) - tonumber(ARGV[14])
      if over > 0 then
        local old = redis.call('ZPOPMIN', order, over)
        for j = 1, #old, 2 do redis.call('DEL', base .. ':idem:' .. old[j], base .. ':ans:' .. old[j]) end
      end
    end
    if run ~= '' then
      if closes == '1' then
        redis.call('HDEL', KEYS[3], run)
        -- Text entries of the run that already left the log are dropped now.
        local held = redis.call('LRANGE', rk, 0, -1)
        for j = 1, #held, 2 do
          if string.sub(held[j + 1], 1, 1) == 'T' and #redis.call('XRANGE', KEYS[2], held[j] .. '-0', held[j] .. '-0') == 0 then
            redis.call('DEL', base .. ':txt:' .. held[j], base .. ':off:' .. held[j])
          end
        end
        redis.call('DEL', rk, base .. ':parts:' .. run)
        for k, _ in pairs(parts) do
          if string.sub(k, 1, #run + 1) == run .. '\t' then parts[k] = nil end
        end
        local bytes = tonumber(redis.call('HGET', KEYS[4], run) or '0')
        redis.call('HDEL', KEYS[4], run)
        total = redis.call('HINCRBY', KEYS[4], '*', -bytes)
        sizes[run] = nil
      else
        if part == '' then
          redis.call('RPUSH', rk, seq, json)
          redis.call('PEXPIRE', rk, ttl)
        end
        -- The run keeps the thread its first event named.
        if touch then
          local held = redis.call('HGET', KEYS[3], run)
          if held then thread = string.match(held, '^%d+\t(.*)$') or thread end
          if redis.call('HSET', KEYS[3], run, now .. '\t' .. thread) == 1 then
            added = true
            if redis.call('HLEN', KEYS[3]) > tonumber(ARGV[15]) then crowded = true end
            -- (A joining delta's own bytes are its group's: `size` is nil.)
            if qkey ~= '' then size = (size or 0) + pin_question(base, rk, qkey, ARGV[5]) end
          end
        end
        -- A joining delta's bytes are counted when its group is written.
        if size then
          sizes[run] = redis.call('HINCRBY', KEYS[4], run, size)
          total = redis.call('HINCRBY', KEYS[4], '*', size)
        end
        grew = true
      end
    end
    receivers = redis.call(publish, channel, epoch .. '\n' .. seq .. '\n' .. json)
    table.insert(out, seq)
    if touch then table.insert(out, 0) else table.insert(out, 2) end
  end
end
flush()
-- Oversized runs, largest first (then by name): only a run that grew in
-- this batch can newly be over its own bound; all of them are read when
-- the runs together are over theirs.
local oversized = {}
if grew then
  local runs = {}
  if total > max_runs then
    local all = redis.call('HGETALL', KEYS[4])
    for j = 1, #all, 2 do
      if all[j] ~= '*' then table.insert(runs, {all[j], tonumber(all[j + 1])}) end
    end
  else
    for r, b in pairs(sizes) do
      if b > max_run then table.insert(runs, {r, b}) end
    end
  end
  table.sort(runs, function(x, y) if x[2] ~= y[2] then return x[2] > y[2] end return x[1] < y[1] end)
  for _, r in ipairs(runs) do
    if r[2] > max_run or total > max_runs then
      table.insert(oversized, r[1])
      total = total - r[2]
    end
  end
end
local reasons = {}
for _, r in ipairs(oversized) do reasons[r] = 'run_too_large' end
-- More runs open than max_open: the least recently active go too.
if crowded then
  local all = redis.call('HGETALL', KEYS[3])
  local over = #all / 2 - #oversized - tonumber(ARGV[15])
  local runs = {}
  for j = 1, #all, 2 do
    if not reasons[all[j]] then
      table.insert(runs, {all[j], tonumber(string.match(all[j + 1], '^(%d+)'))})
    end
  end
  table.sort(runs, function(x, y) if x[2] ~= y[2] then return x[2] < y[2] end return x[1] < y[1] end)
  for j = 1, over do
    if runs[j] then
      table.insert(oversized, runs[j][1])
      reasons[runs[j][1]] = 'too_many_runs'
    end
  end
end
local head = {epoch, receivers, #oversized}
for _, r in ipairs(oversized) do
  local v = redis.call('HGET', KEYS[3], r) or ''
  table.insert(head, r)
  table.insert(head, string.match(v, '^%d+\t(.*)$') or '')
  table.insert(head, reasons[r])
end
for _, v in ipairs(out) do table.insert(head, v) end
local tail_v = ''
if tail_key then tail_v = tail_first .. '\t' .. seq .. '\t' .. tail_key end
local refresh = added or not meta[4] or now - tonumber(meta[4]) >= REFRESH_MS
if refresh then
  redis.call('HSET', KEYS[1], 'seq', seq, 'tail', tail_v, 'fresh', now)
else
  redis.call('HSET', KEYS[1], 'seq', seq, 'tail', tail_v)
end
-- The log is trimmed by age when an entry was added and otherwise at most
-- once a second (a delta joining its entry adds none); a reader's position
-- trims it too, so a resume never starts from what is past its age.
if refresh then
  trim_age(base, tonumber(ARGV[3]), now)
  for k = 1, 4 do redis.call('PEXPIRE', KEYS[k], ttl) end
end
return head
"#;

/// KEYS: meta, log. ARGV: new_epoch, max_age_ms, ttl_ms, base, cluster
/// (`1` on a Redis Cluster).
/// Returns {epoch, last_seq, first_seq}.
const POSITION_LUA: &str = r#"
local epoch = get_epoch(ARGV[4], ARGV[1], ARGV[5] == '1')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
trim_age(ARGV[4], tonumber(ARGV[2]), now_ms())
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first = seq + 1
if #head > 0 then first = tonumber(string.match(head[1][1], '^(%d+)')) end
return {epoch, seq, first}
"#;

/// KEYS: meta, log. ARGV: epoch, after, until, limit, base.
/// Returns {} when the epoch differs, else {1, from1, to1, json1, …}: the
/// frames covering `after < seq <= until`, a text entry cut to the range
/// (the one holding `after + 1` included when it starts before it).
const HISTORY_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return {} end
local after, upto, limit, base = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local out = {1}
local count = 0
local function add(e)
  local first = tonumber(string.match(e[1], '^(%d+)'))
  local f = e[2]
  if f[5] == 'k' then
    local fr = text_frame(base, first, f[2], f[8], after + 1, upto)
    if fr then
      for _, v in ipairs(fr) do table.insert(out, v) end
      count = count + 1
    end
  elseif first > after and first <= upto then
    table.insert(out, first)
    table.insert(out, first)
    table.insert(out, f[2])
    count = count + 1
  end
end
-- The entry holding after + 1 may start before it.
local before = redis.call('XREVRANGE', KEYS[2], after .. '-0', '-', 'COUNT', 1)
if #before > 0 then add(before[1]) end
if count < limit then
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], (after + 1) .. '-0', upto .. '-0', 'COUNT', limit - count)) do
    add(e)
  end
end
return out
"#;

/// KEYS: meta. ARGV: epoch, base, until, then the runs to read (a few per
/// call, so one replay never holds Redis for all of a stream's runs).
/// Returns {} when the epoch differs, else {1, from1, to1, json1, …}
/// (unsorted): those runs' frames with seqs up to `until`, a text entry
/// cut there.
const RUN_EVENTS_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return {} end
local base, upto = ARGV[2], tonumber(ARGV[3])
local out = {1}
for i = 4, #ARGV do
  local run = ARGV[i]
  local held = redis.call('LRANGE', base .. ':run:' .. run, 0, -1)
  for j = 1, #held, 2 do
    local seq, v = tonumber(held[j]), held[j + 1]
    if string.sub(v, 1, 1) == 'T' then
      local pre, post = string.match(v, '^T(.-)\n(.*)$')
      local fr = text_frame(base, seq, pre, post, 0, upto)
      if fr then for _, x in ipairs(fr) do table.insert(out, x) end end
    elseif seq <= upto then
      table.insert(out, seq)
      table.insert(out, seq)
      table.insert(out, v)
    end
  end
end
return out
"#;

/// KEYS: a message claim. ARGV: this node's claim value, lease ms.
/// Extends the claim only while it is still this node's.
const RENEW_CLAIM_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
"#;

/// KEYS: a message claim. ARGV: this node's claim value.
/// Releases the claim only while it is still this node's.
const RELEASE_CLAIM_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
"#;

/// Presence of one shared stream: hash `…:presence`, field = user id,
/// value = that user's entries, one per node: `<node>=<count>@<expiry ms>`
/// joined by `;`. An entry not renewed by its expiry (its node died) counts
/// for nothing and is dropped by the next refresh of any node.
const PRESENCE_HELPERS_LUA: &str = r#"
-- The live entries of `v` other than `node`'s (as strings), their total,
-- this node's live count, and whether an entry of another node expired.
local function entries_of(v, node, now)
  local others, total, mine, expired = {}, 0, 0, false
  for n, c, e in string.gmatch(v or '', '([^=;]+)=(%d+)@(%d+)') do
    if tonumber(e) > now then
      if n == node then mine = tonumber(c) else
        table.insert(others, n .. '=' .. c .. '@' .. e)
        total = total + tonumber(c)
      end
    elseif n ~= node then expired = true end
  end
  return others, total, mine, expired
end
local function store(key, user, entries)
  if #entries == 0 then redis.call('HDEL', key, user) else redis.call('HSET', key, user, table.concat(entries, ';')) end
end
"#;

/// KEYS: the stream's presence hash. ARGV: node, user, count, ttl ms.
/// Sets this node's count of the user's connections (0: removes it).
/// Returns 1 if the user was absent and is present now, 2 if the reverse,
/// else 0.
const PRESENCE_SET_LUA: &str = r#"
local now = now_ms()
local node, user, count, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local others, total, mine = entries_of(redis.call('HGET', KEYS[1], user), node, now)
if count > 0 then table.insert(others, node .. '=' .. count .. '@' .. (now + ttl)) end
store(KEYS[1], user, others)
if count > 0 then redis.call('PEXPIRE', KEYS[1], ttl * 2) end
local before, after = total + mine, total + count
if before == 0 and after > 0 then return 1 end
if before > 0 and after == 0 then return 2 end
return 0
"#;

/// KEYS: the stream's presence hash. ARGV: node, ttl ms, n, then n ×
/// (user, count): this node's users of the stream. Renews this node's
/// entries (and writes any that are missing), drops every expired entry,
/// and returns the users who are no longer present because of it.
const PRESENCE_REFRESH_LUA: &str = r#"
local now = now_ms()
local node, ttl = ARGV[1], tonumber(ARGV[2])
local mine = {}
for i = 0, tonumber(ARGV[3]) - 1 do mine[ARGV[4 + 2 * i]] = tonumber(ARGV[5 + 2 * i]) end
local left = {}
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all, 2 do
  local user = all[j]
  local others, total, _, expired = entries_of(all[j + 1], node, now)
  local count = mine[user] or 0
  mine[user] = nil
  if count > 0 then table.insert(others, node .. '=' .. count .. '@' .. (now + ttl)) end
  store(KEYS[1], user, others)
  if expired and total + count == 0 then table.insert(left, user) end
end
for user, count in pairs(mine) do
  if count > 0 then redis.call('HSET', KEYS[1], user, node .. '=' .. count .. '@' .. (now + ttl)) end
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl * 2) end
return left
"#;

/// KEYS: the stream's presence hash. ARGV: most users to list.
/// Returns {users present, their connections, user1, count1, …} (users by
/// id, at most the limit).
const PRESENCE_LIST_LUA: &str = r#"
local now = now_ms()
local users, total_users, total = {}, 0, 0
local all = redis.call('HGETALL', KEYS[1])
for j = 1, #all, 2 do
  local _, n, mine = entries_of(all[j + 1], '', now)
  if n + mine > 0 then
    total_users = total_users + 1
    total = total + n + mine
    table.insert(users, {all[j], n + mine})
  end
end
table.sort(users, function(a, b) return a[1] < b[1] end)
local out = {total_users, total}
for i = 1, math.min(#users, tonumber(ARGV[1])) do
  table.insert(out, users[i][1])
  table.insert(out, users[i][2])
end
return out
"#;

#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) publish: redis::Script,
    pub(super) position: redis::Script,
    pub(super) history: redis::Script,
    pub(super) run_events: redis::Script,
    pub(super) renew_claim: redis::Script,
    pub(super) release_claim: redis::Script,
    pub(super) presence_set: redis::Script,
    pub(super) presence_refresh: redis::Script,
    pub(super) presence_list: redis::Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let with_helpers = |body: &str| redis::Script::new(&format!("{HELPERS_LUA}\n{body}"));
        let with_presence = |body: &str| {
            redis::Script::new(&format!("{HELPERS_LUA}\n{PRESENCE_HELPERS_LUA}\n{body}"))
        };
        Self {
            publish: with_helpers(PUBLISH_LUA),
            position: with_helpers(POSITION_LUA),
            history: with_helpers(HISTORY_LUA),
            run_events: with_helpers(RUN_EVENTS_LUA),
            renew_claim: redis::Script::new(RENEW_CLAIM_LUA),
            release_claim: redis::Script::new(RELEASE_CLAIM_LUA),
            presence_set: with_presence(PRESENCE_SET_LUA),
            presence_refresh: with_presence(PRESENCE_REFRESH_LUA),
            presence_list: with_presence(PRESENCE_LIST_LUA),
        }
    }
}
