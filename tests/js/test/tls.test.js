'use strict';
// TLS on the main port: a certificate made here with openssl; a pusher-js client over wss://
// (trusting the test CA through NODE_EXTRA_CA_CERTS, as an app would) receives an event the
// official Pusher SDK published over https://; nothing is served in clear; SIGHUP loads a new
// certificate and keeps the old one when the new files are bad.
const { describe, it, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const https = require('node:https');
const os = require('node:os');
const path = require('node:path');
const tls = require('node:tls');
const readline = require('node:readline');
const PusherSDK = require('pusher');
const h = require('../lib/harness');
const certs = require('../lib/certs');

const ctx = {};

/** The fingerprint of the certificate the node presents to a new connection. */
function presented(node, ca) {
  return new Promise((resolve, reject) => {
    const sock = tls.connect({ host: h.HOST, port: node.port, ca, servername: 'localhost' }, () => {
      const fp = sock.getPeerCertificate().fingerprint256;
      sock.end();
      resolve(fp);
    });
    sock.on('error', reject);
  });
}

function fingerprint(file) {
  return new crypto.X509Certificate(fs.readFileSync(file)).fingerprint256;
}

/** pusher-js in its own process, subscribed to `channel`; resolves once subscribed. */
async function wssClient(node, channel, event) {
  const child = spawn(process.execPath, [path.join(__dirname, '../lib/wss_client.js'), h.HOST, String(node.port), node.app.key, channel, event], {
    env: { ...process.env, NODE_EXTRA_CA_CERTS: ctx.ca },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const lines = [];
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  readline.createInterface({ input: child.stdout }).on('line', (l) => lines.push(JSON.parse(l)));
  const client = {
    lines,
    stop() { child.stdin.end(); },
  };
  try {
    await h.eventually(() => lines.some((l) => l.subscribed || l.error), { timeout: 10000, message: 'wss client subscribed' });
  } catch (e) {
    child.kill();
    throw new Error(`${e.message}; client said ${JSON.stringify(lines)} ${stderr}`);
  }
  const err = lines.find((l) => l.error);
  if (err) { child.kill(); throw new Error(`wss client error: ${err.error}`); }
  return client;
}

before(async () => {
  ctx.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'belfry-wss-'));
  ctx.ca = certs.makeCa(ctx.dir);
  const pair = certs.makeServerCert(ctx.dir);
  ctx.cert = path.join(ctx.dir, 'live.pem');
  ctx.key = path.join(ctx.dir, 'live.key');
  fs.copyFileSync(pair.cert, ctx.cert);
  fs.copyFileSync(pair.key, ctx.key);
  ctx.first = pair.cert;
  ctx.node = await h.startNode({ tls: true, node: { tls_cert: ctx.cert, tls_key: ctx.key } });
});

after(async () => {
  if (ctx.node) {
    await ctx.node.stop();
    h.saveLog(ctx.node, 'tls');
  }
  if (ctx.dir) fs.rmSync(ctx.dir, { recursive: true, force: true });
});

describe('TLS on the main port', () => {
  it('pusher-js over wss:// receives an event published with the Pusher SDK over https://', async () => {
    const { node } = ctx;
    const name = h.uniq('tls-');
    const client = await wssClient(node, name, 'Paid');
    try {
      const sdk = new PusherSDK({
        appId: node.app.id, key: node.app.key, secret: node.app.secret,
        host: h.HOST, port: String(node.port), useTLS: true,
        agent: new https.Agent({ ca: fs.readFileSync(ctx.ca), servername: 'localhost' }),
      });
      const res = await sdk.trigger(name, 'Paid', { order: 42 });
      assert.equal(res.status, 200);
      await h.eventually(() => client.lines.some((l) => l.event === 'Paid'), { timeout: 5000, message: 'event over wss' });
      assert.deepEqual(client.lines.find((l) => l.event === 'Paid').data, { order: 42 });
    } finally {
      client.stop();
    }
  });

  it('nothing is served in clear on the TLS port', async () => {
    const res = await fetch(`http://${h.HOST}:${ctx.node.port}/up`).then(() => 'answered', () => 'refused');
    assert.equal(res, 'refused');
  });

  it('SIGHUP loads a new certificate; a bad one is logged and the previous one kept', async () => {
    const { node } = ctx;
    const ca = fs.readFileSync(ctx.ca);
    assert.equal(await presented(node, ca), fingerprint(ctx.first));
    const second = certs.makeServerCert(ctx.dir, 'second');
    fs.copyFileSync(second.cert, ctx.cert);
    fs.copyFileSync(second.key, ctx.key);
    node.child.kill('SIGHUP');
    await h.eventually(async () => (await presented(node, ca)) === fingerprint(second.cert), { timeout: 5000, message: 'new certificate presented' });

    fs.writeFileSync(ctx.cert, 'not a certificate\n');
    node.child.kill('SIGHUP');
    await h.eventually(() => /not reloaded/.test(node.output()), { timeout: 5000, message: 'bad certificate logged' });
    assert.equal(await presented(node, ca), fingerprint(second.cert), 'the previous certificate is still served');
    assert.ok(node.alive, 'the node survives a bad certificate');
  });
});
