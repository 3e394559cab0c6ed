'use strict';
// Cluster mode over TLS Redis (rediss://): a redis-server that only speaks TLS and wants a
// password, certificates made here with openssl, two nodes and a coordinator trusting the test
// CA through redis_tls_ca / --redis-tls-ca. Events published on either node, and by
// `belfry-coordinator publish`, reach clients on the other; without the CA a node stays unready
// and says why.
const { describe, it, before, after, afterEach } = require('node:test');
const assert = require('node:assert/strict');
const { execFile, spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const h = require('../../lib/harness');
const certs = require('../../lib/certs');

const PASSWORD = 'tls-test-password';

function makeCerts(dir) {
  const ca = certs.makeCa(dir);
  return { ca, ...certs.makeServerCert(dir) };
}

/** redis-server with TLS only (port 0 turns plain TCP off). */
async function startTlsRedis(certs) {
  const port = await h.freePort();
  const child = spawn('redis-server', [
    '--port', '0', '--tls-port', String(port), '--bind', '127.0.0.1',
    '--tls-cert-file', certs.cert, '--tls-key-file', certs.key, '--tls-ca-cert-file', certs.ca,
    '--tls-auth-clients', 'no', '--requirepass', PASSWORD, '--save', '', '--appendonly', 'no',
  ], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { out += d; });
  await h.eventually(() => /Ready to accept connections/.test(out) || child.exitCode !== null, {
    timeout: 10000, message: 'TLS redis-server started',
  });
  assert.equal(child.exitCode, null, `redis-server with TLS did not start:\n${out}`);
  return {
    port,
    url: `rediss://:${PASSWORD}@127.0.0.1:${port}`,
    output: () => out,
    async stop() {
      if (child.exitCode !== null) return;
      child.kill('SIGTERM');
      await new Promise((resolve) => child.once('exit', resolve));
    },
  };
}

function publishCli(args, env = {}) {
  return new Promise((resolve) => {
    execFile(h.COORDINATOR_BIN, ['publish', ...args], { timeout: 15000, env: { PATH: process.env.PATH, ...env } },
      (err, stdout, stderr) => resolve({ code: err ? err.code : 0, stdout: String(stdout), stderr: String(stderr) }));
  });
}

const ctx = {};

before(async () => {
  ctx.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'belfry-tls-'));
  ctx.certs = makeCerts(ctx.dir);
  ctx.redis = await startTlsRedis(ctx.certs);
  ctx.cluster = await h.startCluster({
    redisUrl: ctx.redis.url,
    nodes: 2,
    node: { redis_tls_ca: ctx.certs.ca },
  });
  ctx.coordinator = await ctx.cluster.addCoordinator({ args: ['--redis-tls-ca', ctx.certs.ca] });
  for (const node of ctx.cluster.nodes) {
    await h.eventually(async () => (await h.readyz(node)) === 200, { timeout: 10000, message: `node ${node.index} ready over rediss://` });
  }
});

afterEach(() => h.cleanupClients());

after(async () => {
  await h.cleanupClients();
  if (ctx.cluster) {
    ctx.cluster.saveLogs('redis-tls');
    await ctx.cluster.stop();
  }
  if (ctx.redis) await ctx.redis.stop();
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

describe('cluster over rediss://', () => {
  it('an event triggered on one node reaches a pusher-js client on the other', async () => {
    const [A, B] = ctx.cluster.nodes;
    const name = h.uniq('tls-');
    const client = h.pusherClient(B);
    const channel = await h.subscribed(client, name);
    const got = h.waitForEvent(channel, 'Shipped', { timeout: 5000 });
    const res = await h.sdkResult(h.sdk(A).trigger(name, 'Shipped', { id: 7 }));
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(await got, { id: 7 });
  });

  it('the coordinator leads over TLS', async () => {
    await h.eventually(async () => (await ctx.coordinator.leader()) === 1, { timeout: 10000, message: 'coordinator leader' });
  });

  it('belfry-coordinator publish with --redis-tls-ca reaches a client', async () => {
    const [A] = ctx.cluster.nodes;
    const name = h.uniq('tls-cli-');
    const client = h.pusherClient(A);
    const channel = await h.subscribed(client, name);
    const got = h.waitForEvent(channel, 'FromCli', { timeout: 5000 });
    const res = await publishCli(['--redis-url', ctx.redis.url, '--app', A.app.id, '--channel', name,
      '--event', 'FromCli', '--data', '{"ok":true}'], { BELFRY_REDIS_TLS_CA: ctx.certs.ca });
    assert.equal(res.code, 0, res.stderr);
    assert.deepEqual(await got, { ok: true });
  });

  it('a node that does not trust the CA stays unready and logs a certificate error', async () => {
    const node = await h.startNode({ redisUrl: ctx.redis.url, readyTimeout: 15000 });
    try {
      await h.eventually(() => /certificate|UnknownIssuer/i.test(node.output()), { timeout: 10000, message: 'certificate error logged' });
      assert.equal(await h.readyz(node), 503);
    } finally {
      await node.stop();
    }
  });

  it('a wrong password is named as refused credentials', async () => {
    const url = ctx.redis.url.replace(PASSWORD, 'not-the-password');
    const node = await h.startNode({ redisUrl: url, node: { redis_tls_ca: ctx.certs.ca } });
    try {
      await h.eventually(() => /refused the credentials/.test(node.output()), { timeout: 10000, message: 'credentials error logged' });
      assert.equal(await h.readyz(node), 503);
    } finally {
      await node.stop();
    }
    const res = await publishCli(['--redis-url', url, '--redis-tls-ca', ctx.certs.ca, '--app', 'app1',
      '--channel', 'c', '--event', 'E', '--data', '{}']);
    assert.notEqual(res.code, 0);
    assert.match(res.stderr, /refused the credentials/);
  });
});
