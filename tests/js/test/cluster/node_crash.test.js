'use strict';
// Cluster mode: kill -9 of a node. Its presence members are announced as removed on the other
// node within the presence TTL plus the coordinator's sweep, users still connected elsewhere are
// not, and the channel counts drop (no ghosts).
const { describe, it, after } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

const TTL = 3; // presence_ttl_secs on the nodes (the minimum)
const BOUND_MS = (TTL + 5) * 1000; // "within ~ttl + a few seconds"

let cluster;
after(async () => {
  await h.cleanupClients();
  if (cluster) { await cluster.stop(); cluster.saveLogs('cluster-node-crash'); }
});

async function counts(node, channel) {
  const res = await h.sdkResult(h.sdk(node).get({ path: `/channels/${channel}`, params: { info: channel.startsWith('presence-') ? 'user_count,subscription_count' : 'subscription_count' } }));
  assert.equal(res.status, 200, res.text);
  return res.json;
}

describe('cluster: a node crashes', () => {
  it('kill -9 of node A: member_removed on B for A\'s users only, counts drop', async () => {
    cluster = await h.startCluster({ nodes: 2, presenceTtl: TTL, coordinator: true, sweepIntervalMs: 250, apps: [{ id: 'app1' }] });
    const [A, B] = cluster.nodes;
    const app = A.app;
    const roomName = h.uniq('crash');
    const room = `presence-${roomName}`;
    const pub = h.uniq('crash-pub-');

    // B: an Echo observer and a raw observer
    const echo = await h.echoClient(B, app, { user: { user_id: 'obs', user_info: { id: 'obs' } } });
    const leaving = [];
    await h.withTimeout(new Promise((r) => echo.join(roomName).here(r).leaving((u) => leaving.push({ u, at: Date.now() }))), 5000, 'Echo here() on B');
    const raw = await h.rawClient(B);
    await raw.subscribe(room, h.rawAuth(app, raw.socketId, room, { user_id: 'rawobs' }));

    // A: dead1 (one tab), dead2 (two tabs), split (one tab on A, one on B); a public channel only on A
    const join = async (node, uid) => {
      const c = h.pusherClient(node, app, { user: { user_id: uid, user_info: { id: uid } } });
      await h.subscribed(c, room);
      return c;
    };
    await join(A, 'dead1');
    await join(A, 'dead2');
    await join(A, 'dead2');
    await join(A, 'split');
    await join(B, 'split');
    const pubA = h.pusherClient(A);
    await h.subscribed(pubA, pub);
    for (let i = 0; i < 3; i++) await raw.next('pusher_internal:member_added');
    assert.deepEqual(await counts(B, room), { occupied: true, user_count: 5, subscription_count: 7 });
    assert.deepEqual(await counts(B, pub), { occupied: true, subscription_count: 1 });

    const killedAt = Date.now();
    await A.kill();

    // member_removed for dead1 and dead2, each once; never for split
    const removed = [];
    for (let i = 0; i < 2; i++) {
      const f = await raw.next('pusher_internal:member_removed', BOUND_MS + 5000);
      removed.push({ id: f.data.user_id, ms: f.at - killedAt });
    }
    console.log(`kill -9 -> member_removed on the other node: ${removed.map((r) => `${r.id} after ${r.ms} ms`).join(', ')} (presence_ttl_secs ${TTL}, sweep 250 ms)`);
    assert.deepEqual(removed.map((r) => r.id).sort(), ['dead1', 'dead2']);
    for (const r of removed) assert.ok(r.ms <= BOUND_MS, `member_removed for ${r.id} after ${r.ms} ms, bound ${BOUND_MS} ms`);
    await h.eventually(() => leaving.length === 2, { timeout: 2000, message: 'Echo leaving() on B twice' });
    assert.deepEqual(leaving.map((l) => l.u.id).sort(), ['dead1', 'dead2']);
    await raw.expectNone('pusher_internal:member_removed', 1500);
    assert.equal(leaving.length, 2, `Echo leaving() fired for: ${JSON.stringify(leaving.map((l) => l.u))}`);

    // counts: measure when each drops; the presence part must follow the member removal
    const want = {
      user_count: { at: null, value: 3 },
      subscription_count: { at: null, value: 3 },
      pub_occupied: { at: null, value: false },
    };
    const deadline = killedAt + 20000;
    let last;
    while (Date.now() < deadline && Object.values(want).some((w) => w.at === null)) {
      const c = await counts(B, room);
      const p = await counts(B, pub);
      last = { room: c, pub: p };
      if (want.user_count.at === null && c.user_count === want.user_count.value) want.user_count.at = Date.now() - killedAt;
      if (want.subscription_count.at === null && c.subscription_count === want.subscription_count.value) want.subscription_count.at = Date.now() - killedAt;
      if (want.pub_occupied.at === null && p.occupied === false) want.pub_occupied.at = Date.now() - killedAt;
      await h.sleep(100);
    }
    console.log(`kill -9 -> counts on B: user_count 5->3 after ${want.user_count.at} ms, subscription_count 7->3 after ${want.subscription_count.at} ms, public channel vacated after ${want.pub_occupied.at} ms`);
    const users = await h.sdkResult(h.sdk(B).get({ path: `/channels/${room}/users` }));
    assert.deepEqual(users.json.users.map((u) => u.id).sort(), ['obs', 'rawobs', 'split'], users.text);
    const problems = Object.entries(want)
      .filter(([, w]) => w.at === null || w.at > BOUND_MS)
      .map(([k, w]) => `${k} reached ${w.value} ${w.at === null ? 'never (20 s)' : `after ${w.at} ms`}, bound ${BOUND_MS} ms`);
    assert.deepEqual(problems, [], `counts after the crash must drop with the presence TTL; last answer ${JSON.stringify(last)}`);
  });
});
