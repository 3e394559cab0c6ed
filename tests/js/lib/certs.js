'use strict';
// Test certificates made at test time with openssl: a CA, and server certificates for 127.0.0.1
// signed by it. Nothing here is fit for production.
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

function openssl(dir, ...args) {
  execFileSync('openssl', args, { cwd: dir, stdio: 'pipe' });
}

/** A CA in `dir` (ca.pem, ca.key). Returns the path of ca.pem. */
function makeCa(dir, name = 'ca') {
  openssl(dir, 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2', '-subj', `/CN=Belfry test ${name}`,
    '-keyout', `${name}.key`, '-out', `${name}.pem`);
  return path.join(dir, `${name}.pem`);
}

/** A certificate for 127.0.0.1 and localhost signed by CA `ca` in `dir`: { cert, key } paths. */
function makeServerCert(dir, name = 'server', ca = 'ca') {
  openssl(dir, 'req', '-newkey', 'rsa:2048', '-nodes', '-subj', '/CN=127.0.0.1', '-keyout', `${name}.key`, '-out', `${name}.csr`);
  fs.writeFileSync(path.join(dir, `${name}.ext`), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  openssl(dir, 'x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.pem`, '-CAkey', `${ca}.key`, '-CAcreateserial',
    '-days', '2', '-extfile', `${name}.ext`, '-out', `${name}.pem`);
  return { cert: path.join(dir, `${name}.pem`), key: path.join(dir, `${name}.key`) };
}

module.exports = { makeCa, makeServerCert };
