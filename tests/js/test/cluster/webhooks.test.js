'use strict';
// Webhooks across a cluster: occupied/vacated decided in Redis, so subscribers coming and going
// on two nodes at once give one pair per time the cluster-wide count leaves 0 and returns; the
// coordinator's sweep sends vacated when the node that held the last subscriber is killed; jobs
// pending when the leader is killed are delivered by the next one.
const { describe, it, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');
const { startReceiver, percentiles } = require('../../lib/webhook_receiver');

let cluster;
let receiver;
afterEach(async () => {
  await h.cleanupClients();
  if (cluster) { await cluster.stop(); cluster.saveLogs(`cluster-webhooks-${cluster.label}`); cluster = null; }
  if (receiver) { await receiver.close(); receiver = null; }
});

// Exact edges: these tests check every transition, so no grace period unless a test sets one.
const APP = { id: 'app1', key: 'app1-key', secret: 'app1-secret', webhook_grace_ms: 0 };

async function hookedCluster(label, respond, extra = {}, appExtra = {}, hook = {}) {
  receiver = await startReceiver(APP, { respond });
  cluster = await h.startCluster({
    nodes: 2, coordinator: false, apps: [{ ...APP, ...appExtra, webhooks: [{ url: receiver.url, ...hook }] }], ...extra,
  });
  cluster.label = label;
  const coordinator = await cluster.addCoordinator({ args: ['--config', cluster.nodes[0].configFile] });
  return coordinator;
}

/** The accepted events for `channel`, in order, deduplicated by webhook id. */
function events(channel) {
  return receiver.delivered().filter((e) => e.channel === channel);
}

/** The names of the accepted events for `channel`, in order. */
function names(channel) {
  return events(channel).map((e) => e.name);
}

/** member_added / member_removed of `user` on `channel`, in order. */
function memberEvents(channel, user) {
  return events(channel).filter((e) => e.name.startsWith('member_') && e.user_id === user).map((e) => e.name);
}

/** A raw client on `node` that joined presence channel `channel` as `user`. */
async function joinAs(node, channel, user) {
  const c = await h.rawClient(node);
  const res = await c.subscribe(channel, h.rawAuth(node.app, c.socketId, channel, { user_id: user, user_info: {} }));
  assert.equal(res.event, 'pusher_internal:subscription_succeeded', `${user} joined ${channel}`);
  return c;
}

describe('cluster: webhooks', () => {
  it('subscribers come and go on two nodes at once: occupied and vacated alternate, one pair a round', async () => {
    await hookedCluster('alternate');
    const [A, B] = cluster.nodes;
    const channels = Array.from({ length: 6 }, () => h.uniq('flap-'));
    const rounds = 8;
    const samples = [];
    for (let round = 0; round < rounds; round++) {
      const clients = await Promise.all([h.rawClient(A), h.rawClient(B), h.rawClient(A), h.rawClient(B)]);
      const t0 = Date.now();
      await Promise.all(channels.flatMap((ch) => clients.map(async (c) => {
        await h.sleep(Math.random() * 5);
        await c.subscribe(ch);
      })));
      await h.eventually(() => channels.every((ch) => names(ch).length === 2 * round + 1), { timeout: 10000, message: `occupied in round ${round}` });
      samples.push(Math.max(...receiver.accepted().slice(-1).map((r) => r.at)) - t0);
      const t1 = Date.now();
      await Promise.all(channels.flatMap((ch) => clients.map(async (c) => {
        await h.sleep(Math.random() * 5);
        c.send({ event: 'pusher:unsubscribe', data: { channel: ch } });
      })));
      await h.eventually(() => channels.every((ch) => names(ch).length === 2 * round + 2), { timeout: 10000, message: `vacated in round ${round}` });
      samples.push(Math.max(...receiver.accepted().slice(-1).map((r) => r.at)) - t1);
      for (const c of clients) c.close();
    }
    await h.sleep(500);
    for (const ch of channels) {
      assert.deepEqual(names(ch), Array.from({ length: 2 * rounds }, (_, i) => (i % 2 ? 'channel_vacated' : 'channel_occupied')), ch);
    }
    assert.ok(receiver.requests.every((r) => r.valid), 'the pusher SDK accepts every request');
    console.log(`# webhook latency cluster (ms, transition to POST, last channel of a round): ${JSON.stringify(percentiles(samples))}`);
  });

  it('users with tabs on both nodes join and leave at once: one member_added and one member_removed per user a round', async () => {
    await hookedCluster('members');
    const [A, B] = cluster.nodes;
    const channel = h.uniq('presence-hooks-');
    const users = ['u1', 'u2', 'u3'];
    const rounds = 6;
    for (let round = 0; round < rounds; round++) {
      // Two tabs per user, one on each node, joining in a jittered order.
      const tabs = await Promise.all(users.flatMap((u) => [A, B].map(async (n) => {
        await h.sleep(Math.random() * 10);
        return joinAs(n, channel, u);
      })));
      await h.eventually(() => users.every((u) => memberEvents(channel, u).length === 2 * round + 1),
        { timeout: 10000, message: `member_added in round ${round}` });
      await Promise.all(tabs.map(async (c, i) => {
        await h.sleep(Math.random() * 10);
        if (i % 2) c.send({ event: 'pusher:unsubscribe', data: { channel } });
        else c.close();
      }));
      await h.eventually(() => users.every((u) => memberEvents(channel, u).length === 2 * round + 2),
        { timeout: 10000, message: `member_removed in round ${round}` });
      for (const c of tabs) c.close();
    }
    await h.sleep(500);
    for (const u of users) {
      assert.deepEqual(memberEvents(channel, u), Array.from({ length: 2 * rounds }, (_, i) => (i % 2 ? 'member_removed' : 'member_added')), u);
    }
    assert.ok(receiver.requests.every((r) => r.valid), 'the pusher SDK accepts every request');
  });

  it('kill -9 of the node holding a user\'s last tab: the sweep sends member_removed', async () => {
    await hookedCluster('member-crash');
    const [A, B] = cluster.nodes;
    const channel = h.uniq('presence-crash-');
    await joinAs(A, channel, 'doomed');
    const stays = await joinAs(B, channel, 'stays');
    await h.eventually(() => memberEvents(channel, 'doomed').length === 1 && memberEvents(channel, 'stays').length === 1,
      { message: 'both added' });
    await A.kill();
    await h.eventually(() => memberEvents(channel, 'doomed').length === 2, { timeout: 20000, message: 'member_removed after the node died' });
    assert.deepEqual(memberEvents(channel, 'doomed'), ['member_added', 'member_removed']);
    assert.deepEqual(memberEvents(channel, 'stays'), ['member_added']);
    assert.ok(stays.isOpen);
  });

  it('client events sent on both nodes: one client_event webhook each, with the sender', async () => {
    await hookedCluster('client-events');
    const [A, B] = cluster.nodes;
    const channel = h.uniq('presence-chat-');
    const a = await joinAs(A, channel, 'ann');
    const b = await joinAs(B, channel, 'bob');
    const sent = [];
    for (let i = 0; i < 20; i++) {
      const [from, to] = i % 2 ? [b, a] : [a, b];
      from.send({ event: 'client-msg', channel, data: { i } });
      sent.push({ i, socket_id: from.socketId, user_id: from === a ? 'ann' : 'bob' });
      await to.next((f) => f.event === 'client-msg' && JSON.stringify(f.data) === JSON.stringify({ i }), 3000, `client-msg ${i}`);
    }
    const got = () => events(channel).filter((e) => e.name === 'client_event');
    await h.eventually(() => got().length === 20, { timeout: 10000, message: 'a client_event webhook per event' });
    await h.sleep(500);
    const seen = got().map((e) => ({ i: JSON.parse(e.data).i, socket_id: e.socket_id, user_id: e.user_id })).sort((x, y) => x.i - y.i);
    assert.deepEqual(seen, sent);
    assert.ok(receiver.requests.every((r) => r.valid), 'the pusher SDK accepts every request');
  });

  it('kill -9 of the node holding the last subscriber: the sweep sends channel_vacated', async () => {
    await hookedCluster('crash');
    const [A, B] = cluster.nodes;
    const name = h.uniq('crash-');
    const a = await h.rawClient(A);
    const b = await h.rawClient(B);
    await a.subscribe(name);
    await b.subscribe(name);
    await h.eventually(() => names(name).length === 1, { message: 'occupied' });
    b.send({ event: 'pusher:unsubscribe', data: { channel: name } });
    await b.ping();
    await A.kill();
    await h.eventually(() => names(name).length === 2, { timeout: 15000, message: 'vacated after the node died' });
    assert.deepEqual(names(name), ['channel_occupied', 'channel_vacated']);
  });

  it('the coordinator killed with jobs pending: the next leader delivers them', async () => {
    let refuse = true;
    const first = await hookedCluster('takeover', () => (refuse ? 503 : 200), { leaderTtlMs: 2000 });
    const [A] = cluster.nodes;
    const name = h.uniq('pending-');
    const c = await h.rawClient(A);
    await c.subscribe(name);
    await h.eventually(() => receiver.requests.length >= 1, { timeout: 10000, message: 'the leader tried once' });
    await first.kill();
    refuse = false;
    await cluster.addCoordinator({ args: ['--config', cluster.nodes[0].configFile], instanceId: 'second' });
    await h.eventually(() => names(name).length === 1, { timeout: 20000, message: 'the next leader delivered the pending job' });
    assert.deepEqual(names(name), ['channel_occupied']);
    assert.ok(receiver.requests.every((r) => r.valid));
  });

  it('cache_miss: one per subscription to an empty cache channel, on either node', async () => {
    await hookedCluster('cache-miss');
    const [A, B] = cluster.nodes;
    const name = h.uniq('cache-hook-');
    const a = await h.rawClient(A);
    const b = await h.rawClient(B);
    await a.subscribe(name);
    await a.next('pusher:cache_miss');
    await b.subscribe(name);
    await b.next('pusher:cache_miss');
    await h.eventually(() => events(name).filter((e) => e.name === 'cache_miss').length === 2, { message: 'a cache_miss per subscription' });
    await h.sdk(A).trigger(name, 'Price', { v: 1 });
    await a.next('Price');
    const late = await h.rawClient(B);
    await late.subscribe(name);
    await late.next('Price');
    await h.sleep(500);
    assert.deepEqual(names(name), ['channel_occupied', 'cache_miss', 'cache_miss'], 'none once an event is cached');
    assert.ok(receiver.requests.every((r) => r.valid));
  });

  it('grace period: a user who moves from one node to the other within it sends neither edge', async () => {
    const grace = 1000;
    await hookedCluster('grace', undefined, {}, { webhook_grace_ms: grace });
    const [A, B] = cluster.nodes;
    const channel = h.uniq('presence-move-');
    let tab = await joinAs(A, channel, 'mover');
    await h.eventually(() => names(channel).length === 2, { message: 'occupied and member_added' });
    for (let round = 0; round < 6; round++) {
      tab.close();
      await h.sleep(20 + Math.floor(Math.random() * 200));
      tab = await joinAs(round % 2 ? A : B, channel, 'mover');
    }
    await h.sleep(grace + 800);
    assert.deepEqual(names(channel).sort(), ['channel_occupied', 'member_added'], 'moves inside the grace period send nothing');
    const left = Date.now();
    tab.close();
    await h.eventually(() => names(channel).length === 4, { timeout: grace + 8000, message: 'vacated and member_removed once it stays away' });
    assert.deepEqual(names(channel).slice(2).sort(), ['channel_vacated', 'member_removed']);
    for (const e of receiver.events().filter((x) => x.channel === channel).slice(2)) {
      assert.ok(e.at - left >= grace - 50, `held for the grace period: ${e.at - left} ms`);
    }
  });

  it('grace period: a URL that wants only channel_vacated gets none when the channel moves between nodes', async () => {
    const grace = 1000;
    await hookedCluster('grace-filtered', undefined, {}, { webhook_grace_ms: grace }, { event_types: ['channel_vacated'] });
    const [A, B] = cluster.nodes;
    const name = h.uniq('moving-');
    let c = await h.rawClient(A);
    await c.subscribe(name);
    for (let round = 0; round < 4; round++) {
      c.close();
      await h.sleep(20 + Math.floor(Math.random() * 150));
      c = await h.rawClient(round % 2 ? A : B);
      await c.subscribe(name);
    }
    await h.sleep(grace + 1500);
    assert.equal(receiver.requests.length, 0, 'every move was debounced: the occupied edges reached the leader to cancel them');
    c.close();
    await h.eventually(() => names(name).length === 1, { timeout: grace + 8000, message: 'vacated once it stays empty' });
    assert.deepEqual(names(name), ['channel_vacated']);
  });
});
