'use strict';
// Cluster mode, three nodes on one Redis: presence is per user and cluster-wide, and the HTTP API's
// channel counts and lists are the same whichever node answers.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

const ctx = h.useCluster({ nodes: 3, apps: [{ id: 'app1' }] }, 'cluster-presence');

const byId = (a, b) => String(a.id).localeCompare(String(b.id));
const presenceUser = (id, name) => ({ user: { user_id: id, user_info: { id, name } } });

/** GET on node's API; asserts 200 and returns the JSON. */
async function apiGet(node, path, params = {}) {
  const res = await h.sdkResult(h.sdk(node).get({ path, params }));
  assert.equal(res.status, 200, `GET ${path} ${JSON.stringify(params)} on port ${node.port}: ${res.status} ${res.text}`);
  return res.json;
}

describe('cluster: presence across nodes', () => {
  it('Echo here() on node A lists a member joined on node B; joining()/leaving() fire once', async () => {
    const [A, B] = ctx.cluster.nodes;
    const room = h.uniq('room');
    const bob = await h.echoClient(B, B.app, presenceUser(2, 'Bob'));
    const bobJoining = [];
    const bobHere = new Promise((resolve) => bob.join(room).here(resolve).joining((u) => bobJoining.push(u)));
    assert.deepEqual(await h.withTimeout(bobHere, 5000, 'Bob here() on B'), [{ id: 2, name: 'Bob' }]);

    const ann = await h.echoClient(A, A.app, presenceUser(1, 'Ann'));
    const joining = [];
    const leaving = [];
    const annHere = new Promise((resolve) => {
      ann.join(room).here(resolve).joining((u) => joining.push(u)).leaving((u) => leaving.push(u));
    });
    const members = await h.withTimeout(annHere, 5000, 'Ann here() on A');
    assert.deepEqual([...members].sort(byId), [{ id: 1, name: 'Ann' }, { id: 2, name: 'Bob' }], 'Ann on A sees Bob from B');
    await h.eventually(() => bobJoining.length === 1, { message: 'Bob (B) sees Ann (A) joining' });
    assert.deepEqual(bobJoining[0], { id: 1, name: 'Ann' });

    const carl = await h.echoClient(B, B.app, presenceUser(3, 'Carl'));
    await h.withTimeout(new Promise((r) => carl.join(room).here(r)), 5000, 'Carl here()');
    await h.eventually(() => joining.length === 1, { message: 'Ann (A) sees Carl (B) joining' });
    assert.deepEqual(joining[0], { id: 3, name: 'Carl' });

    carl.leave(room);
    await h.eventually(() => leaving.length === 1, { message: 'Ann sees Carl leaving' });
    bob.disconnect();
    await h.eventually(() => leaving.length === 2, { message: 'Ann sees Bob leaving (disconnect on B)' });
    assert.deepEqual([...leaving].sort(byId), [{ id: 2, name: 'Bob' }, { id: 3, name: 'Carl' }]);
    await h.sleep(500);
    assert.equal(joining.length, 1, `no extra joining events: ${JSON.stringify(joining)}`);
    assert.equal(leaving.length, 2, `no extra leaving events: ${JSON.stringify(leaving)}`);
  });

  it('one user with tabs on two nodes is one member; counts and lists agree on every node', async () => {
    const nodes = ctx.cluster.nodes;
    const [A, B, C] = nodes;
    const app = A.app;
    const name = h.uniq('presence-tabs-');
    const pub = `${name.slice('presence-'.length)}-pub`;
    const observer = await h.rawClient(C);
    const so = await observer.subscribe(name, h.rawAuth(app, observer.socketId, name, { user_id: 'obs', user_info: { name: 'O' } }));
    assert.equal(so.event, 'pusher_internal:subscription_succeeded', so.raw);
    const pubSub = await h.rawClient(C);
    await pubSub.subscribe(pub);

    const user = { user_id: 'multi', user_info: { name: 'Multi' } };
    const tab1 = h.pusherClient(A, app, { user });
    const ch1 = await h.subscribed(tab1, name);
    const added = await observer.next('pusher_internal:member_added');
    assert.deepEqual(added.data, { user_id: 'multi', user_info: { name: 'Multi' } });
    assert.equal(ch1.members.count, 2, 'tab 1 on A sees obs (C) and itself');

    const tab2 = h.pusherClient(B, app, { user });
    const ch2 = await h.subscribed(tab2, name);
    assert.equal(ch2.members.count, 2, 'two distinct users: obs and multi');
    assert.deepEqual(Object.keys(ch2.members.members).sort(), ['multi', 'obs']);
    await observer.expectNone('pusher_internal:member_added', 700);
    const t1Added = h.collect(ch1, 'pusher:member_added');

    // three connections, two users, asked on every node
    for (const [i, node] of nodes.entries()) {
      const info = await apiGet(node, `/channels/${name}`, { info: 'user_count,subscription_count' });
      assert.deepEqual(info, { occupied: true, user_count: 2, subscription_count: 3 }, `GET /channels/{c} on node ${'ABC'[i]}`);
      const users = await apiGet(node, `/channels/${name}/users`);
      assert.deepEqual(users.users.map((u) => u.id).sort(), ['multi', 'obs'], `GET /channels/{c}/users on node ${'ABC'[i]}`);
      const pubInfo = await apiGet(node, `/channels/${pub}`, { info: 'subscription_count' });
      assert.deepEqual(pubInfo, { occupied: true, subscription_count: 1 }, `public channel on node ${'ABC'[i]}`);
    }

    tab1.disconnect();
    await observer.expectNone('pusher_internal:member_removed', 800);
    for (const node of nodes) {
      await h.eventually(async () => {
        const info = await apiGet(node, `/channels/${name}`, { info: 'user_count,subscription_count' });
        return info.subscription_count === 2 && info.user_count === 2 ? info : false;
      }, { timeout: 3000, message: `counts 2/2 after tab 1 left, on port ${node.port}` });
    }
    tab2.unsubscribe(name);
    const removed = await observer.next('pusher_internal:member_removed', 3000);
    assert.equal(removed.channel, name);
    assert.deepEqual(removed.data, { user_id: 'multi' });
    await observer.expectNone('pusher_internal:member_removed', 500);
    assert.equal(t1Added.items.length, 0);
    for (const node of nodes) {
      const info = await apiGet(node, `/channels/${name}`, { info: 'user_count,subscription_count' });
      assert.deepEqual(info, { occupied: true, user_count: 1, subscription_count: 1 }, `counts after multi left, port ${node.port}`);
      const users = await apiGet(node, `/channels/${name}/users`);
      assert.deepEqual(users.users, [{ id: 'obs' }]);
    }
    await observer.close();
    await pubSub.close();
    for (const node of nodes) {
      await h.eventually(async () => {
        const info = await apiGet(node, `/channels/${name}`, { info: 'user_count,subscription_count' });
        const pinfo = await apiGet(node, `/channels/${pub}`);
        return info.occupied === false && pinfo.occupied === false;
      }, { timeout: 3000, message: `channels vacated everywhere, port ${node.port}` });
    }
  });

  it('GET /channels from any node lists the channels of every node (with user_count for presence-)', async () => {
    const nodes = ctx.cluster.nodes;
    const [A, B, C] = nodes;
    const app = A.app;
    const tag = h.uniq('list');
    const onlyOnC = `${tag}-c`;
    const onlyOnB = `presence-${tag}`;
    const c = await h.rawClient(C);
    const sc = await c.subscribe(onlyOnC);
    assert.equal(sc.event, 'pusher_internal:subscription_succeeded', sc.raw);
    for (const uid of ['p1', 'p2', 'p2']) {
      const b = await h.rawClient(B);
      const sb = await b.subscribe(onlyOnB, h.rawAuth(app, b.socketId, onlyOnB, { user_id: uid }));
      assert.equal(sb.event, 'pusher_internal:subscription_succeeded', sb.raw);
    }
    const problems = [];
    for (const [i, node] of nodes.entries()) {
      const all = await apiGet(node, '/channels', { filter_by_prefix: '' });
      const listed = Object.keys(all.channels).filter((n) => n.includes(tag)).sort();
      if (JSON.stringify(listed) !== JSON.stringify([onlyOnC, onlyOnB].sort())) {
        problems.push(`GET /channels on node ${'ABC'[i]} lists ${JSON.stringify(listed)}, expected ${JSON.stringify([onlyOnB, onlyOnC].sort())}`);
      }
      const pres = await apiGet(node, '/channels', { filter_by_prefix: 'presence-', info: 'user_count' });
      const got = pres.channels[onlyOnB];
      if (!got || got.user_count !== 2) {
        problems.push(`GET /channels?filter_by_prefix=presence-&info=user_count on node ${'ABC'[i]}: ${JSON.stringify(pres)}, expected ${onlyOnB} with user_count 2`);
      }
    }
    assert.deepEqual(problems, [], 'GET /channels must be cluster-wide');
  });

  it('member events fire once when the same user joins on three nodes at once and leaves', async () => {
    const [A, B, C] = ctx.cluster.nodes;
    const app = A.app;
    const name = h.uniq('presence-race-');
    const observer = await h.rawClient(B);
    await observer.subscribe(name, h.rawAuth(app, observer.socketId, name, { user_id: 'watcher' }));
    const tabs = await Promise.all([A, B, C, A, C].map((n) => h.rawClient(n)));
    const results = await Promise.all(tabs.map((t) => t.subscribe(name, h.rawAuth(app, t.socketId, name, { user_id: 'racer' }), 5000)));
    for (const r of results) assert.equal(r.event, 'pusher_internal:subscription_succeeded', r.raw);
    await observer.next('pusher_internal:member_added');
    await observer.expectNone('pusher_internal:member_added', 700);
    const info = await apiGet(C, `/channels/${name}`, { info: 'user_count,subscription_count' });
    assert.deepEqual(info, { occupied: true, user_count: 2, subscription_count: 6 });
    await Promise.all(tabs.map((t) => t.close()));
    const removed = await observer.next('pusher_internal:member_removed', 3000);
    assert.deepEqual(removed.data, { user_id: 'racer' });
    await observer.expectNone('pusher_internal:member_removed', 700);
  });

  it('POST /events with info=user_count,subscription_count on any node counts the whole cluster', async () => {
    const [A, B, C] = ctx.cluster.nodes;
    const app = A.app;
    const name = h.uniq('presence-info-');
    for (const [node, uid] of [[A, 'u1'], [B, 'u1'], [C, 'u2']]) {
      const c = await h.rawClient(node);
      const s = await c.subscribe(name, h.rawAuth(app, c.socketId, name, { user_id: uid }));
      assert.equal(s.event, 'pusher_internal:subscription_succeeded', s.raw);
    }
    for (const node of [A, B, C]) {
      const res = await h.signedRequest(node, app, {
        method: 'POST',
        path: `/apps/${app.id}/events`,
        body: { name: 'Ping', data: '{}', channels: [name], info: 'user_count,subscription_count' },
      });
      assert.equal(res.status, 200, res.text);
      assert.deepEqual(res.json, { channels: { [name]: { user_count: 2, subscription_count: 3 } } }, `on port ${node.port}`);
    }
  });
});
