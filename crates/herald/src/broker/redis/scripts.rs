//! The Lua scripts the broker runs: each is atomic, so a stream's keys
//! change together and its channel carries events in seq order.

/// The Lua helpers: trim a stream's log by age (one read when the oldest
/// entry is young enough, else up to 64 entries dropped per call), Redis's
/// clock in ms, and the stream's epoch (created on first use).
const TRIM_LUA: &str = r#"
local function trim_age(log, max_age, now)
  local cutoff = now - max_age
  local head = redis.call('XRANGE', log, '-', '+', 'COUNT', 1)
  if #head == 0 or tonumber(head[1][2][4]) >= cutoff then return end
  head = redis.call('XRANGE', log, '-', '+', 'COUNT', 64)
  for _, e in ipairs(head) do
    if tonumber(e[2][4]) >= cutoff then
      redis.call('XTRIM', log, 'MINID', e[1])
      return
    end
  end
  local last = tonumber(string.match(head[#head][1], '^(%d+)'))
  redis.call('XTRIM', log, 'MINID', (last + 1) .. '-0')
end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function get_epoch(meta, new_epoch)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    epoch = new_epoch
    redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
  end
  return epoch
end
"#;

/// KEYS: meta, log, runs, run bytes (one hash tag, so one Cluster slot).
/// ARGV: new_epoch, max_events, max_age_ms, ttl_ms, idem_ms, channel, base,
/// publish command (`PUBLISH`, or `SPUBLISH` on Cluster), cond_run,
/// run_ttl_ms, n, max_run_bytes, max_runs_bytes, then n × (idem, run,
/// closes, thread, tail).
/// With `cond_run` set, publishes only if that run is open and silent for
/// longer than run_ttl_ms (the sweeper's exactly-once close).
/// Returns {epoch, receivers, k, k × (oversized run, its thread), seq1, dup1, …}:
/// the oversized runs (over max_run_bytes, or the largest while the stream's
/// runs hold more than max_runs_bytes) are for the caller to close.
const PUBLISH_LUA: &str = r#"
local now = now_ms()
local epoch = get_epoch(KEYS[1], ARGV[1])
local base, publish, channel = ARGV[7], ARGV[8], ARGV[6]
local cond_run = ARGV[9]
if cond_run ~= '' then
  local v = redis.call('HGET', KEYS[3], cond_run)
  if not v then return {epoch, 0, 0} end
  local last = tonumber(string.match(v, '^(%d+)'))
  if now - last <= tonumber(ARGV[10]) then return {epoch, 0, 0} end
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local n = tonumber(ARGV[11])
local max_run, max_runs = tonumber(ARGV[12]), tonumber(ARGV[13])
local out = {}
local receivers = 0
local grew = false
for i = 0, n - 1 do
  local a = 14 + i * 5
  local idem, run, closes, thread, tail = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local prev = false
  if idem ~= '' then prev = redis.call('GET', base .. ':idem:' .. idem) end
  if prev then
    table.insert(out, tonumber(prev))
    table.insert(out, 1)
  else
    seq = seq + 1
    local json = '{"type":"event","seq":' .. seq .. tail
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], seq .. '-0', 'd', json, 't', now)
    if idem ~= '' then redis.call('SET', base .. ':idem:' .. idem, seq, 'PX', ARGV[5]) end
    if run ~= '' then
      local rk = base .. ':run:' .. run
      if closes == '1' then
        redis.call('DEL', rk)
        redis.call('HDEL', KEYS[3], run)
        local held = tonumber(redis.call('HGET', KEYS[4], run) or '0')
        redis.call('HDEL', KEYS[4], run)
        redis.call('HINCRBY', KEYS[4], '*', -held)
      else
        redis.call('RPUSH', rk, seq, json)
        redis.call('PEXPIRE', rk, ARGV[4])
        -- The run keeps the thread its first event named.
        local held = redis.call('HGET', KEYS[3], run)
        if held then thread = string.match(held, '^%d+\t(.*)$') or thread end
        redis.call('HSET', KEYS[3], run, now .. '\t' .. thread)
        redis.call('HINCRBY', KEYS[4], run, #json)
        redis.call('HINCRBY', KEYS[4], '*', #json)
        grew = true
      end
    end
    receivers = redis.call(publish, channel, epoch .. '\n' .. seq .. '\n' .. json)
    table.insert(out, seq)
    table.insert(out, 0)
  end
end
local oversized = {}
if grew then
  local sizes = redis.call('HGETALL', KEYS[4])
  local runs, total = {}, 0
  for j = 1, #sizes, 2 do
    if sizes[j] == '*' then total = tonumber(sizes[j + 1])
    else table.insert(runs, {sizes[j], tonumber(sizes[j + 1])}) end
  end
  table.sort(runs, function(x, y) if x[2] ~= y[2] then return x[2] > y[2] end return x[1] < y[1] end)
  for _, r in ipairs(runs) do
    if r[2] > max_run or total > max_runs then
      table.insert(oversized, r[1])
      total = total - r[2]
    end
  end
end
local head = {epoch, receivers, #oversized}
for _, r in ipairs(oversized) do
  local v = redis.call('HGET', KEYS[3], r) or ''
  table.insert(head, r)
  table.insert(head, string.match(v, '^%d+\t(.*)$') or '')
end
for _, v in ipairs(out) do table.insert(head, v) end
redis.call('HSET', KEYS[1], 'seq', seq)
trim_age(KEYS[2], tonumber(ARGV[3]), now)
for k = 1, 4 do redis.call('PEXPIRE', KEYS[k], ARGV[4]) end
return head
"#;

/// KEYS: meta, log. ARGV: new_epoch, max_age_ms, ttl_ms.
/// Returns {epoch, last_seq, first_seq}.
const POSITION_LUA: &str = r#"
local epoch = get_epoch(KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq'))
trim_age(KEYS[2], tonumber(ARGV[2]), now_ms())
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first = seq + 1
if #head > 0 then first = tonumber(string.match(head[1][1], '^(%d+)')) end
return {epoch, seq, first}
"#;

/// KEYS: meta, log. ARGV: epoch, after, until, limit.
/// Returns {} when the epoch differs, else {1, seq1, json1, seq2, json2, …}.
const HISTORY_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return {} end
local out = {1}
local from = (tonumber(ARGV[2]) + 1) .. '-0'
for _, e in ipairs(redis.call('XRANGE', KEYS[2], from, ARGV[3] .. '-0', 'COUNT', ARGV[4])) do
  table.insert(out, string.match(e[1], '^(%d+)'))
  table.insert(out, e[2][2])
end
return out
"#;

/// KEYS: meta, runs. ARGV: epoch, base.
/// Returns {} when the epoch differs, else {1, seq1, json1, …} (unsorted).
const RUN_EVENTS_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then return {} end
local out = {1}
for _, run in ipairs(redis.call('HKEYS', KEYS[2])) do
  for _, v in ipairs(redis.call('LRANGE', ARGV[2] .. ':run:' .. run, 0, -1)) do
    table.insert(out, v)
  end
end
return out
"#;

#[derive(Debug)]
pub(super) struct Scripts {
    pub(super) publish: redis::Script,
    pub(super) position: redis::Script,
    pub(super) history: redis::Script,
    pub(super) run_events: redis::Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let with_helpers = |body: &str| redis::Script::new(&format!("{TRIM_LUA}\n{body}"));
        Self {
            publish: with_helpers(PUBLISH_LUA),
            position: with_helpers(POSITION_LUA),
            history: redis::Script::new(HISTORY_LUA),
            run_events: redis::Script::new(RUN_EVENTS_LUA),
        }
    }
}
