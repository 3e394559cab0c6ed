'use strict';
// Every HTTP API route through the official Pusher server SDK, plus the health routes.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../lib/harness');

const ctx = h.useNode({ apps: [{ id: 'app1' }, { id: 'other' }] }, 'http_api');

async function presenceMember(node, name, userId) {
  const c = await h.rawClient(node);
  const f = await c.subscribe(name, h.rawAuth(node.app, c.socketId, name, { user_id: userId }));
  assert.equal(f.event, 'pusher_internal:subscription_succeeded', f.raw);
  return c;
}

describe('HTTP API', () => {
  it('GET /up answers 200 {"health":"OK"}; /healthz and /readyz answer 200', async () => {
    const { node } = ctx;
    const up = await fetch(node.url('/up'));
    assert.equal(up.status, 200);
    assert.deepEqual(await up.json(), { health: 'OK' });
    for (const p of ['/healthz', '/readyz']) {
      const r = await fetch(node.url(p));
      await r.text();
      assert.equal(r.status, 200, p);
    }
  });

  it('POST /events (single channel) answers {} and delivers', async () => {
    const { node } = ctx;
    const name = h.uniq('single-');
    const c = await h.rawClient(node);
    await c.subscribe(name);
    const res = await h.sdkResult(h.sdk(node).trigger(name, 'Ev', { a: 1 }));
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(res.json, {});
    assert.deepEqual((await c.next('Ev')).data, { a: 1 });
  });

  it('POST /events with "channel" (singular) in the body delivers too', async () => {
    const { node } = ctx;
    const name = h.uniq('singular-');
    const c = await h.rawClient(node);
    await c.subscribe(name);
    const res = await h.sdkResult(h.sdk(node).post({ path: '/events', body: { name: 'Ev1', channel: name, data: '{"s":1}' } }));
    assert.equal(res.status, 200, res.text);
    assert.deepEqual((await c.next('Ev1')).data, { s: 1 });
  });

  it('POST /events to several channels with info=subscription_count', async () => {
    const { node } = ctx;
    const c1 = h.uniq('multi1-');
    const c2 = h.uniq('multi2-');
    const c3 = h.uniq('multi3-');
    const a = await h.rawClient(node);
    const b = await h.rawClient(node);
    await a.subscribe(c1); await b.subscribe(c1); await b.subscribe(c2);
    const res = await h.sdkResult(h.sdk(node).trigger([c1, c2, c3], 'Multi', { m: true }, { info: 'subscription_count' }));
    assert.equal(res.status, 200, res.text);
    assert.equal(res.json.channels[c1].subscription_count, 2, res.text);
    assert.equal(res.json.channels[c2].subscription_count, 1, res.text);
    if (res.json.channels[c3] !== undefined) {
      assert.equal(res.json.channels[c3].subscription_count || 0, 0, res.text);
    }
    await a.next((f) => f.event === 'Multi' && f.channel === c1);
    await b.next((f) => f.event === 'Multi' && f.channel === c1);
    await b.next((f) => f.event === 'Multi' && f.channel === c2);
    await a.expectNone('Multi', 300);
  });

  it('POST /events with info=user_count on a presence channel', async () => {
    const { node } = ctx;
    const name = h.uniq('presence-info-');
    await presenceMember(node, name, 'a');
    await presenceMember(node, name, 'a');
    await presenceMember(node, name, 'b');
    const res = await h.sdkResult(h.sdk(node).trigger(name, 'Ev', {}, { info: 'user_count,subscription_count' }));
    assert.equal(res.status, 200, res.text);
    assert.equal(res.json.channels[name].user_count, 2, res.text);
    assert.equal(res.json.channels[name].subscription_count, 3, res.text);
  });

  it('POST /batch_events delivers each item; with info returns one entry per item', async () => {
    const { node } = ctx;
    const c1 = h.uniq('b1-');
    const c2 = h.uniq('b2-');
    const a = await h.rawClient(node);
    const b = await h.rawClient(node);
    await a.subscribe(c1); await b.subscribe(c1); await a.subscribe(c2);
    const plain = await h.sdkResult(h.sdk(node).triggerBatch([
      { channel: c1, name: 'First', data: { n: 1 } },
      { channel: c2, name: 'Second', data: 'two' },
    ]));
    assert.equal(plain.status, 200, plain.text);
    assert.equal(typeof plain.json, 'object', plain.text);
    assert.ok(plain.json.batch !== undefined || Object.keys(plain.json).length === 0, plain.text);
    assert.deepEqual((await a.next('First')).data, { n: 1 });
    await b.next('First');
    assert.equal((await a.next('Second')).msg.data, 'two');
    await b.expectNone('Second', 200);

    const withInfo = await h.sdkResult(h.sdk(node).triggerBatch([
      { channel: c1, name: 'Third', data: {}, info: 'subscription_count' },
      { channel: c2, name: 'Fourth', data: {} },
    ]));
    assert.equal(withInfo.status, 200, withInfo.text);
    assert.ok(Array.isArray(withInfo.json.batch), withInfo.text);
    assert.equal(withInfo.json.batch.length, 2, withInfo.text);
    assert.equal(withInfo.json.batch[0].subscription_count, 2, withInfo.text);
    assert.deepEqual(withInfo.json.batch[1], {}, withInfo.text);
  });

  it('GET /channels lists occupied channels, filter_by_prefix works, user_count for presence-', async () => {
    const { node } = ctx;
    const tag = h.uniq('t');
    const pub = `${tag}-pub`;
    const pres = `presence-${tag}`;
    const c = await h.rawClient(node);
    await c.subscribe(pub);
    await presenceMember(node, pres, 'u1');
    await presenceMember(node, pres, 'u2');
    await presenceMember(node, pres, 'u2');

    const all = await h.sdkResult(h.sdk(node).get({ path: '/channels' }));
    assert.equal(all.status, 200, all.text);
    assert.ok(all.json.channels[pub] !== undefined, all.text);
    assert.ok(all.json.channels[pres] !== undefined, all.text);

    const filtered = await h.sdkResult(h.sdk(node).get({ path: '/channels', params: { filter_by_prefix: tag } }));
    assert.deepEqual(Object.keys(filtered.json.channels), [pub], filtered.text);

    const presence = await h.sdkResult(h.sdk(node).get({ path: '/channels', params: { filter_by_prefix: 'presence-', info: 'user_count' } }));
    assert.equal(presence.status, 200, presence.text);
    assert.equal(presence.json.channels[pres].user_count, 2, presence.text);
    assert.ok(!(pub in presence.json.channels));

    // an unoccupied channel is not listed
    const gone = h.uniq('gone-');
    const g = await h.rawClient(node);
    await g.subscribe(gone);
    await g.close();
    await h.eventually(async () => {
      const r = await h.sdkResult(h.sdk(node).get({ path: '/channels' }));
      return !(gone in r.json.channels);
    }, { message: 'vacated channel disappears from GET /channels' });

    // channels of another app are not listed
    const otherName = h.uniq('other-');
    const o = await h.rawClient(node, node.apps.other);
    await o.subscribe(otherName);
    const mine = await h.sdkResult(h.sdk(node).get({ path: '/channels' }));
    assert.ok(!(otherName in mine.json.channels), 'channels are per app');
  });

  it('GET /channels with info=user_count on a non-presence prefix answers 400', async () => {
    const { node } = ctx;
    for (const params of [{ filter_by_prefix: 'private-', info: 'user_count' }, { info: 'user_count' }]) {
      const res = await h.sdkResult(h.sdk(node).get({ path: '/channels', params }));
      assert.equal(res.status, 400, `${JSON.stringify(params)} -> ${res.status} ${res.text}`);
    }
  });

  it('GET /channels/{c}: occupied, subscription_count, user_count; occupied false when empty', async () => {
    const { node } = ctx;
    const name = h.uniq('info-');
    const a = await h.rawClient(node);
    const b = await h.rawClient(node);
    await a.subscribe(name); await b.subscribe(name);
    const res = await h.sdkResult(h.sdk(node).get({ path: `/channels/${name}`, params: { info: 'subscription_count' } }));
    assert.equal(res.status, 200, res.text);
    assert.equal(res.json.occupied, true);
    assert.equal(res.json.subscription_count, 2);

    const bare = await h.sdkResult(h.sdk(node).get({ path: `/channels/${name}` }));
    assert.equal(bare.json.occupied, true, bare.text);

    const pres = h.uniq('presence-info-');
    await presenceMember(node, pres, 1);
    await presenceMember(node, pres, 1);
    await presenceMember(node, pres, 2);
    const pr = await h.sdkResult(h.sdk(node).get({ path: `/channels/${pres}`, params: { info: 'user_count,subscription_count' } }));
    assert.equal(pr.status, 200, pr.text);
    assert.equal(pr.json.user_count, 2, pr.text);
    assert.equal(pr.json.subscription_count, 3, pr.text);

    const empty = await h.sdkResult(h.sdk(node).get({ path: `/channels/${h.uniq('nobody-')}`, params: { info: 'subscription_count' } }));
    assert.equal(empty.status, 200, empty.text);
    assert.equal(empty.json.occupied, false, empty.text);

    await a.close(); await b.close();
    await h.eventually(async () => {
      const r = await h.sdkResult(h.sdk(node).get({ path: `/channels/${name}` }));
      return r.json.occupied === false;
    }, { message: 'occupied false after everyone left' });
  });

  it('GET /channels/{c}/users lists distinct users of a presence channel, 400 otherwise', async () => {
    const { node } = ctx;
    const name = h.uniq('presence-users-');
    await presenceMember(node, name, 'x1');
    await presenceMember(node, name, 'x1');
    await presenceMember(node, name, 7);
    const res = await h.sdkResult(h.sdk(node).get({ path: `/channels/${name}/users` }));
    assert.equal(res.status, 200, res.text);
    const ids = res.json.users.map((u) => u.id);
    assert.equal(ids.length, 2, res.text);
    assert.deepEqual(ids.map(String).sort(), ['7', 'x1']);
    assert.ok(res.json.users.every((u) => Object.keys(u).length === 1 && 'id' in u), res.text);

    for (const ch of [h.uniq('pub-'), h.uniq('private-p-')]) {
      const bad = await h.sdkResult(h.sdk(node).get({ path: `/channels/${ch}/users` }));
      assert.equal(bad.status, 400, `${ch}: ${bad.status} ${bad.text}`);
    }
  });

  it('POST /users/{id}/terminate_connections answers {}', async () => {
    const { node } = ctx;
    const res = await h.sdkResult(h.sdk(node).terminateUserConnections('someone'));
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(res.json, {});
  });

  it('events are per app: the same channel name in another app does not receive', async () => {
    const { node } = ctx;
    const name = h.uniq('shared-name-');
    const mine = await h.rawClient(node);
    const theirs = await h.rawClient(node, node.apps.other);
    await mine.subscribe(name);
    await theirs.subscribe(name);
    await h.sdk(node).trigger(name, 'Ev', {});
    await mine.next('Ev');
    await theirs.expectNone('Ev', 300);
  });

  it('an unknown route answers 404', async () => {
    const { node } = ctx;
    const res = await h.signedRequest(node, node.app, { method: 'GET', path: '/apps/app1/nothing-here' });
    assert.equal(res.status, 404, res.text);
  });
});
