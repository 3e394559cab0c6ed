'use strict';
// Cache channels: cache_miss on an empty channel, replay of the last event to late subscribers.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'app1' }, { id: 'shortcache', cache_ttl_secs: 1 }] }, 'cache');

function authFor(app, c, name, kind) {
  if (kind === 'public') return {};
  if (kind === 'presence') return h.rawAuth(app, c.socketId, name, { user_id: `u${c.socketId}` });
  return h.rawAuth(app, c.socketId, name);
}

const kinds = [
  ['cache-', 'public'],
  ['private-cache-', 'private'],
  ['presence-cache-', 'presence'],
  ['private-encrypted-cache-', 'private'],
];

describe('cache channels', () => {
  for (const [prefix, kind] of kinds) {
    it(`${prefix}: cache_miss when empty, last event replayed right after subscription_succeeded`, async () => {
      const { node } = ctx;
      const app = node.app;
      const name = h.uniq(prefix);
      const first = await h.rawClient(node);
      const sub = await first.subscribe(name, authFor(app, first, name, kind));
      assert.equal(sub.event, 'pusher_internal:subscription_succeeded', sub.raw);
      const miss = await first.next('pusher:cache_miss');
      assert.equal(miss.channel, name);
      const succIdx = first.frames.indexOf(sub);
      assert.ok(first.frames.indexOf(miss) > succIdx, 'cache_miss comes after subscription_succeeded');

      await h.sdk(node).trigger(name, 'Price', { v: 1 });
      await h.sdk(node).trigger(name, 'Price', { v: 2 });
      await first.next('Price');
      await first.next('Price');

      const late = await h.rawClient(node);
      const lsub = await late.subscribe(name, authFor(app, late, name, kind));
      assert.equal(lsub.event, 'pusher_internal:subscription_succeeded', lsub.raw);
      const replay = await late.next('Price');
      assert.equal(replay.channel, name);
      const lateIdx = late.frames.indexOf(lsub);
      assert.equal(late.frames.indexOf(replay), lateIdx + 1, 'the cached event comes right after subscription_succeeded');
      if (prefix.includes('encrypted')) {
        assert.equal(typeof replay.data.ciphertext, 'string', 'encrypted payload relayed as is');
      } else {
        assert.deepEqual(replay.data, { v: 2 }, 'only the last event is replayed');
      }
      await late.expectNone((f) => f.event === 'Price' || f.event === 'pusher:cache_miss', 300);
    });
  }

  it('pusher-js: late subscriber receives the cached event, a fresh channel gives pusher:cache_miss', async () => {
    const { node } = ctx;
    const name = h.uniq('cache-js-');
    const a = h.pusherClient(node);
    const cha = a.subscribe(name);
    await h.waitForEvent(cha, 'pusher:cache_miss');
    await h.sdk(node).trigger(name, 'Score', { home: 2, away: 1 });
    const b = h.pusherClient(node);
    const chb = b.subscribe(name);
    assert.deepEqual(await h.waitForEvent(chb, 'Score'), { home: 2, away: 1 });
  });

  it('private-encrypted-cache-: pusher-js decrypts the replayed event', async () => {
    const { node } = ctx;
    const name = h.uniq('private-encrypted-cache-js-');
    await h.sdk(node).trigger(name, 'Secret', { code: 'abc' });
    const b = h.pusherClient(node);
    const chb = b.subscribe(name);
    assert.deepEqual(await h.waitForEvent(chb, 'Secret'), { code: 'abc' });
  });

  it('an event published before anyone subscribed is cached', async () => {
    const { node } = ctx;
    const name = h.uniq('cache-early-');
    await h.sdk(node).trigger(name, 'Early', { e: 1 });
    const c = await h.rawClient(node);
    await c.subscribe(name);
    const f = await c.next('Early');
    assert.deepEqual(f.data, { e: 1 });
  });

  it('client events are not cached', async () => {
    const { node } = ctx;
    const app = node.app;
    const name = h.uniq('private-cache-ce-');
    const a = await h.rawClient(node);
    await a.subscribe(name, h.rawAuth(app, a.socketId, name));
    await a.next('pusher:cache_miss');
    const b = await h.rawClient(node);
    await b.subscribe(name, h.rawAuth(app, b.socketId, name));
    await b.next('pusher:cache_miss');
    a.send({ event: 'client-typing', channel: name, data: { t: 1 } });
    await b.next('client-typing');
    const late = await h.rawClient(node);
    await late.subscribe(name, h.rawAuth(app, late.socketId, name));
    await late.next('pusher:cache_miss');
    await late.expectNone('client-typing', 300);
  });

  it('the cached event expires after cache_ttl_secs', async () => {
    const { node } = ctx;
    const app = node.apps.shortcache;
    const name = h.uniq('cache-ttl-');
    await h.sdk(node, app).trigger(name, 'Soon', {});
    await h.sleep(2200);
    const c = await h.rawClient(node, app);
    await c.subscribe(name);
    await c.next('pusher:cache_miss');
    await c.expectNone('Soon', 200);
  });

  it('a non-cache channel sends neither cache_miss nor replays', async () => {
    const { node } = ctx;
    const name = h.uniq('plain-');
    await h.sdk(node).trigger(name, 'Old', {});
    const c = await h.rawClient(node);
    await c.subscribe(name);
    await c.expectNone((f) => f.event === 'Old' || f.event === 'pusher:cache_miss', 400);
  });

  it('GET /channels/{c}?info=cache shows the cached event (if implemented)', async (t) => {
    const { node } = ctx;
    const name = h.uniq('cache-info-');
    const c = await h.rawClient(node);
    await c.subscribe(name);
    await h.sdk(node).trigger(name, 'Cached', { z: 9 });
    await c.next('Cached');
    const res = await h.sdkResult(h.sdk(node).get({ path: `/channels/${name}`, params: { info: 'cache' } }));
    assert.equal(res.status, 200, res.text);
    assert.equal(res.json.occupied, true);
    if (!('cache' in res.json)) {
      t.skip('info=cache not implemented (no "cache" field)');
      return;
    }
    assert.ok(JSON.stringify(res.json.cache).includes('Cached') || JSON.stringify(res.json.cache).includes('z'), res.text);
  });
});
