'use strict';
// Channel kinds: public, private, private-encrypted, presence basics, invalid names.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'app1' }] }, 'channels');

describe('channels', () => {
  it('public channel: pusher-js receives an event triggered with the SDK', async () => {
    const { node } = ctx;
    const name = h.uniq('news-');
    const a = h.pusherClient(node);
    const b = h.pusherClient(node);
    const [ca, cb] = await Promise.all([h.subscribed(a, name), h.subscribed(b, name)]);
    const pa = h.waitForEvent(ca, 'published');
    const pb = h.waitForEvent(cb, 'published');
    await h.sdk(node).trigger(name, 'published', { title: 'hello', n: 1 });
    assert.deepEqual(await pa, { title: 'hello', n: 1 });
    assert.deepEqual(await pb, { title: 'hello', n: 1 });
  });

  it('public channel: the raw frame is {event, data (string), channel}', async () => {
    const { node } = ctx;
    const name = h.uniq('raw-');
    const c = await h.rawClient(node);
    const sub = await c.subscribe(name);
    assert.equal(sub.event, 'pusher_internal:subscription_succeeded', sub.raw);
    assert.equal(sub.channel, name);
    await h.sdk(node).trigger(name, 'thing', { a: [1, 2] });
    const f = await c.next('thing');
    assert.equal(f.channel, name);
    assert.equal(f.dataIsString, true);
    assert.deepEqual(f.data, { a: [1, 2] });
    // a string payload is relayed as the same string
    await h.sdk(node).trigger(name, 'plain', 'just text');
    const g = await c.next('plain');
    assert.equal(g.msg.data, 'just text');
  });

  it('unsubscribe stops delivery', async () => {
    const { node } = ctx;
    const name = h.uniq('unsub-');
    const c = await h.rawClient(node);
    await c.subscribe(name);
    c.send({ event: 'pusher:unsubscribe', data: { channel: name } });
    await h.sleep(200);
    await h.sdk(node).trigger(name, 'after', {});
    await c.expectNone('after', 500);
    await c.ping();
  });

  it('private channel: a correctly signed subscription receives events', async () => {
    const { node } = ctx;
    const name = h.uniq('private-orders-');
    const client = h.pusherClient(node);
    const ch = await h.subscribed(client, name);
    const p = h.waitForEvent(ch, 'OrderShipped');
    await h.sdk(node).trigger(name, 'OrderShipped', { id: 7 });
    assert.deepEqual(await p, { id: 7 });
  });

  it('private channel: bad auth gets pusher:subscription_error, others are unaffected', async () => {
    const { node } = ctx;
    const name = h.uniq('private-secret-');
    const good = h.pusherClient(node);
    const bad = h.pusherClient(node, node.app, { badAuth: true });
    const gch = await h.subscribed(good, name);
    await assert.rejects(h.subscribed(bad, name), /subscription_error/);
    // the refused client is still connected and can use public channels
    assert.equal(bad.connection.state, 'connected');
    const pub = h.uniq('pub-');
    const bch = await h.subscribed(bad, pub);
    const got = h.waitForEvent(gch, 'still');
    const badGot = bad.channel(name);
    const badSeen = h.collect(badGot, 'still');
    const pubGot = h.waitForEvent(bch, 'pubev');
    await h.sdk(node).trigger(name, 'still', { ok: true });
    await h.sdk(node).trigger(pub, 'pubev', { ok: 1 });
    assert.deepEqual(await got, { ok: true });
    assert.deepEqual(await pubGot, { ok: 1 });
    await h.sleep(200);
    assert.equal(badSeen.items.length, 0, 'refused client must not get private events');
  });

  it('private channel: raw subscription_error frame for a wrong signature, a wrong key and no auth', async () => {
    const { node } = ctx;
    const app = node.app;
    const name = h.uniq('private-raw-');
    const c = await h.rawClient(node);
    const cases = [
      { auth: `${app.key}:${'0'.repeat(64)}` },
      { auth: `other-key:${h.hmacHex(app.secret, `${c.socketId}:${name}`)}` },
      {},
      { auth: h.rawAuth(app, '1234.5678', name).auth }, // signed for another socket
    ];
    for (const extra of cases) {
      const f = await c.subscribe(name, extra);
      assert.equal(f.event, 'pusher:subscription_error', `${JSON.stringify(extra)} -> ${f.raw}`);
    }
    // and the right one works on the same socket afterwards
    const ok = await c.subscribe(name, h.rawAuth(app, c.socketId, name));
    assert.equal(ok.event, 'pusher_internal:subscription_succeeded', ok.raw);
    assert.equal(ok.channel, name);
  });

  it('private-encrypted channel: the server relays the SDK ciphertext and pusher-js decrypts it', async () => {
    const { node } = ctx;
    const name = h.uniq('private-encrypted-vault-');
    const client = h.pusherClient(node);
    const ch = await h.subscribed(client, name);
    const raw = await h.rawClient(node);
    const sub = await raw.subscribe(name, h.rawAuth(node.app, raw.socketId, name));
    assert.equal(sub.event, 'pusher_internal:subscription_succeeded', sub.raw);
    const p = h.waitForEvent(ch, 'secret');
    await h.sdk(node).trigger(name, 'secret', { pin: 1234, msg: 'héllo' });
    assert.deepEqual(await p, { pin: 1234, msg: 'héllo' });
    const f = await raw.next('secret');
    assert.equal(typeof f.data.nonce, 'string', f.raw);
    assert.equal(typeof f.data.ciphertext, 'string', f.raw);
    assert.ok(!f.raw.includes('1234'), 'plaintext must not be visible on the wire');
  });

  it('private-encrypted channel: bad auth is refused', async () => {
    const { node } = ctx;
    const name = h.uniq('private-encrypted-x-');
    const c = await h.rawClient(node);
    const f = await c.subscribe(name, { auth: `${node.app.key}:${'ab'.repeat(32)}` });
    assert.equal(f.event, 'pusher:subscription_error', f.raw);
  });

  it('presence channel: raw subscription_succeeded carries presence count, ids and hash', async () => {
    const { node } = ctx;
    const app = node.app;
    const name = h.uniq('presence-lobby-');
    const a = await h.rawClient(node);
    const fa = await a.subscribe(name, h.rawAuth(app, a.socketId, name, { user_id: 'alice', user_info: { name: 'Alice' } }));
    assert.equal(fa.event, 'pusher_internal:subscription_succeeded', fa.raw);
    assert.equal(fa.dataIsString, true);
    assert.equal(fa.data.presence.count, 1);
    assert.deepEqual(fa.data.presence.ids, ['alice']);
    assert.deepEqual(fa.data.presence.hash, { alice: { name: 'Alice' } });
    const b = await h.rawClient(node);
    const fb = await b.subscribe(name, h.rawAuth(app, b.socketId, name, { user_id: 'bob', user_info: { name: 'Bob' } }));
    assert.equal(fb.data.presence.count, 2);
    assert.deepEqual([...fb.data.presence.ids].sort(), ['alice', 'bob']);
    assert.deepEqual(fb.data.presence.hash.bob, { name: 'Bob' });
    const added = await a.next('pusher_internal:member_added');
    assert.equal(added.channel, name);
    assert.equal(added.dataIsString, true);
    assert.deepEqual(added.data, { user_id: 'bob', user_info: { name: 'Bob' } });
    await b.expectNone('pusher_internal:member_added', 300);
  });

  it('presence channel: missing or unsigned channel_data is refused', async () => {
    const { node } = ctx;
    const app = node.app;
    const name = h.uniq('presence-x-');
    const c = await h.rawClient(node);
    // private-style signature without channel_data
    let f = await c.subscribe(name, h.rawAuth(app, c.socketId, name));
    assert.equal(f.event, 'pusher:subscription_error', f.raw);
    // channel_data changed after signing
    const good = h.rawAuth(app, c.socketId, name, { user_id: 'u1' });
    f = await c.subscribe(name, { auth: good.auth, channel_data: JSON.stringify({ user_id: 'admin' }) });
    assert.equal(f.event, 'pusher:subscription_error', f.raw);
    // channel_data without user_id
    f = await c.subscribe(name, h.rawAuth(app, c.socketId, name, { user_info: {} }));
    assert.equal(f.event, 'pusher:subscription_error', f.raw);
  });

  it('invalid channel names get pusher:subscription_error and the socket keeps working', async () => {
    const { node } = ctx;
    const c = await h.rawClient(node);
    const bad = [
      'has space',
      'bad/slash',
      'quote"s',
      'x'.repeat(165),
      'émoji-ü',
      '',
      'private-' + 'y'.repeat(160),
    ];
    for (const name of bad) {
      c.send({ event: 'pusher:subscribe', data: { channel: name } });
      const f = await c.next((fr) => fr.event === 'pusher:subscription_error' || fr.event === 'pusher:error' ||
        fr.event === 'pusher_internal:subscription_succeeded', 3000, `answer for ${JSON.stringify(name)}`);
      assert.equal(f.event, 'pusher:subscription_error', `${JSON.stringify(name)} -> ${f.raw}`);
    }
    const okName = 'x'.repeat(164);
    const ok = await c.subscribe(okName);
    assert.equal(ok.event, 'pusher_internal:subscription_succeeded', 'a 164-char name is valid');
    const allChars = h.uniq('Az09_-=@,.;');
    const ok2 = await c.subscribe(allChars);
    assert.equal(ok2.event, 'pusher_internal:subscription_succeeded', ok2.raw);
    await h.sdk(node).trigger(allChars, 'ev', {});
    await c.next('ev');
  });

  it('pusher-js sees subscription_error for an invalid channel name', async () => {
    const { node } = ctx;
    const client = h.pusherClient(node);
    await h.connected(client);
    await assert.rejects(h.subscribed(client, 'no spaces allowed'), /subscription_error/);
    assert.equal(client.connection.state, 'connected');
  });

  it('subscribing twice to the same channel is harmless and delivers each event once', async () => {
    const { node } = ctx;
    const name = h.uniq('twice-');
    const c = await h.rawClient(node);
    await c.subscribe(name);
    c.send({ event: 'pusher:subscribe', data: { channel: name } });
    await h.sleep(300);
    await h.sdk(node).trigger(name, 'once', { x: 1 });
    await c.next('once');
    await c.expectNone('once', 400);
  });
});
