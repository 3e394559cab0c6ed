'use strict';
// belfry-coordinator: the publish command, leader election with two replicas, failover after
// kill -9 (and the new leader still sweeps), hand-over on SIGTERM.
const { describe, it, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

let cluster;
afterEach(async () => {
  await h.cleanupClients();
  if (cluster) { await cluster.stop(); cluster.saveLogs(`cluster-coordinator-${cluster.label}`); cluster = null; }
});

async function leaders(coords) {
  return Promise.all(coords.map((c) => c.leader()));
}

/** Waits until exactly one of `coords` reports belfry_coordinator_leader 1 and the rest 0. */
async function oneLeader(coords, timeout) {
  let last;
  await h.eventually(async () => {
    last = await leaders(coords);
    return last.filter((v) => v === 1).length === 1 && last.every((v) => v === 0 || v === 1);
  }, { timeout, interval: 100, message: `exactly one leader (last ${JSON.stringify(last)})` });
  return coords[last.indexOf(1)];
}

describe('cluster: coordinator', () => {
  it('belfry-coordinator publish reaches subscribers on every node; --socket-id excludes one', async () => {
    cluster = await h.startCluster({ nodes: 2, apps: [{ id: 'app1' }] });
    cluster.label = 'publish';
    const [A, B] = cluster.nodes;
    const name = h.uniq('private-cli-');
    const subs = [];
    for (const node of [A, B, B]) {
      const c = h.pusherClient(node);
      subs.push({ client: c, ch: await h.subscribed(c, name) });
    }
    const got = subs.map((s) => h.collect(s.ch, 'Shipped'));
    const r1 = await h.coordinatorPublish({ redisUrl: cluster.redisUrl, app: 'app1', channel: name, event: 'Shipped', data: { id: 7 } });
    assert.equal(r1.code, 0, `publish exit ${r1.code}: ${r1.stderr}`);
    await h.eventually(() => got.every((g) => g.items.length === 1), { message: `every subscriber gets the CLI event (${got.map((g) => g.items.length)})` });
    assert.deepEqual(got.map((g) => g.items[0].data), [{ id: 7 }, { id: 7 }, { id: 7 }]);

    const r2 = await h.coordinatorPublish({
      redisUrl: cluster.redisUrl, app: 'app1', channel: name, event: 'Shipped', data: { id: 8 }, socketId: subs[1].client.connection.socket_id,
    });
    assert.equal(r2.code, 0, `publish exit ${r2.code}: ${r2.stderr}`);
    await h.eventually(() => got[0].items.length === 2 && got[2].items.length === 2, { message: 'the others get the second event' });
    await h.sleep(400);
    assert.equal(got[1].items.length, 1, 'the --socket-id socket (on B) must not get the second event');
  });

  it('publish refuses an invalid channel name, exits non-zero and publishes nothing', async () => {
    cluster = await h.startCluster({ nodes: 1, apps: [{ id: 'app1' }] });
    cluster.label = 'publish-invalid';
    const [A] = cluster.nodes;
    const c = h.pusherClient(A);
    const ch = await h.subscribed(c, 'orders');
    const got = h.collect(ch, 'Shipped');
    for (const channel of ['orders with spaces', 'orders\u00e9', '', 'x'.repeat(165)]) {
      const r = await h.coordinatorPublish({ redisUrl: cluster.redisUrl, app: 'app1', channel, event: 'Shipped', data: {} });
      assert.notEqual(r.code, 0, `channel ${JSON.stringify(channel)} must be refused`);
      assert.match(r.stderr, /invalid --channel.*nothing was published/, r.stderr);
    }
    const ok = await h.coordinatorPublish({ redisUrl: cluster.redisUrl, app: 'app1', channel: 'orders', event: 'Shipped', data: { n: 1 } });
    assert.equal(ok.code, 0, ok.stderr);
    await h.eventually(() => got.items.length === 1, { message: 'the valid publish arrives' });
    assert.deepEqual(got.items.map((i) => i.data), [{ n: 1 }], 'only the valid publish arrived');
  });

  it('two coordinators: one leader; kill -9 of it, the other leads within ttl + 2 s and still sweeps', async () => {
    const leaderTtlMs = 3000;
    cluster = await h.startCluster({ nodes: 2, presenceTtl: 3, coordinator: false, sweepIntervalMs: 250, leaderTtlMs, apps: [{ id: 'app1' }] });
    cluster.label = 'failover';
    const c1 = await cluster.addCoordinator({ instanceId: 'coord-1' });
    const c2 = await cluster.addCoordinator({ instanceId: 'coord-2' });
    const leader = await oneLeader([c1, c2], leaderTtlMs + 2000);
    const follower = leader === c1 ? c2 : c1;
    // stays that way
    await h.sleep(1000);
    assert.deepEqual((await leaders([leader, follower])), [1, 0], 'leadership is stable');

    const killedAt = Date.now();
    await leader.kill();
    await h.eventually(async () => (await follower.leader()) === 1, {
      timeout: leaderTtlMs + 2000, interval: 50, message: `follower ${follower.instanceId} becomes leader within ttl + 2 s`,
    });
    console.log(`coordinator failover after kill -9: new leader after ${Date.now() - killedAt} ms (leader ttl ${leaderTtlMs} ms)`);

    // the new leader sweeps: a crashed node's presence members are removed
    const [A, B] = cluster.nodes;
    const app = A.app;
    const room = h.uniq('presence-failover-');
    const observer = await h.rawClient(B);
    await observer.subscribe(room, h.rawAuth(app, observer.socketId, room, { user_id: 'watcher' }));
    const ghost = await h.rawClient(A);
    const gs = await ghost.subscribe(room, h.rawAuth(app, ghost.socketId, room, { user_id: 'ghost' }));
    assert.equal(gs.event, 'pusher_internal:subscription_succeeded', gs.raw);
    await observer.next('pusher_internal:member_added');
    const sweepsBefore = h.metricValue(await follower.metrics(), 'belfry_coordinator_sweeps_total');
    const nodeKilledAt = Date.now();
    await A.kill();
    const removed = await observer.next('pusher_internal:member_removed', 3000 + 5000);
    assert.deepEqual(removed.data, { user_id: 'ghost' });
    console.log(`after failover: kill -9 of a node -> member_removed after ${removed.at - nodeKilledAt} ms`);
    // The sweep counts a removal after publishing it: the event can arrive first.
    await h.eventually(async () => (h.metricValue(await follower.metrics(), 'belfry_coordinator_presence_removals_total') ?? 1) >= 1, {
      timeout: 2000, message: 'presence_removals_total counts the removal',
    }).catch(() => {});
    const text = await follower.metrics();
    const sweepsAfter = h.metricValue(text, 'belfry_coordinator_sweeps_total');
    if (sweepsBefore !== undefined) assert.ok(sweepsAfter > sweepsBefore, `sweeps_total ${sweepsBefore} -> ${sweepsAfter}`);
    const removals = h.metricValue(text, 'belfry_coordinator_presence_removals_total');
    if (removals !== undefined) assert.ok(removals >= 1, `presence_removals_total ${removals}`);
  });

  it('SIGTERM of the leader hands leadership over at once', async () => {
    const leaderTtlMs = 10000; // long: a hand-over must not wait for the lock to expire
    cluster = await h.startCluster({ nodes: 0, coordinator: false, leaderTtlMs });
    cluster.label = 'handover';
    const c1 = await cluster.addCoordinator({ instanceId: 'coord-a' });
    const c2 = await cluster.addCoordinator({ instanceId: 'coord-b' });
    const leader = await oneLeader([c1, c2], 5000);
    const follower = leader === c1 ? c2 : c1;
    const exited = new Promise((resolve) => leader.child.once('exit', (code, signal) => resolve({ code, signal })));
    const t0 = Date.now();
    leader.terminate();
    await h.eventually(async () => (await follower.leader()) === 1, {
      timeout: 3000, interval: 50, message: `follower leads within 3 s of the leader's SIGTERM (leader ttl ${leaderTtlMs} ms)`,
    });
    console.log(`coordinator SIGTERM hand-over: new leader after ${Date.now() - t0} ms (leader ttl ${leaderTtlMs} ms)`);
    const ex = await h.withTimeout(exited, 5000, 'old leader exits after SIGTERM');
    assert.equal(ex.code, 0, `exit ${JSON.stringify(ex)}`);
  });
});
