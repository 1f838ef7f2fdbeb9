// A GitHub-Actions-like token issuer for breakglass's tests: OpenID
// discovery, a JWKS and the job token endpoint a workflow reaches through
// `ACTIONS_ID_TOKEN_REQUEST_URL` (`GET <url>&audience=A` with
// `Authorization: Bearer <ACTIONS_ID_TOKEN_REQUEST_TOKEN>`, answering
// `{"count": N, "value": JWT}`). Tokens are RS256 with GitHub's documented
// claim set; tests change claims through `PUT /__test/claims` (bearer: the
// admin token), which replaces the overrides (a `null` removes a claim).
//
// Usage: node github.mjs CONFIG_JSON   (port, request_token, admin_token,
// keys_file, token_ttl_s). Listens on 127.0.0.1 only; prints "ready".

import { createServer } from 'node:http';
import { readFileSync, writeFileSync, renameSync, existsSync } from 'node:fs';
import { randomUUID, timingSafeEqual, createHash } from 'node:crypto';
import * as jose from 'jose';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const issuer = `http://127.0.0.1:${config.port}`;
const BODY_BYTES_MAX = 64 * 1024;

let jwk;
if (existsSync(config.keys_file)) {
  jwk = JSON.parse(readFileSync(config.keys_file, 'utf8'));
} else {
  const { privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
  jwk = { ...(await jose.exportJWK(privateKey)), kid: randomUUID(), alg: 'RS256', use: 'sig' };
  writeFileSync(`${config.keys_file}.tmp`, JSON.stringify(jwk), { mode: 0o600 });
  renameSync(`${config.keys_file}.tmp`, config.keys_file);
}
const signingKey = await jose.importJWK(jwk, 'RS256');
const { d, p, q, dp, dq, qi, ...publicJwk } = jwk;

let overrides = {};
let issued = 0;

// Bearer tokens compared in constant time (hashes have equal lengths).
function bearerIs(req, expected) {
  const header = req.headers.authorization ?? '';
  const given = header.startsWith('Bearer ') ? header.slice(7) : '';
  const h = (s) => createHash('sha256').update(s).digest();
  return timingSafeEqual(h(given), h(expected));
}

function claimsFor(audience) {
  const now = Math.floor(Date.now() / 1000);
  const repository = 'acme/payments';
  const claims = {
    jti: randomUUID(),
    sub: `repo:${repository}:environment:production`,
    aud: audience ?? 'https://github.com/acme',
    ref: 'refs/heads/main',
    sha: 'd6b3e1a1b8c4f0e2a9d7c5b3a1f0e2d4c6b8a0f1',
    repository,
    repository_owner: 'acme',
    repository_owner_id: '1000001',
    repository_id: '2000002',
    repository_visibility: 'private',
    run_id: '3000003',
    run_number: '42',
    run_attempt: '1',
    actor: 'octocat',
    actor_id: '4000004',
    workflow: 'deploy',
    workflow_ref: `${repository}/.github/workflows/deploy.yml@refs/heads/main`,
    workflow_sha: 'd6b3e1a1b8c4f0e2a9d7c5b3a1f0e2d4c6b8a0f1',
    job_workflow_ref: `${repository}/.github/workflows/deploy.yml@refs/heads/main`,
    job_workflow_sha: 'd6b3e1a1b8c4f0e2a9d7c5b3a1f0e2d4c6b8a0f1',
    head_ref: '',
    base_ref: '',
    event_name: 'push',
    ref_type: 'branch',
    ref_protected: 'true',
    environment: 'production',
    runner_environment: 'github-hosted',
    iss: issuer,
    nbf: now - 5,
    iat: now,
    exp: now + config.token_ttl_s,
  };
  for (const [k, v] of Object.entries(overrides)) {
    if (v === null) delete claims[k];
    else claims[k] = v;
  }
  return claims;
}

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(text);
}

async function readBody(req) {
  let size = 0;
  const chunks = [];
  for await (const chunk of req) {
    size += chunk.length;
    if (size > BODY_BYTES_MAX) throw new Error('body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

const server = createServer(async (req, res) => {
  try {
    const url = new URL(req.url, issuer);
    if (req.method === 'GET' && url.pathname === '/.well-known/openid-configuration') {
      return send(res, 200, {
        issuer,
        jwks_uri: `${issuer}/.well-known/jwks`,
        subject_types_supported: ['public', 'pairwise'],
        response_types_supported: ['id_token'],
        claims_supported: Object.keys(claimsFor('x')),
        id_token_signing_alg_values_supported: ['RS256'],
        scopes_supported: ['openid'],
      });
    }
    if (req.method === 'GET' && url.pathname === '/.well-known/jwks') {
      return send(res, 200, { keys: [publicJwk] });
    }
    if (req.method === 'GET' && url.pathname === '/token') {
      if (!bearerIs(req, config.request_token)) {
        return send(res, 401, { message: 'bad request token' });
      }
      const claims = claimsFor(url.searchParams.get('audience') ?? undefined);
      const value = await new jose.SignJWT(claims)
        .setProtectedHeader({ alg: 'RS256', kid: jwk.kid, typ: 'JWT' })
        .sign(signingKey);
      issued += 1;
      return send(res, 200, { count: issued, value });
    }
    if (req.method === 'PUT' && url.pathname === '/__test/claims') {
      if (!bearerIs(req, config.admin_token)) return send(res, 401, { message: 'bad admin token' });
      const body = JSON.parse(await readBody(req));
      if (body === null || typeof body !== 'object' || Array.isArray(body)) {
        return send(res, 400, { message: 'claims must be a JSON object' });
      }
      overrides = body;
      return send(res, 200, { ok: true });
    }
    return send(res, 404, { message: 'not found' });
  } catch (e) {
    return send(res, 400, { message: String(e.message ?? e) });
  }
});

server.listen(config.port, '127.0.0.1', () => process.stdout.write('ready\n'));
server.on('error', (e) => {
  process.stderr.write(`cannot listen on 127.0.0.1:${config.port}: ${e.message}\n`);
  process.exit(1);
});
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
