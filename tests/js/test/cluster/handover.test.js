'use strict';
// The hand-over race, two nodes on one Redis: socket X is the last local subscriber of a channel on
// node A, socket Y on A subscribes and X unsubscribes 0–3 ms later. A must keep (or take again) its
// Redis subscription, so an event triggered on node B after Y saw subscription_succeeded reaches Y,
// exactly once. It happens in apps whenever a page swaps one component for another on the same
// channel, or a user's second tab joins as the first one closes.
const { describe, it } = require('node:test');
const assert = require('node:assert/strict');
const h = require('../../lib/harness');

const ctx = h.useCluster({ nodes: 2, apps: [{ id: 'app1' }] }, 'cluster-handover');

const ROUNDS = 200;
/** How long a round waits for its event before counting Y as deaf. */
const DEAF_AFTER_MS = 1000;

/** Sends `frame` on `client` after 0–3 ms: synchronously a quarter of the time, else on a timer. */
function jittered(client, frame) {
  const ms = Math.random() * 3;
  if (ms < 0.75) {
    client.send(frame);
    return;
  }
  setTimeout(() => client.send(frame), ms);
}

/**
 * Runs the hand-over `ROUNDS` times, one fresh channel per round, and returns the rounds whose event
 * never reached Y. `auth(client, name, user)` gives a subscribe's auth fields; `check(name, round)`
 * runs after Y is subscribed and X is gone.
 */
async function handOver({ prefix, auth = () => ({}), check = async () => {} }) {
  const [A, B] = ctx.cluster.nodes;
  const x = await h.rawClient(A);
  const y = await h.rawClient(A);
  const pub = h.sdk(B);
  const deaf = [];
  const names = [];
  for (let round = 0; round < ROUNDS; round++) {
    const name = h.uniq(prefix);
    names.push(name);
    const sx = await x.subscribe(name, auth(x, name, `x${round}`));
    assert.equal(sx.event, 'pusher_internal:subscription_succeeded', `round ${round}, X: ${sx.raw}`);

    const joined = y.subscribe(name, auth(y, name, `y${round}`));
    jittered(x, { event: 'pusher:unsubscribe', data: { channel: name } });
    const sy = await joined;
    assert.equal(sy.event, 'pusher_internal:subscription_succeeded', `round ${round}, Y: ${sy.raw}`);
    // Frames of one socket are handled in order: the pong says A has handled X's unsubscribe.
    await x.ping();
    // Give a dropped Redis subscription time to take effect, as any real trigger would.
    await h.sleep(15);
    await check(name, round);

    const res = await h.sdkResult(pub.trigger(name, 'handover', { round }));
    assert.equal(res.status, 200, `round ${round}, trigger via B: ${res.text}`);
    try {
      const got = await y.next((f) => f.event === 'handover' && f.channel === name, DEAF_AFTER_MS, `event of round ${round}`);
      assert.deepEqual(got.data, { round });
    } catch {
      deaf.push(round);
    }
    y.send({ event: 'pusher:unsubscribe', data: { channel: name } });
  }
  await h.sleep(300); // a duplicate would have arrived by now
  const extra = y.frames.filter((f) => f.event === 'handover' && !f.taken);
  assert.deepEqual(extra.map((f) => f.raw), [], 'no event arrives twice');
  assert.equal(y.frames.filter((f) => f.event === 'handover').length, ROUNDS - deaf.length);
  return { deaf, names };
}

describe('cluster: hand-over of a channel on one node', () => {
  it(`${ROUNDS} rounds: Y joins as X, the last local subscriber, leaves; every event triggered on B reaches Y once`, async () => {
    const { deaf } = await handOver({ prefix: 'handover-' });
    assert.deepEqual(deaf, [], `Y never got the event in ${deaf.length} of ${ROUNDS} rounds: ${deaf.join(', ')}`);
  });

  it(`${ROUNDS} rounds on presence channels: the joiner is a member on both nodes and gets the event`, async () => {
    const [A, B] = ctx.cluster.nodes;
    const app = A.app;
    const members = async (node, name) => {
      const res = await h.sdkResult(h.sdk(node).get({ path: `/channels/${name}/users` }));
      assert.equal(res.status, 200, `users of ${name} on port ${node.port}: ${res.text}`);
      return res.json.users.map((u) => u.id);
    };
    const missing = [];
    const { deaf } = await handOver({
      prefix: 'presence-handover-',
      auth: (client, name, user) => h.rawAuth(app, client.socketId, name, { user_id: user }),
      check: async (name, round) => {
        const [onA, onB] = await Promise.all([members(A, name), members(B, name)]);
        if (onA.join() !== `y${round}` || onB.join() !== `y${round}`) missing.push({ round, onA, onB });
      },
    });
    assert.deepEqual(deaf, [], `Y never got the event in ${deaf.length} of ${ROUNDS} rounds: ${deaf.join(', ')}`);
    assert.deepEqual(missing, [], 'after the hand-over exactly the joiner is a member, as both nodes tell');
  });
});
